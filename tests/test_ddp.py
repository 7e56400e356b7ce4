"""Two gloo DDP processes give the same loss and LoRA gradients as one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "ddp_grads.py"


def run(backbone: Path, out: Path, devices: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(backbone), str(out), str(devices)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_concatenated_batch(tiny_backbone, tmp_path):
    single = run(tiny_backbone, tmp_path / "one.safetensors", 1)
    double = run(tiny_backbone, tmp_path / "two.safetensors", 2)
    assert single.keys() == double.keys()
    lora = [k for k in single if "lora_" in k]
    assert len(lora) == 28  # 7 projections x 2 layers x (A, B)
    torch.testing.assert_close(double["__loss__"], single["__loss__"], atol=1e-5, rtol=0)
    for name in lora:
        assert single[name].abs().max() > 1e-6, f"{name}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(double[name], single[name], atol=1e-5, rtol=1e-4, msg=name)
