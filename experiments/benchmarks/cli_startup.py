"""How long `lamra-pl` takes to answer what needs no model: `--help`, `--version`, a tool's `--help`, a mistake in a
tool's arguments.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/cli_startup.py [--repeats 5]

Runs the installed console script (the command users type) `repeats` times per command after one warm-up run
(which fills the OS file cache) and prints a Markdown table of the median and the spread of wall-clock seconds,
after the line naming the lamra_pl it runs (PYTHONPATH picks another checkout's).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAMRA = str(Path(sys.executable).parent / "lamra-pl")
# (arguments, the exit status they end with)
COMMANDS: tuple[tuple[tuple[str, ...], int], ...] = (
    (("--help",), 0),
    (("--version",), 0),
    *(((tool, "--help"), 0) for tool in ("index", "retrieve", "rerank", "search", "export", "convert-mbeir")),
    (("tiny-backbone", "--help"), 0),
    (("index", "--model=m", "--pool=p", "--out=o", "--trainer.devicez=2"), 2),  # an unknown option: one line
    (("fit", "--help"), 0),
)


def seconds(args: tuple[str, ...], status: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run([LAMRA, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != status:
        raise SystemExit(f"lamra-pl {' '.join(args)} ended with {proc.returncode}: {proc.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    where = subprocess.run([sys.executable, "-c", "import lamra_pl; print(lamra_pl.__file__)"], capture_output=True)
    print(f"lamra_pl: {where.stdout.decode().strip()}\n")
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for args, status in COMMANDS:
        seconds(args, status)  # warm-up
        runs = [seconds(args, status) for _ in range(repeats)]
        print(f"| `lamra-pl {' '.join(args)}` | {statistics.median(runs):.2f} | {min(runs):.2f} | {max(runs):.2f} |")


if __name__ == "__main__":
    main()
