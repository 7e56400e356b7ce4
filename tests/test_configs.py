"""Every shipped YAML parses against the classes' signatures; the tiny ones also instantiate."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor

from lamra_pl.callbacks import FinalMetrics, Progress
from lamra_pl.cli.lightning import LamraCLI
from lamra_pl.data.datamodule import ShardDataModule
from lamra_pl.data.mix import MixDataModule
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.models.reranker import RerankModule
from lamra_pl.ranking.fusion import load_weights
from lamra_pl.strategies import FSDP2Strategy

ROOT = Path(__file__).resolve().parents[1]
FUSION_WEIGHTS = ROOT / "experiments/lamra_rank/fusion.yaml"  # a weights file for `lamra-pl rerank`, not a CLI config
OVERLAYS = sorted((ROOT / "experiments/strategies").glob("*.yaml"))  # given after a stage config
ABLATIONS = sorted((ROOT / "experiments/ablations").rglob("*.yaml"))  # overlays and grid files
GRIDS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml") if "steps" in (yaml.safe_load(p.read_text()) or {}))
CONFIGS = sorted(
    p for p in (ROOT / "experiments").rglob("*.yaml") if p != FUSION_WEIGHTS and p not in OVERLAYS + ABLATIONS + GRIDS
)
# Which stage config each ablation overlay is given after (the paper recipes).
RETRIEVER = "lamra_ret/stage2_instruct.yaml"
ABLATION_STAGE = {"rerank_pointwise": "lamra_rank/rerank_joint.yaml", "rerank_listwise": "lamra_rank/rerank_joint.yaml"}
ABLATION_STAGE["rerank_joint"] = ABLATION_STAGE["rerank_pointwise"]
ABLATION_STAGE["rerank_answer_labels"] = ABLATION_STAGE["rerank_pointwise"]
ABLATION_STAGE["interleaved"] = "mm_embed/stage_continual.yaml"  # an option of MixDataModule


def resolve(class_path: str) -> object:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


class ParseOnly(LamraCLI):
    def instantiate_classes(self) -> None:  # parse and type-check only: real backbones are not on this machine
        pass


def cli(cls: type[LamraCLI], *args: str) -> LamraCLI:
    return cls(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=list(args),
    )


def test_configs_exist():
    names = {str(p.relative_to(ROOT / "experiments")) for p in CONFIGS}
    assert {
        "lamra_ret/stage1_text.yaml",
        "lamra_ret/stage2_instruct.yaml",
        "tiny/stage1_text.yaml",
        "tiny/stage2_instruct.yaml",
        "lamra_rank/rerank_joint.yaml",
        "tiny/rerank_joint.yaml",
        "demo/rerank_joint.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(config):
    parsed = cli(ParseOnly, "-c", str(config)).config
    assert parsed.model.class_path.endswith(("EmbeddingModule", "RerankModule", "CLIPModule"))
    assert parsed.trainer.max_steps > 0
    # Every fit logs its learning rate per step (the schedule in TensorBoard) and its hyperparameters at the end.
    callbacks = {resolve(c.class_path): c.get("init_args") for c in parsed.trainer.callbacks}
    assert callbacks[LearningRateMonitor].logging_interval == "step"
    assert FinalMetrics in callbacks and parsed.trainer.logger.init_args.default_hp_metric is False
    # training progress that reads in a log (lamra_pl.Progress), with the bar it stands in for turned on
    assert any(resolve(c.class_path) is Progress for c in parsed.trainer.callbacks)
    assert parsed.trainer.enable_progress_bar is not False


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_strategy_overlays_parse_over_every_stage(overlay):
    for stage in ("lamra_ret/stage1_text.yaml", "lamra_ret/stage2_instruct.yaml", "lamra_rank/rerank_joint.yaml"):
        parsed = cli(ParseOnly, "-c", str(ROOT / "experiments" / stage), "-c", str(overlay)).config
        assert resolve(parsed.trainer.strategy.class_path) is FSDP2Strategy, stage
        assert parsed.trainer.precision == "bf16-mixed"


def test_paper_recipes():
    stage1 = cli(ParseOnly, "-c", str(ROOT / "experiments/lamra_ret/stage1_text.yaml")).config.model.init_args
    stage2 = cli(ParseOnly, "-c", str(ROOT / "experiments/lamra_ret/stage2_instruct.yaml")).config.model.init_args
    assert (stage1.lora.r, stage1.lora.alpha, stage1.optimizer.init_args.lr) == (64, 128, 2e-4)
    assert (stage2.lora.r, stage2.lora.alpha, stage2.optimizer.init_args.lr) == (128, 256, 1e-4)
    assert stage1.schedule.warmup_ratio == stage2.schedule.warmup_ratio == 0.03
    assert stage1.schedule.lr_schedule == "cosine"
    rank = cli(ParseOnly, "-c", str(ROOT / "experiments/lamra_rank/rerank_joint.yaml")).config
    model = rank.model.init_args
    assert (model.lora.r, model.lora.alpha, model.optimizer.init_args.lr) == (128, 256, 2e-5)
    assert (model.max_text_tokens, model.loss_reduction, model.pointwise_weight, model.listwise_weight) == (
        256,
        "tokens",
        1.0,
        1.0,
    )
    assert model.labels == "assistant_turn"  # LamRA's label span
    # LamRA ran every stage with plain 1-D positions (spec lamra.md section 1); MM-Embed's recipes run on its backbone
    for config in (
        "lamra_ret/stage1_text",
        "lamra_ret/stage2_instruct",
        "lamra_rank/rerank_joint",
        "mm_embed/stage_hardneg",
        "mm_embed/stage_continual",
    ):
        parsed = cli(ParseOnly, "-c", str(ROOT / f"experiments/{config}.yaml")).config.model.init_args
        assert parsed.backbone.rope == "1d", config
    # 128 queries per step over 16 GPUs, one epoch of M-BEIR's training queries
    trainer = rank.trainer
    per_step = rank.data.init_args.batch_size * trainer.accumulate_grad_batches * trainer.devices * trainer.num_nodes
    assert per_step == 128 and trainer.max_steps == 8600


def test_lamra_fusion_weights():
    assert load_weights(str(FUSION_WEIGHTS)) == {"default": 1.0, "mscoco_task0": 0.5, "mscoco_task3": 0.1}


@pytest.mark.parametrize("config", sorted((ROOT / "experiments/tiny").glob("*.yaml")), ids=lambda p: p.name)
def test_tiny_config_instantiates(config, tiny_backbone, shape_shards):
    lmm = "CLIPModule" not in config.read_text()  # the CLIP baseline has no LMM backbone
    c = cli(LamraCLI, "-c", str(config), *([f"--model.init_args.backbone.path={tiny_backbone}"] if lmm else []))
    assert isinstance(c.model, EmbeddingModule | RerankModule | CLIPModule)
    assert isinstance(c.datamodule, ShardDataModule)
    assert c.trainer.max_steps > 0


@pytest.mark.parametrize("overlay", [p for p in ABLATIONS if p.parent.name == "ablations"], ids=lambda p: p.name)
def test_ablation_overlays_parse_over_their_stage_and_change_what_they_name(overlay):
    stage = ROOT / "experiments" / ABLATION_STAGE.get(overlay.stem, RETRIEVER)
    base = cli(ParseOnly, "-c", str(stage)).config
    parsed = cli(ParseOnly, "-c", str(stage), "-c", str(overlay)).config
    assert parsed != base  # the overlay changes something
    assert parsed.trainer == base.trainer  # and only the model or the data
    if overlay.stem == "interleaved":  # its sub-batches divide the stage's global batch
        t, s = parsed.trainer, parsed.data.init_args
        assert (s.batch_size * t.devices * t.num_nodes) % s.sub_batch_size == 0
    if overlay.stem.startswith(("loss_", "matryoshka")):  # one loss option on, the others off
        spec = LossSpec(**parsed.model.init_args.loss)
        assert spec != LossSpec() and base.model.init_args.get("loss") is None
    if overlay.stem == "clip":
        assert resolve(parsed.model.class_path) is CLIPModule
        assert parsed.model.init_args.optimizer == base.model.init_args.optimizer  # the stage's recipe is kept


def test_every_ablation_of_the_issue_has_an_overlay():
    names = {p.stem for p in ABLATIONS if p.parent.name == "ablations"}
    assert {"no_stage1", "no_instruction", "hardneg_off", "hardneg_random", "hardneg_modality", "clip"} <= names
    assert {"rerank_pointwise", "rerank_listwise", "rerank_joint"} <= names
    assert any(n.startswith("temperature_") for n in names)
    assert {"rope_model", "rerank_answer_labels"} <= names  # this project's departures from the papers
    assert {"loss_fn_margin", "loss_qq_dd", "loss_hardness", "loss_task_temperature", "matryoshka"} <= names  # issue 23


@pytest.mark.parametrize("grid", GRIDS, ids=lambda p: p.name)
def test_grid_files_load_and_their_fits_parse(grid, monkeypatch):
    from lamra_pl.cli import COMMANDS
    from lamra_pl.tools.grid import load_grid

    monkeypatch.chdir(ROOT)
    declared = (yaml.safe_load(grid.read_text()) or {}).get("vars") or {}
    required = {name: f"given-{name}" for name, default in declared.items() if default is None}
    steps = load_grid(grid, variables=required).steps
    fits = [s for s in steps if s.run_dir is not None]
    assert steps and len({s.name for s in fits}) == len(fits)
    assert all(s.command[0] in (*COMMANDS, "python") for s in steps if s.run_dir is None)
    for step in fits:  # a reranker's metrics come from a later `evaluate --log_to` into its run
        assert not step.metrics_later or any(
            s.command[:1] == ["evaluate"] and f"--log_to={step.run_dir}" in s.command for s in steps
        )
    for step in fits:
        # The fit's command line, as the grid runs it, parses (paths under {out} need not exist yet).
        parsed = cli(ParseOnly, *step.command[1:]).config
        assert parsed.trainer.logger.init_args.version == step.name
        assert step.final_metrics != "fit" or any(
            resolve(c.class_path) is FinalMetrics for c in parsed.trainer.callbacks
        )


def test_the_demo_interleaved_overlay_turns_the_demo_stage_into_interleaved_sub_batches():
    demo = [ROOT / "experiments/demo/stage2_instruct.yaml", ROOT / "experiments/ablations/grids/demo_size.yaml"]
    overlay = ROOT / "experiments/ablations/grids/demo_interleaved.yaml"
    parsed = cli(ParseOnly, *(a for p in (*demo, overlay) for a in ("-c", str(p)))).config
    data = parsed.data.init_args
    assert resolve(parsed.data.class_path) is MixDataModule and data.train_shards is None  # MixDataModule takes sources
    assert list(data.sources) == ["demo/data/train"] and data.homogeneous
    assert data.batch_size % data.sub_batch_size == 0 and data.batch_size > data.sub_batch_size  # devices: 1
