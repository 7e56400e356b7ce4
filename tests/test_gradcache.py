"""GradCache in a real `lamra-pl fit`: the same training curve as the plain step, with clipping and the LR
schedule, and with every loss option on (exact per-step gradients are in test_ddp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import text_to_image_samples
from helpers import clean_error, fit_tiny_with_callbacks, lamra_here
from lamra_pl.formats.shards import write_shards


def fit_curve(tmp: Path, backbone: Path, shards: Path, *args: str) -> list[float]:
    record = tmp / "steps.jsonl"
    proc = fit_tiny_with_callbacks(
        tmp,
        [{"class_path": "inject.Recorder", "init_args": {"path": str(record)}}],
        f"--model.init_args.backbone.path={backbone}",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        "--trainer.max_steps=5",
        "--trainer.enable_checkpointing=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp}",  # where the CLI saves config.yaml without a logger
        "--model.init_args.schedule.warmup_ratio=0.2",  # step 1 at lr 0: a scheduler that is not stepped never trains
        *args,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_gradcache_fit_follows_the_plain_fit_with_clipping_and_schedule(tiny_backbone, shape_shards, tmp_path):
    # Chunks of 3 split the 8 queries and 8 candidates unevenly (3 + 3 + 2).
    clip = 0.05  # small enough to clip every step of this tiny model
    plain = fit_curve(tmp_path / "plain", tiny_backbone, shape_shards, f"--trainer.gradient_clip_val={clip}")
    cached = fit_curve(
        tmp_path / "cached",
        tiny_backbone,
        shape_shards,
        "--model.init_args.gradcache.chunk_size=3",
        f"--model.init_args.gradcache.clip_norm={clip}",
    )
    unclipped = fit_curve(tmp_path / "unclipped", tiny_backbone, shape_shards)
    assert cached == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert plain[-1] != pytest.approx(unclipped[-1], rel=1e-3), "clipping did not change the run: vacuous"
    assert plain[-1] < plain[0], "the curve did not move: the comparison is vacuous"


@pytest.mark.slow
def test_gradcache_fit_with_every_loss_option_follows_the_plain_fit(tiny_backbone, tmp_path):
    """Every `LossSpec` option on, from the command line, on shards whose records carry task ids 0..2."""
    shards = tmp_path / "train"
    write_shards(text_to_image_samples(repeat=4, negatives=1, tasks=3), shards, maxcount=12)
    options = (
        "--model.init_args.loss.false_negative_margin=0.1",
        "--model.init_args.loss.query_query=true",
        "--model.init_args.loss.candidate_candidate=true",
        "--model.init_args.loss.hardness_beta=2.0",
        "--model.init_args.loss.task_temperatures=3",
        "--model.init_args.loss.matryoshka_dims=[8, 32]",
        "--model.init_args.learnable_temperature=true",
    )
    plain = fit_curve(tmp_path / "plain", tiny_backbone, shards, *options)
    cached = fit_curve(tmp_path / "cached", tiny_backbone, shards, "--model.init_args.gradcache.chunk_size=3", *options)
    assert cached == pytest.approx(plain, rel=1e-4, abs=1e-5)
    assert plain[-1] < plain[0], "the curve did not move: the comparison is vacuous"
    saved = yaml.safe_load((tmp_path / "cached" / "config.yaml").read_text())["model"]["init_args"]["loss"]
    assert saved["task_temperatures"] == 3 and saved["matryoshka_dims"] == [8, 32] and saved["query_query"]


def test_gradcache_refuses_trainer_clipping_and_a_clip_norm_without_chunks(tiny_backbone):
    config = ("fit", "-c", "experiments/tiny/stage2_instruct.yaml", f"--model.init_args.backbone.path={tiny_backbone}")
    clean_error(
        lamra_here(*config, "--model.init_args.gradcache.chunk_size=4", "--trainer.gradient_clip_val=1.0"),
        "model.gradcache.clip_norm",
    )
    # GradCache's clip norm lives in its settings group: without a chunk size there is no GradCache to clip in.
    clean_error(lamra_here(*config, "--model.init_args.gradcache.clip_norm=1.0"), "chunk_size")
