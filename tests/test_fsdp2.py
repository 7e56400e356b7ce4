"""FSDP2 (`experiments/strategies/fsdp2.yaml`) on 2 CPU gloo processes: it trains, saves adapter-only
checkpoints, resumes, and follows the DDP run on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import fit_tiny_with_callbacks


def fit(tmp: Path, backbone: Path, shards: Path, strategy: tuple[str, ...], steps: int, resume: bool = False):
    record = tmp / "steps.jsonl"
    proc = fit_tiny_with_callbacks(
        tmp,
        [
            {"class_path": "inject.Recorder", "init_args": {"path": str(record)}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
        ],
        *strategy,
        "--trainer.precision=32-true",  # on CPU; the shipped overlay says bf16-mixed for GPUs
        "--trainer.devices=2",
        f"--model.init_args.backbone.path={backbone}",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        f"--trainer.max_steps={steps}",
        # The first FSDP2 run stops at step 2 and the resume goes on to 4: a constant LR keeps one schedule.
        "--model.init_args.schedule.lr_schedule=constant",
        "--model.init_args.schedule.warmup_ratio=0",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        "--trainer.logger.init_args.version=run",
        *(["--ckpt_path=last"] if resume else []),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    checkpoint = torch.load(
        tmp / "runs" / "tiny_stage2" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    return {(row["rank"], row["step"]): row["loss"] for row in rows}, checkpoint


FSDP2 = ("-c", "experiments/strategies/fsdp2.yaml")
DDP = ("--trainer.strategy=ddp",)


@pytest.mark.slow
def test_fsdp2_trains_saves_adapters_resumes_and_matches_ddp(tiny_backbone, shape_shards, tmp_path):
    ddp, ddp_last = fit(tmp_path / "ddp", tiny_backbone, shape_shards, DDP, steps=4)
    first, saved = fit(tmp_path / "fsdp2", tiny_backbone, shape_shards, FSDP2, steps=2)
    resumed, last = fit(tmp_path / "fsdp2", tiny_backbone, shape_shards, FSDP2, steps=4, resume=True)

    # Adapter-only, whole (not one rank's shard): exactly the LoRA tensors, equal to DDP's after the same steps.
    lora = {k for k in ddp_last["state_dict"] if "lora_" in k}
    assert len(lora) == 28 and set(last["state_dict"]) == set(ddp_last["state_dict"]) == lora
    assert saved["global_step"] == 2 and last["global_step"] == 4
    for name, tensor in ddp_last["state_dict"].items():
        torch.testing.assert_close(last["state_dict"][name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    assert last["optimizer_states"][0]["state"], "no optimizer state saved"

    # Each rank's loss at each step (the record file is appended to, so `resumed` holds the first run's too).
    assert sorted(first) == [(r, s) for r in (0, 1) for s in (1, 2)] and sorted(resumed) == sorted(ddp)
    for (rank, step), loss in ddp.items():
        got = resumed[rank, step]
        assert got == pytest.approx(loss, abs=1e-4), f"rank {rank} step {step}: FSDP2 {got} vs DDP {loss}"
    assert ddp[0, 4] != pytest.approx(ddp[0, 1], abs=1e-3), "the loss did not move: the comparison is vacuous"
