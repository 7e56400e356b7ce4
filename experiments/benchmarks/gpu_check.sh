#!/usr/bin/env bash
# One GPU check of every CUDA path (fit in bf16-mixed at the 2B shape, GradCache at batch 1024, index, retrieve and
# rerank on the GPU, the FSDP2 strategy on one GPU, exact search): run it whenever a GPU is at hand and paste the
# printed rows into experiments/benchmarks/RESULTS.md with the machine and the date. What each step does:
# experiments/benchmarks/gpu_check.py. `--dry-run` runs the same steps on CPU at tiny sizes (the test suite does).
#   experiments/benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only STEP ...]
# PYTHON picks the interpreter (default: the project's .venv, else python3); src/ is put on PYTHONPATH, so a
# checkout works without installing the package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$PYTHON" experiments/benchmarks/gpu_check.py "$@"
