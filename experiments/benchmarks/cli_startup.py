"""How long `lamra-pl` takes to answer what needs no model: `--help`, `--version`, a tool's `--help`.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/benchmarks/cli_startup.py [--repeats 5]

Runs the installed console script (the command users type) `repeats` times per command after one warm-up run
(which fills the OS file cache) and prints a Markdown table of the median and the spread of wall-clock seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAMRA = str(Path(sys.executable).parent / "lamra-pl")
COMMANDS = (("--help",), ("--version",), ("index", "--help"), ("fit", "--help"))


def seconds(args: tuple[str, ...]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([LAMRA, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"lamra-pl {' '.join(args)} failed: {proc.stderr[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for args in COMMANDS:
        seconds(args)  # warm-up
        runs = [seconds(args) for _ in range(repeats)]
        print(f"| `lamra-pl {' '.join(args)}` | {statistics.median(runs):.2f} | {min(runs):.2f} | {max(runs):.2f} |")


if __name__ == "__main__":
    main()
