"""`lamra-pl report`: the table and plots come from the runs' event files and configs, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import hparams_session, hparams_tab, lamra_here, ok, scalars
from lamra_pl.callbacks import FinalMetrics
from lamra_pl.formats.tensorboard import write_evaluation

CURVES = {  # run -> step -> metrics
    "a": {
        10: {"val/average/R@5": 0.25, "val/cars/R@5": 0.5, "val/loss": 0.875},
        20: {"val/average/R@5": 0.375, "val/cars/R@5": 0.625, "val/loss": 0.75},
    },
    "b": {10: {"val/average/R@5": 0.3, "val/cars/R@5": 0.4, "val/loss": 0.5}},
}


def fake_run(root: Path, version: str, temperature: float, finished: bool) -> None:
    logger = TensorBoardLogger(root, name="grid", version=version, default_hp_metric=False)
    config = {"model": {"class_path": "EmbeddingModule", "init_args": {"temperature": temperature, "lr": 1e-4}}}
    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    (Path(logger.log_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    for step, metrics in CURVES[version].items():
        logger.log_metrics(metrics, step)
    if finished:  # what FinalMetrics logs at the end of fit
        last = CURVES[version][max(CURVES[version])]
        logger.log_hyperparams({"temperature": temperature}, {"hp/" + k[4:]: v for k, v in last.items()})
    logger.finalize("success")


def test_report_reproduces_the_logged_numbers(tmp_path):
    fake_run(tmp_path, "a", 0.05, finished=True)
    fake_run(tmp_path, "b", 0.1, finished=False)
    proc = ok(lamra_here("report", "--runs", str(tmp_path)))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == {"grid/a", "grid/b"}
    assert saved["grid/a"]["status"] == "finished" and saved["grid/b"]["status"] == "unfinished"
    for version, curve in CURVES.items():
        last = curve[max(curve)]  # the final hp/* metrics, or the last val/* values of an unfinished run
        want = {k[4:]: float(np.float32(v)) for k, v in last.items()}  # event files store float32
        assert saved[f"grid/{version}"]["metrics"] == want
    table = (tmp_path / "report.md").read_text()
    header, _, row_a, row_b = table.splitlines()
    assert header == "| run | status | model.temperature | average/R@5 | loss | cars/R@5 |"  # lr is not varied
    # Recall in %, best = highest; a loss as it is, best = lowest.
    assert row_a == "| grid/a | finished | 0.05 | **37.50** | 0.75 | **62.50** |"
    assert row_b == "| grid/b | unfinished | 0.1 | 30.00 | **0.5** | 40.00 |"
    # The terminal gets the average columns only; the full table is the file's.
    printed = "| run | status | average/R@5 |\n|---|---|---|\n| grid/a | finished | **37.50** |\n"
    assert printed + "| grid/b | unfinished | 30.00 |\n" in proc.stdout
    assert "cars/R@5" not in proc.stdout and "model.temperature" not in proc.stdout
    assert f"{tmp_path / 'report.md'}: the full table" in proc.stdout
    for png in ("val_recall.png", "final_average.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_report_plots_are_tensorboard_images_and_not_a_run_of_their_own(tmp_path):
    fake_run(tmp_path, "a", 0.05, finished=True)
    fake_run(tmp_path, "b", 0.1, finished=False)
    for _ in range(2):  # again: the same runs, and the report's TensorBoard run holds one set of figures
        ok(lamra_here("report", "--runs", str(tmp_path)))
        assert set(json.loads((tmp_path / "report.json").read_text())) == {"grid/a", "grid/b"}
        files = list((tmp_path / "report_plots").glob("events.out.tfevents.*"))
        assert len(files) == 1
        events = EventAccumulator(str(files[0]), size_guidance={"images": 0})
        events.Reload()
        assert sorted(events.Tags()["images"]) == ["report/final_average", "report/val_recall"]
        for tag in events.Tags()["images"]:
            [image] = events.Images(tag)
            png = (tmp_path / f"{tag.split('/')[1]}.png").read_bytes()
            assert image.encoded_image_string[:8] == png[:8] == b"\x89PNG\r\n\x1a\n"
            # The same figure, 10 inches wide (its legend outside the axes): at the figure's 100 dpi in
            # TensorBoard, at 120 dpi in the file.
            width, height = png_size(png)
            assert image.width == 1000 and (width, height) == (1200, round(image.height * 1.2))
    assert "report_plots" not in (tmp_path / "report.md").read_text()


def png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_a_corrupt_or_empty_event_file_is_reported_not_a_crash(tmp_path):
    fake_run(tmp_path, "a", 0.05, finished=True)
    for name, content in (("corrupt", np.random.default_rng(0).bytes(4096)), ("empty", b"")):
        folder = tmp_path / "grid" / name
        folder.mkdir(parents=True)
        (folder / "events.out.tfevents.1.host.0").write_bytes(content)
    (tmp_path / "grid" / "no_events").mkdir()
    (tmp_path / "grid" / "no_events" / "hparams.yaml").write_text("temperature: 0.2\n")
    ok(lamra_here("report", "--runs", str(tmp_path)))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["grid/a"]["status"] == "finished"
    for name, status in (("corrupt", "damaged event file"), ("empty", "empty event file")):
        assert status in saved[f"grid/{name}"]["status"], saved[f"grid/{name}"]
        assert saved[f"grid/{name}"]["metrics"] == {}
    assert saved["grid/no_events"]["status"] == "no event file"
    # A damaged file beside a readable one: the run keeps its metrics and the damage is named.
    (tmp_path / "grid" / "a" / "events.out.tfevents.2.host.0").write_bytes(b"\x00" * 64)
    ok(lamra_here("report", "--runs", str(tmp_path)))
    run_a = json.loads((tmp_path / "report.json").read_text())["grid/a"]
    assert run_a["status"].startswith("finished; events.out.tfevents.2.host.0: damaged"), run_a
    assert run_a["metrics"] == {k[4:]: float(np.float32(v)) for k, v in CURVES["a"][20].items()}
    assert "| grid/corrupt |" in (tmp_path / "report.md").read_text()


class OneWeight(LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, i):
        loss = (self.w - batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, i):
        self.log("val/average/R@1", 1.0 / (1.0 + (self.w - batch).abs().mean()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Zeros(LightningDataModule):
    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return self.train_dataloader()


def fit_one_weight(root: Path, version: str, validate: bool, lr: float = 0.1) -> Trainer:
    logger = TensorBoardLogger(root, name="grid", version=version, default_hp_metric=False)
    trainer = Trainer(
        max_steps=4,
        logger=logger,
        callbacks=[FinalMetrics()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=2,
        limit_val_batches=None if validate else 0,
        log_every_n_steps=1,
    )
    trainer.fit(OneWeight(lr), datamodule=Zeros())
    return trainer


def test_final_metrics_logs_the_last_validation_values_once(tmp_path):
    trainer = fit_one_weight(tmp_path, "fit", validate=True)
    ok(lamra_here("report", "--runs", str(tmp_path)))
    saved = json.loads((tmp_path / "report.json").read_text())["grid/fit"]
    assert saved["status"] == "finished"
    want = float(np.float32(trainer.callback_metrics["val/average/R@1"]))
    assert saved["metrics"] == {"average/R@1": want} and want > 0.5  # w moved from 1 towards 0
    assert scalars(tmp_path / "grid" / "fit")["hp/average/R@1"] == [(4, want)]  # once, at the last step


def test_every_fit_is_an_hparams_session_beside_the_evaluations(tmp_path):
    """TensorBoard's HParams tab compares fits, validated or not, and evaluations: each run is a session with its
    hyperparameters, and the metric columns are every run's scalars (no run's list hides the others')."""
    fit_one_weight(tmp_path, "validated", validate=True)
    fit_one_weight(tmp_path, "trained_only", validate=False, lr=0.2)
    write_evaluation(tmp_path / "grid", {"eval_local/average/R@5": 0.5}, 7, {"pool": "local"}, {"average/R@5": 0.5})
    for run, lr in (("validated", 0.1), ("trained_only", 0.2)):
        session = hparams_session(tmp_path / "grid" / run)  # the module's and the data's init arguments
        model = {"model.class": "test_report.OneWeight", "model.lr": lr}
        assert session == {**model, "data.class": "test_report.Zeros", "data.batch_size": 2.0}
    assert "hp/average/R@1" not in scalars(tmp_path / "grid" / "trained_only")  # not finished by its hparams
    sessions, hparams, metrics = hparams_tab(tmp_path)
    assert sessions == ["grid", "grid/trained_only", "grid/validated"]
    assert {"model.lr", "data.batch_size", "pool"} <= set(hparams)
    assert {"train/loss", "hp/average/R@1", "val/average/R@1", "hp/average/R@5"} <= set(metrics)


def test_a_key_only_some_runs_have_is_not_a_column_by_itself():
    from lamra_pl.formats.tensorboard import Board
    from lamra_pl.tools.report import varied

    lmm = Board("lmm", {"model.class": "EmbeddingModule", "model.temperature": 0.05, "model.rope": "model"})
    clip = Board("clip", {"model.class": "CLIPModule", "model.temperature": 0.05, "model.clip_model": "ViT-B-32"})
    other = Board("t", {"model.class": "EmbeddingModule", "model.temperature": 0.1, "model.rope": "model"})
    assert varied([lmm, clip]) == ["model.class"]
    assert varied([lmm, clip, other]) == ["model.class", "model.temperature"]
