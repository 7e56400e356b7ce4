"""Kill -9 a real `lamra-pl fit` mid-step and mid-save; `--ckpt_path last` continues as if nothing happened.

The tiny stage-2 config with LoRA dropout (so the RNG state matters), 2 data workers, 5 batches per epoch
(so resumes land mid-epoch and cross epoch boundaries) and a checkpoint every 3 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import fit_tiny_with_callbacks

STEPS = 9


def fit(tmp: Path, backbone: Path, shards: Path, record: Path, *callbacks: dict, resume: bool = False):
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": 3},
    }
    recorder = {"class_path": "inject.Recorder", "init_args": {"path": str(record)}}
    return fit_tiny_with_callbacks(
        tmp,
        [checkpoints, recorder, *callbacks],
        f"--model.init_args.backbone.path={backbone}",
        "--model.init_args.lora.dropout=0.1",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=2",
        "--data.init_args.batches_per_epoch=5",
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        "--trainer.logger.init_args.version=run",
        *(["--ckpt_path=last"] if resume else []),
    )


def curve(record: Path) -> dict[int, dict]:
    """Step -> the last record of that step (a step redone after a resume replaces the lost one)."""
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    return {row["step"]: row for row in rows}


@pytest.fixture(scope="module")
def reference(tiny_backbone, shape_shards, tmp_path_factory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("reference")
    proc = fit(tmp, tiny_backbone, shape_shards, tmp / "steps.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = curve(tmp / "steps.jsonl")
    assert sorted(steps) == list(range(1, STEPS + 1))
    return steps


def assert_same_run(resumed: dict[int, dict], reference: dict[int, dict]) -> None:
    assert sorted(resumed) == sorted(reference)
    for step, row in reference.items():
        assert resumed[step]["qids"] == row["qids"], f"step {step}: other data after the resume"
        assert resumed[step]["loss"] == pytest.approx(row["loss"], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("kill", [2, 5, 8])  # before any checkpoint; mid-epoch 0 (from step 3); epoch 1 (from 6)
def test_killed_mid_step_resumes_with_the_same_data_rng_and_optimizer(
    kill, reference, tiny_backbone, shape_shards, tmp_path, finding
):
    record = tmp_path / "steps.jsonl"
    killer = {"class_path": "inject.KillAt", "init_args": {"step": kill}}
    killed = fit(tmp_path, tiny_backbone, shape_shards, record, killer)
    assert killed.returncode == -9
    assert sorted(curve(record)) == list(range(1, kill + 1))
    resumed = fit(tmp_path, tiny_backbone, shape_shards, record, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpointed = kill // 3 * 3  # the steps after the last checkpoint are lost, and redone
    redone = [json.loads(line)["step"] for line in record.read_text().splitlines()]
    assert redone == [*range(1, kill + 1), *range(checkpointed + 1, STEPS + 1)]
    assert_same_run(curve(record), reference)
    finding(
        f"SIGKILL in step {kill + 1} (last checkpoint: step {checkpointed}; 2 data workers, LoRA dropout)",
        f"`--ckpt_path last` redoes steps {checkpointed + 1}-{kill}: every step's batch and loss equal the "
        "uninterrupted run's",
    )


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(
    reference, tiny_backbone, shape_shards, tmp_path, finding
):
    record = tmp_path / "steps.jsonl"
    killer = {"class_path": "inject.KillDuringSave", "init_args": {"step": 6}}
    killed = fit(tmp_path, tiny_backbone, shape_shards, record, killer)
    assert killed.returncode == -9
    checkpoints = tmp_path / "runs" / "tiny_stage2" / "run" / "checkpoints"
    assert list(checkpoints.glob(".last.ckpt.tmp-*")), "the kill must have hit the write"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 3  # the previous checkpoint, whole
    resumed = fit(tmp_path, tiny_backbone, shape_shards, record, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(curve(record), reference)
    finding(
        "SIGKILL halfway through writing `last.ckpt`",
        "the previous `last.ckpt` (step 3) is intact; the resume equals the uninterrupted run",
    )
