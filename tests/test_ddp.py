"""Exact gradients across processes and chunks (lightning.md section 3).

Two gloo DDP processes give the same loss and gradients as one process on the concatenated batch, and GradCache
(`model.gradcache.chunk_size`) gives the same gradients as encoding the batch on one graph, in one process or
two, with and without LoRA dropout, and with every loss option (`LossSpec`) on. The skipped-sample counts are
summed over the processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import one_step_grads, scalars

SKIPS = Path(__file__).parent / "scripts" / "ddp_skips.py"

Grads = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def step_grads(tiny_backbone, tmp_path_factory) -> Callable[..., Grads]:
    """`(devices, mode, lora_dropout, strategy="ddp", loss="plain") -> gradients of one step` (see
    scripts/ddp_grads.py), each run once."""
    return one_step_grads(tiny_backbone, tmp_path_factory.mktemp("grads"))


def assert_same_step(got: Grads, want: Grads) -> None:
    """The same loss and gradients, for every tensor `got` has (FSDP2 runs have no learnable temperature)."""
    assert got.keys() <= want.keys()
    assert len([k for k in got if "lora_" in k]) == 28  # 7 projections x 2 layers x (A, B)
    torch.testing.assert_close(got["__loss__"], want["__loss__"], atol=1e-5, rtol=0)
    for name in got.keys() - {"__loss__"}:
        assert want[name].abs().max() > 1e-6, f"{name}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_concatenated_batch(step_grads):
    assert_same_step(step_grads(2, "full", 0.0), step_grads(1, "full", 0.0))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_gradcache_gradients_equal_the_full_batch_gradients(step_grads, devices):
    assert_same_step(step_grads(devices, "gradcache", 0.0), step_grads(1, "full", 0.0))


@pytest.mark.slow
def test_gradcache_under_fsdp2_equals_the_full_batch_gradients(step_grads):
    assert_same_step(step_grads(2, "gradcache", 0.0, "fsdp2"), step_grads(1, "full", 0.0))


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "mode"), [(2, "full"), (1, "gradcache"), (2, "gradcache")])
def test_every_loss_option_keeps_ddp_and_gradcache_exact(step_grads, devices, mode):
    """With every `LossSpec` option on (false-negative margin, query-query and candidate-candidate terms, hardness
    weighting, per-task temperatures, Matryoshka sizes): 2 processes, and GradCache in 1 or 2, give the loss and
    gradients of one process on the whole batch, the per-task and shared temperatures' included."""
    want = step_grads(1, "full", 0.0, "ddp", "options")
    assert_same_step(step_grads(devices, mode, 0.0, "ddp", "options"), want)
    assert want["task_log_logit_scale"].shape == (3,) and (want["task_log_logit_scale"].abs() > 1e-6).all()
    assert want["log_logit_scale"].abs() > 1e-6  # query 3 has no task: the shared temperature
    assert abs(want["__loss__"] - step_grads(1, "full", 0.0)["__loss__"]) > 0.1, "the options changed nothing"


@pytest.mark.slow
# 2 processes only with LAMRA_ALL_TESTS=1: each rank restores its own RNG states, so they add no code path over
# 1 process, and two more 2-process runs would push `make test` past its time budget.
@pytest.mark.parametrize("devices", [1, 2] if os.environ.get("LAMRA_ALL_TESTS") else [1])
def test_gradcache_replays_the_dropout_draws_of_each_chunk(step_grads, devices):
    # The reference encodes the same chunks in the same order on one graph, so it draws the same dropout masks
    # as GradCache's no-graph pass; the re-encoding must replay them (without the per-chunk RNG restore the
    # gradients differ by several units).
    with_dropout = step_grads(devices, "gradcache", 0.1)
    assert_same_step(with_dropout, step_grads(devices, "chunked", 0.1))
    without = step_grads(1, "full", 0.0)
    assert not torch.allclose(with_dropout["__loss__"], without["__loss__"]), "dropout was not active"


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_skip_counts_are_summed_over_ranks_and_logged_from_the_first_skip(devices, tmp_path):
    """Rank 1 skips 2 samples in its third batch, rank 0 one in its fifth: the logged totals are the sums over
    ranks, each reason from the step of its first skip on; reasons never met log nothing. Ranks logging
    different reasons must not wait on each other (the run would hang until the gloo timeout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(SKIPS), str(run), str(devices)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {t: v for t, v in scalars(run).items() if t.startswith("data/")}
    assert logged == {
        "data/skipped_bad_sample": [(step, 2.0) for step in range(2, 6)],
        "data/skipped_unreadable_image": [(4, 1.0), (5, 1.0)],
    }
    assert "training samples skipped: {'unreadable_image': 1, 'oversized_image': 0, 'bad_sample': 2," in (
        proc.stdout + proc.stderr
    )
