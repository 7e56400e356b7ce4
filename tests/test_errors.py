"""Bad input gets a one-line error naming the problem, never a deep stack trace; unreadable images are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from conftest import text_to_image_samples
from helpers import lamra, scalars
from lamra_pl.data.evaluation import eval_pipeline
from lamra_pl.formats.sample import SKIP_REASONS
from lamra_pl.formats.shards import write_shards
from lamra_pl.models.backbone import BackboneSpec
from lamra_pl.models.embedding import EmbeddingModule

TINY = "experiments/tiny/stage2_instruct.yaml"


def fit_tiny(backbone: Path, shards: Path, runs: Path, steps: int):
    return lamra(
        "fit",
        "-c",
        TINY,
        f"--model.init_args.backbone.path={backbone}",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=4",
        f"--trainer.max_steps={steps}",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={runs}",
    )


def assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def test_missing_backbone_path(tmp_path):
    proc = lamra("fit", "-c", TINY, f"--model.init_args.backbone.path={tmp_path / 'nope'}", "--trainer.max_steps=1")
    assert_clean_error(proc, "backbone path", "nope", "does not exist")


def test_config_key_that_does_not_exist(tiny_backbone):
    proc = lamra(
        "fit", "-c", TINY, f"--model.init_args.backbone.path={tiny_backbone}", "--model.init_args.tempreature=0.1"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tempreature" in proc.stderr


def test_config_file_key_that_does_not_exist(tiny_backbone, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_sise: 4\n")
    proc = lamra("fit", "-c", TINY, "-c", str(bad), f"--model.init_args.backbone.path={tiny_backbone}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "batch_sise" in proc.stderr


@pytest.mark.slow
def test_training_sample_without_positive_is_skipped_named_and_counted(tiny_backbone, tmp_path):
    shards = tmp_path / "shards"
    samples = text_to_image_samples()
    record = json.loads(samples[3]["json"])
    record["positives"] = []
    samples[3]["json"] = json.dumps(record).encode()
    write_shards(samples, shards)
    proc = fit_tiny(tiny_backbone, shards, tmp_path / "runs", steps=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard-000000.tar, sample 'q00_003': qid q0:3 has no positive candidate" in proc.stderr
    logged = scalars(tmp_path / "runs" / "tiny_stage2" / "version_0")["data/skipped_bad_sample"]
    assert logged[-1][1] == proc.stderr.count("(bad_sample)") >= 1  # each skip printed once, and counted


def broken_image_shards(folder: Path) -> Path:
    samples = text_to_image_samples()
    samples[5]["pos0.png"] = b"\x89PNG\r\n\x1a\n this is not an image"
    write_shards(samples, folder)
    return folder


def test_unreadable_image_is_skipped_and_counted_exactly_once(tiny_backbone, tmp_path):
    shards = broken_image_shards(tmp_path / "shards")
    collate = EmbeddingModule(BackboneSpec(tiny_backbone)).collator()
    pipeline = eval_pipeline(
        [str(shards / "shard-000000.tar")], batch_size=5, collate=collate, num_negatives=0, rank=0, world=1
    )
    batches = list(wds.WebLoader(pipeline, batch_size=None, num_workers=0))
    seen = [q for b in batches for q in b["query_ids"]]
    skipped = sum(b["skipped"][SKIP_REASONS.index("unreadable_image")].item() for b in batches)
    assert skipped == 1
    assert len(seen) == 11 and len(set(seen)) == 11 and "q0:5" not in seen


@pytest.mark.slow
def test_unreadable_image_does_not_crash_training_and_is_logged(tiny_backbone, tmp_path):
    shards = broken_image_shards(tmp_path / "shards")
    runs = tmp_path / "runs"
    proc = fit_tiny(tiny_backbone, shards, runs, steps=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "q00_005" in proc.stderr and "not a readable image" in proc.stderr
    logged = scalars(runs / "tiny_stage2" / "version_0")["data/skipped_unreadable_image"]
    assert logged[-1][1] >= 1
    assert "training samples skipped: {'unreadable_image': " in proc.stderr + proc.stdout
