"""`lamra-pl grid`: a grid file's steps run in order, each fit a finished TensorBoard run; done steps are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import ROOT, clean_error, lamra, lamra_here, ok
from lamra_pl.callbacks import FinalMetrics
from lamra_pl.formats.runs import format_run
from lamra_pl.formats.task import read_qrels
from lamra_pl.formats.tensorboard import read_board
from lamra_pl.recipes.mbeir import convert
from lamra_pl.tools.grid import Step, fit_state, load_grid

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


def write_grid(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def perfect_runs(data: Path, out: Path) -> Path:
    """A `retrieve`-style run folder over the fixture's test tasks that ranks each query's positives first."""
    entries = {}
    for task in sorted((data / "eval/test").glob("*_task*")):
        qrels = read_qrels(task / "qrels.txt")
        qids = sorted(qrels)
        ranked = [sorted(qrels[q]) for q in qids]
        out.mkdir(parents=True, exist_ok=True)
        scores = np.ones((len(qids), max(map(len, ranked))))
        (out / f"{task.name}.run").write_text(format_run(qids, ranked, scores, tag="perfect"))
        entries[task.name] = {
            "run_file": str(out / f"{task.name}.run"),
            "qrels_file": str(task / "qrels.txt"),
            "task_file": str(task / "task.json"),
            "pool_ids": str(task / "pool" / "ids.txt"),
        }
    (out / "runs.json").write_text(json.dumps({"pool": "local", "tasks": entries}))
    return out


def test_a_grid_runs_its_steps_then_skips_what_is_done(tmp_path):
    data, out = tmp_path / "data", tmp_path / "grid"
    convert(str(FIXTURE), str(data))
    fit_args = [
        f"--data.init_args.train_shards={data}/train",
        f"--data.init_args.val_tasks={data}/eval/test/*_task*",
        "--data.init_args.batch_size=8",
        "--trainer.max_steps=2",
        "--data.init_args.batches_per_epoch=2",
    ]
    later_fit = {  # a fit whose final metrics a later step logs, as a reranker's are (no val_tasks)
        "fit": "clip_t02",
        "configs": [
            str(ROOT / "experiments/tiny/clip.yaml"),
            str(ROOT / "experiments/ablations/temperature_0.02.yaml"),
        ],
        "args": [*fit_args[:1], *fit_args[2:]],
        "final_metrics": "later",
    }
    spec = {
        "out": str(out),
        "steps": [
            {"fit": "clip_t05", "configs": [str(ROOT / "experiments/tiny/clip.yaml")], "args": fit_args},
            later_fit,
            {"run": ["report", "--runs={out}"]},
        ],
    }
    grid = write_grid(tmp_path / "grid.yaml", spec)
    # Without the step that logs clip_t02's final metrics, the grid says so once everything else has run.
    clean_error(lamra_here("grid", f"--grid={grid}"), "clip_t02", "final_metrics: later")
    assert read_board(out / "clip_t05", out).finished and not read_board(out / "clip_t02", out).finished
    evaluations = perfect_runs(data, tmp_path / "perfect")
    log = {"run": ["evaluate", f"--runs={evaluations}", "--log_to={out}/clip_t02"]}
    log["creates"] = f"{evaluations}/results.json"
    spec["steps"].insert(2, log)
    proc = ok(lamra("grid", f"--grid={write_grid(grid, spec)}"))
    summary = json.loads((out / "grid.json").read_text())  # OUT/<grid file name>.json
    assert [s["state"] for s in summary.values()] == ["skipped", "resumed", "done", "done"], proc.stdout[-2000:]
    for name, temperature in (("clip_t05", 0.05), ("clip_t02", 0.02)):
        run = read_board(out / name, out)
        assert run.finished and "average/R@5" in run.metrics()
        assert run.hparams["model.temperature"] == temperature
    assert read_board(out / "clip_t02", out).metrics()["average/R@1"] == 1.0  # the perfect runs' numbers
    # The report step ran after both fits: its table holds both runs and the one varied hyperparameter.
    table = (out / "report.md").read_text()
    assert "clip_t05" in table and "clip_t02" in table and "model.temperature" in table
    ok(lamra_here("grid", f"--grid={grid}"))
    again = json.loads((out / "grid.json").read_text())
    assert [s["state"] for s in again.values()] == ["skipped", "skipped", "skipped", "done"]  # report: no `creates`


def test_unfinished_fits_resume_and_fits_that_died_early_start_again(tmp_path):
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    run_dir = tmp_path / "grid" / "a"
    logger = TensorBoardLogger(str(tmp_path), name="grid", version="a", default_hp_metric=False)
    logger.log_metrics({"val/average/R@5": 0.5}, step=10)
    logger.finalize("success")
    step = Step("a", ["fit"], run_dir=run_dir)
    (run_dir / "checkpoints").mkdir()
    torch.save({}, run_dir / "checkpoints" / "last.ckpt")
    assert fit_state(step) == "resume"
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    assert fit_state(step) == "new" and not run_dir.exists()  # no checkpoint: its partial logs are set aside
    assert len(list(run_dir.parent.glob("a.incomplete-*/events.out.tfevents.*"))) == 1
    logger = TensorBoardLogger(str(tmp_path), name="grid", version="a", default_hp_metric=False)
    logger.log_hyperparams({"x": 1}, {"hp/average/R@5": 0.5})
    logger.finalize("success")
    assert fit_state(step) == "finished"
    assert FinalMetrics  # the callback that writes hp/* in real fits (tests/test_report.py)


@pytest.mark.parametrize(
    ("steps", "needle"),
    [
        ([{"fit": "a"}], "has no configs"),
        ([{"fit": "a", "configs": ["nope.yaml"]}], "do not exist"),
        ([{"fit": "a", "run": ["x"]}], "either `fit: NAME`"),
        ([{"run": ["report"], "when": 1}], "unknown keys ['when']"),
        ([{"fit": "a", "configs": [str(ROOT / "experiments/tiny/clip.yaml")], "final_metrics": "soon"}], "`later`"),
        (
            [
                {"fit": "a", "configs": [str(ROOT / "experiments/tiny/clip.yaml")]},
                {"fit": "a", "configs": [str(ROOT / "experiments/tiny/clip.yaml")]},
            ],
            "a second fit named 'a'",
        ),
    ],
)
def test_bad_grid_files_are_named_errors(tmp_path, steps, needle):
    grid = write_grid(tmp_path / "g.yaml", {"out": str(tmp_path / "out"), "steps": steps})
    clean_error(lamra_here("grid", f"--grid={grid}"), "g.yaml", needle)


def test_only_keeps_the_named_fits_and_every_tool_step(tmp_path):
    clip = str(ROOT / "experiments/tiny/clip.yaml")
    spec = {
        "out": str(tmp_path),
        "steps": [{"fit": "a", "configs": [clip]}, {"run": ["report"]}, {"fit": "b", "configs": [clip]}],
    }
    grid = load_grid(write_grid(tmp_path / "g.yaml", spec), only=["b"])
    assert [s.name for s in grid.steps] == ["report", "b"]
    with pytest.raises(Exception, match="no fit named"):
        load_grid(tmp_path / "g.yaml", only=["c"])
