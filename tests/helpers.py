"""Running the real `lamra-pl` console script and reading TensorBoard event files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
LAMRA = str(Path(sys.executable).parent / "lamra-pl")
FAULTS = ROOT / "tests" / "faults"  # inject.py: callbacks that inject faults into a real run


def lamra(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([LAMRA, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def fit_tiny_with_callbacks(folder: Path, callbacks: list[dict], *args: str) -> subprocess.CompletedProcess:
    """`lamra-pl fit` of the tiny stage-2 config with `trainer.callbacks` replaced by `callbacks` (class paths
    may name `inject.*`), plus `args`."""
    folder.mkdir(parents=True, exist_ok=True)
    overlay = folder / f"callbacks-{len(list(folder.glob('callbacks-*')))}.yaml"
    overlay.write_text(json.dumps({"trainer": {"callbacks": callbacks}}))
    config = ("-c", "experiments/tiny/stage2_instruct.yaml", "-c", str(overlay))
    return lamra("fit", *config, *args, env={"PYTHONPATH": str(FAULTS)})


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def lamra_here(*args: str) -> subprocess.CompletedProcess:
    """`lamra-pl ARGS` in this process (no start-up cost): exit code and what it printed."""
    from lamra_pl.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`proc` if it succeeded, else a failure showing what it printed."""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """`proc` failed with lamra-pl's one-line user error (exit 2, no traceback) that names every needle."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]
