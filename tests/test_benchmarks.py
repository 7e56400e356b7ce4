"""The training-step and search benchmark scripts run (so RESULTS.md's commands keep working) and report sane
figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_reports_every_configuration(tmp_path):
    out = tmp_path / "rows.jsonl"
    command = [sys.executable, str(ROOT / "experiments/benchmarks/train_step.py"), "--shape", "tiny"]
    command += ["--lora-r", "4", "--batch-sizes", "4", "--gradcache", "0", "2", "--warmup", "1", "--steps", "1"]
    command += ["--image-tokens", "16", "--text-tokens", "32", "--cache", str(tmp_path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch"], r["gradcache"]) for r in rows] == [(4, None), (4, 2)]
    for row in rows:
        assert row["samples_s"] > 0 and row["tokens_s"] > row["samples_s"] and row["peak_gb"] > 0
        assert 0 < row["mfu"] < 1, row  # model FLOPs over time over the measured matmul peak
        assert row["model_gflops_per_pair"] > 0 and row["peak_tflops"] > 0
    assert "| tiny | 4 | 2 |" in proc.stdout  # the Markdown table


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    """`gpu_check.sh --dry-run` runs the GPU check's every command on CPU at tiny sizes, so the script run on a
    lent GPU cannot rot between GPU sessions."""
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "experiments/benchmarks/gpu_check.sh"), "--dry-run", "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == ["environment"] + ["pipeline"] * 8 + ["train", "gradcache", "search"]
    assert all(row["status"] == "ok" for row in rows), rows
    assert rows[0]["found"]["device"] == "CPU"
    # the pipeline really ran: the FSDP2 fit's checkpoint was indexed, retrieved, reranked and evaluated
    results = json.loads((out / "pipeline" / "reranked" / "results.json").read_text())
    assert results
    report = (out / "gpu_check.md").read_text()
    assert report in proc.stdout
    assert "| tiny | 4 | - |" in report and "| tiny | 4 | 2 |" in report and "| torch | 200 | 5,000 |" in report


@pytest.mark.slow
def test_search_benchmark_times_raw_faiss_and_search_on_the_same_vectors(tmp_path):
    command = [sys.executable, str(ROOT / "experiments/benchmarks/search_throughput.py"), "--raw-faiss"]
    command += ["--queries", "64", "--candidates", "20000", "--dim", "128", "--k", "10", "--repeats", "2"]
    command += ["--pool", str(tmp_path / "pool.npy")]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "error"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, _, row = proc.stdout.strip().splitlines()[-3:]
    assert header.startswith("| queries | candidates | dim | k | raw faiss prep (s) | raw faiss search (s) |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["64", "20,000", "128", "10"]
    prep, raw, ours = map(float, cells[4:7])
    assert prep >= 0 and raw > 0 and ours > 0
    ratio, ratio_with_prep = float(cells[7].removesuffix("x")), float(cells[8].removesuffix("x"))
    # Seconds are printed rounded to 1 ms and the ratio to 0.001, so the printed ratio must lie inside the
    # interval that the rounding of both times allows (a few ms of search make that interval wide).
    half_ms = 0.0005
    lowest = (ours - half_ms) / (raw + half_ms)
    highest = (ours + half_ms) / max(raw - half_ms, 1e-9)
    assert lowest - 0.001 <= ratio <= highest + 0.001, (ratio, lowest, highest)
    assert 0 < ratio_with_prep <= ratio
    assert 0 <= int(cells[9]) <= 64  # queries whose top 10 differ from raw faiss's, as sets
