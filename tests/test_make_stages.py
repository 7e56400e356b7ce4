"""`make stage1 DATA=...` and `make stage2 DATA=...` train on any folder written by convert-mbeir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_recipes.mbeir import convert
from helpers import ROOT, scalars

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


@pytest.mark.slow
@pytest.mark.parametrize("stage,config", [("stage1", "stage1_text"), ("stage2", "stage2_instruct")])
def test_make_stage_trains_on_a_converted_folder(stage, config, tiny_backbone, tmp_path):
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
            f"DATA={data}",
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
    logged = scalars(runs / f"tiny_{stage}" / "version_0")
    assert len(logged["train/loss"]) >= 1
    config_used = (runs / f"tiny_{stage}" / "version_0" / "config.yaml").read_text()
    expected = f"{data}/train/*_task1" if stage == "stage1" else f"{data}/train"
    assert f"train_shards: {expected}" in config_used
