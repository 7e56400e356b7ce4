"""A `fit` checkpoint works from any working directory and after its folder moves; `--backbone` finds a backbone
that moved elsewhere."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from helpers import ROOT, clean_error, lamra, lamra_here, ok
from lamra_pl.api import Retriever
from lamra_pl.formats.checkpoint import KEY

TEXTS = ["red circle", "a blue square"]


def test_a_checkpoint_moved_with_its_backbone_or_given_one_loads_anywhere(
    tiny_backbone, shape_shards, tmp_path, finding
):
    work = tmp_path / "work"
    shutil.copytree(tiny_backbone, work / "models" / "base")
    config = ROOT / "experiments" / "tiny" / "stage2_instruct.yaml"
    ok(
        lamra(
            "fit",
            "-c",
            str(config),
            "--model.init_args.backbone.path=models/base",  # relative to the run's working directory
            f"--data.init_args.train_shards={shape_shards}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=2",
            "--trainer.logger.init_args.save_dir=runs",
            cwd=work,
        )
    )
    ckpt = next((work / "runs").rglob("last.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved[KEY]["paths"] == "relative to the file"
    assert (
        saved["hyper_parameters"]["backbone"]["path"] == "../../../../models/base"
    )  # runs/tiny_stage2/version_0/checkpoints
    before = Retriever.from_checkpoint(ckpt).encode(TEXTS)  # from this process's working directory, not the run's

    moved = tmp_path / "elsewhere" / "project"
    shutil.move(work, moved)
    moved_ckpt = moved / ckpt.relative_to(work)
    np.testing.assert_array_equal(Retriever.from_checkpoint(moved_ckpt).encode(TEXTS), before)

    alone = tmp_path / "shared" / "retriever.ckpt"  # the checkpoint alone, as it travels to a colleague
    alone.parent.mkdir()
    shutil.copy(moved_ckpt, alone)
    pool = ROOT / "tests" / "fixtures" / "legacy_4ccdac6" / "data" / "eval" / "test" / "global_pool"
    index = ("index", f"--model={alone}", f"--pool={pool}", f"--out={tmp_path / 'index'}")
    clean_error(lamra_here(*index), "backbone path", "base")
    after = Retriever.from_checkpoint(alone, backbone=moved / "models" / "base").encode(TEXTS)
    np.testing.assert_array_equal(after, before)
    ok(lamra_here(*index, f"--backbone={moved / 'models' / 'base'}"))
    finding(
        "a `fit` checkpoint used from another working directory, moved with its backbone, or alone",
        "the backbone path is stored relative to the checkpoint: the same embeddings from anywhere; alone, a "
        "one-line error naming the path, and `--backbone` / `Retriever.from_checkpoint(backbone=)` find it",
    )
