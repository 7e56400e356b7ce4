"""`make stage1|stage2|stage-hardneg|stage-continual` train on folders written by convert-mbeir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, scalars
from lamra_pl.recipes.mbeir import convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


STAGES = {  # target: (tiny config, Makefile variables for DATA, the data setting the run's config.yaml holds)
    "stage1": ("stage1_text", "DATA={data}", "train_shards: {data}/train/*_task1"),
    "stage2": ("stage2_instruct", "DATA={data}", "train_shards: {data}/train"),
    "stage-hardneg": ("stage2_instruct", "MINED={data}/train", "train_shards: {data}/train"),
    "stage-continual": (
        "stage_continual",
        "MINED={data}/train/emoji_task0 TEXT_DATA={data}/train/emoji_task1 TEXT_RATIO=3",
        "sources:\n      {data}/train/emoji_task0: 1.0\n      {data}/train/emoji_task1: 3.0",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_make_stage_trains_on_a_converted_folder(stage, tiny_backbone, tmp_path):
    config, variables, expected = STAGES[stage]
    data = tmp_path / "data"
    convert(str(FIXTURE), str(data))
    runs = tmp_path / "runs"
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            stage,
            f"VENV={venv}",
            *variables.format(data=data).split(),
            f"CONFIG=experiments/tiny/{config}.yaml",
            f"BACKBONE={tiny_backbone}",
            f"ARGS=--trainer.max_steps=2 --trainer.log_every_n_steps=1 --data.init_args.batch_size=4 "
            f"--trainer.logger.init_args.save_dir={runs}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = next((runs).glob("tiny_*/version_0"))
    logged = scalars(run)
    assert len(logged["train/loss"]) >= 1
    assert expected.format(data=data) in (run / "config.yaml").read_text()
