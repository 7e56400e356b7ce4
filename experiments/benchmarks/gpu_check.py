"""One GPU check: every CUDA path of lamra-pl in one run, sized for under 8 minutes on one H100.

    experiments/benchmarks/gpu_check.sh                       # on a GPU machine; prints the RESULTS.md rows
    experiments/benchmarks/gpu_check.sh --dry-run             # the same steps on CPU at tiny sizes (the suite runs it)
    experiments/benchmarks/gpu_check.sh --only pipeline train # a subset of the steps

Steps, in this order (the cheapest and most telling first), each in subprocesses with a time limit taken from one
overall budget (`--budget`); a step that fails or runs out of time is a row saying so, and the next step runs:
1. `environment`: the device, its memory, and the versions of torch, transformers, lightning, peft and faiss.
2. `pipeline`: the command-line tools on the device, on the tiny M-BEIR fixture (tests/fixtures/mbeir_tiny) and a
   tiny random Qwen2-VL: `tiny-backbone`, `convert-mbeir`, `fit` (stage 2 under the FSDP2 strategy on one device,
   bf16-mixed), `index` and `retrieve` (bf16-mixed; search with the torch backend on the GPU: the faiss wheel
   installed is the CPU one), `evaluate`, `rerank` (the zero-shot judge, bf16-mixed) and `evaluate` of the reranked
   run. Each command's seconds and its status.
3. `train`: retriever fit steps at Qwen2-VL-2B's shape in bf16-mixed (`train_step.py`): samples/s, tokens/s, peak
   memory and MFU at `--train-batch-sizes` (2026-11-26, H100: 32 fits, 128 does not); the largest that fits is the
   last row before an out-of-memory row.
4. `gradcache`: GradCache at batch 1024 (chunks of 64) at the 2B shape, with 64 image and 64 text tokens per side so
   one step fits the budget: its peak memory against the batch sizes above is the point.
5. `search`: exact search (`lamra_pl.ranking.search`, torch backend on the device) of 10,000 queries over 500,000
   1536-d candidates (`search_throughput.py`).

`--dry-run` runs every step on CPU at tiny sizes (float32 where bf16 is a GPU setting; the FSDP2 strategy still on
one process), so the script cannot rot unnoticed: `tests/test_benchmarks.py` runs it.
Output in `--out`: gpu_check.jsonl (a row per command) and gpu_check.md (the Markdown rows for RESULTS.md), and
each command's log; the Markdown is also printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "mbeir_tiny"
BENCH = ROOT / "experiments" / "benchmarks"
STEPS = ("environment", "pipeline", "train", "gradcache", "search")


class Check:
    """Runs the commands of the steps against one deadline and keeps a row per command."""

    def __init__(self, out: Path, budget: float, dry_run: bool, train_batch_sizes: list[int]) -> None:
        self.out, self.dry_run, self.train_batch_sizes = out, dry_run, train_batch_sizes
        self.deadline = time.monotonic() + budget
        self.rows: list[dict[str, Any]] = []

    def run(self, step: str, name: str, command: list[str], limit: float) -> tuple[bool, str]:
        """Run one command (at most `limit` seconds, less when the budget is nearly spent); a row either way."""
        left = self.deadline - time.monotonic()
        log = self.out / f"{step}-{name}.log"
        row: dict[str, Any] = {"step": step, "command": name}
        if left < 5:
            self.rows.append({**row, "status": "not run (budget spent)", "seconds": 0.0})
            return False, ""
        start = time.perf_counter()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        }
        try:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=min(limit, left))
            output = proc.stdout + proc.stderr
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired as stopped:
            output = _text(stopped.stdout) + _text(stopped.stderr)
            status = f"timed out after {min(limit, left):.0f} s"
        seconds = time.perf_counter() - start
        log.write_text(" ".join(command) + "\n\n" + output, encoding="utf-8")
        if status != "ok":
            # the last lines that say something: the error, not the progress bars before it
            tail = [line.strip() for line in output.splitlines() if line.strip()][-3:]
            status += ": " + " / ".join(tail)[-400:]
        self.rows.append({**row, "status": status, "seconds": round(seconds, 1)})
        print(f"[{step}] {name}: {status.splitlines()[0][:200]} ({seconds:.1f} s)", flush=True)
        return status == "ok", output


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def probe() -> None:
    """The environment, as one JSON line (run in a subprocess: a broken install is a row, not a crash)."""
    import lightning
    import peft
    import torch
    import transformers

    try:
        import faiss

        found_faiss = faiss.__version__ + (" (GPU)" if hasattr(faiss, "StandardGpuResources") else " (CPU)")
    except ImportError:
        found_faiss = "not installed"
    cuda = torch.cuda.is_available()
    found = {
        "device": torch.cuda.get_device_name() if cuda else "CPU",
        "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "peft": peft.__version__,
        "faiss": found_faiss,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(found))


def environment(check: Check) -> str:
    ok, output = check.run("environment", "versions", [sys.executable, __file__, "--probe"], 120)
    if not ok:
        return "environment probe failed"
    found = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
    check.rows[-1]["found"] = found
    return ", ".join(f"{key} {value}" for key, value in found.items())


def pipeline(check: Check) -> None:
    work = check.out / "pipeline"
    tool = [sys.executable, "-m", "lamra_pl"]
    gpu = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed"]
    gpu = [] if check.dry_run else gpu
    backbone, data, runs = work / "backbone", work / "data", work / "runs"
    ckpt = runs / "tiny_stage2" / "gpu_check" / "checkpoints" / "last.ckpt"
    commands: list[tuple[str, list[str], float]] = [
        ("tiny-backbone", [*tool, "tiny-backbone", f"--out={backbone}"], 120),
        ("convert-mbeir", [*tool, "convert-mbeir", f"--root={FIXTURE}", f"--out={data}"], 120),
        (
            "fit (FSDP2, 1 device)",
            [
                *tool,
                "fit",
                "-c",
                "experiments/tiny/stage2_instruct.yaml",
                "-c",
                "experiments/strategies/fsdp2.yaml",
                f"--model.init_args.backbone.path={backbone}",
                f"--data.init_args.train_shards={data}/train",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_steps=4",
                "--trainer.log_every_n_steps=1",
                f"--trainer.logger.init_args.save_dir={runs}",
                "--trainer.logger.init_args.version=gpu_check",
                *(["--trainer.precision=32-true"] if check.dry_run else ["--trainer.accelerator=gpu"]),
                "--trainer.devices=1",
            ],
            240,
        ),
        (
            "index",
            [
                *tool,
                "index",
                f"--model={ckpt}",
                f"--pool={data}/eval/test/global_pool",
                f"--out={work}/index",
                "--batch_size=8",
                *gpu,
            ],
            120,
        ),
        (
            "retrieve",
            [
                *tool,
                "retrieve",
                f"--model={ckpt}",
                f"--index={work}/index",
                f"--queries={data}/eval/test/*_task*",
                f"--out={work}/eval",
                "--k=10",
                "--backend=torch",
                "--batch_size=8",
                *gpu,
            ],
            120,
        ),
        ("evaluate", [*tool, "evaluate", f"--runs={work}/eval/local"], 60),
        (
            "rerank (zero-shot judge)",
            [
                *tool,
                "rerank",
                f"--model={backbone}",
                "--zero_shot",
                f"--runs={work}/eval/local",
                f"--out={work}/reranked",
                "--top_n=5",
                "--batch_size=8",
                *gpu,
            ],
            120,
        ),
        ("evaluate reranked", [*tool, "evaluate", f"--runs={work}/reranked"], 60),
    ]
    for name, command, limit in commands:
        ok, _ = check.run("pipeline", name, command, limit)
        if not ok:
            return  # the later commands read this one's output


def train_step(check: Check, *args: str) -> list[str]:
    """A `train_step.py` command: the 2B shape on CUDA, or the tiny one on CPU with small inputs for --dry-run."""
    if check.dry_run:
        where = ("--shape", "tiny", "--device", "cpu", "--lora-r", "4", "--image-tokens", "16", "--text-tokens", "32")
    else:
        where = ("--shape", "2b", "--device", "cuda")
    files = ("--out", str(check.out / "train_step.jsonl"), "--cache", str(check.out / "backbones"))
    return [sys.executable, str(BENCH / "train_step.py"), *where, *args, *files]


def train(check: Check) -> None:
    sizes = ["2", "4"] if check.dry_run else [str(size) for size in check.train_batch_sizes]
    command = train_step(check, "--batch-sizes", *sizes, "--gradcache", "0", "--warmup", "1", "--steps", "2")
    _table(check, "train", "fit steps (train_step.py)", command, 330)


def gradcache(check: Check) -> None:
    batch = (
        ("--batch-sizes", "4", "--gradcache", "2") if check.dry_run else ("--batch-sizes", "1024", "--gradcache", "64")
    )
    tokens = () if check.dry_run else ("--image-tokens", "64", "--text-tokens", "64")
    # one step, no warm-up: the point is that batch 1024 fits, and its peak memory (2026-11-26, H100: the 2B
    # backbone's writing, FLOP counting and one step after a warm-up did not fit in 240 s)
    command = train_step(check, *batch, *tokens, "--warmup", "0", "--steps", "1")
    _table(check, "gradcache", "GradCache batch 1024 (train_step.py)", command, 300)


def search(check: Check) -> None:
    size = ["--queries", "200", "--candidates", "5000", "--dim", "64"]
    if not check.dry_run:
        size = ["--queries", "10000", "--candidates", "500000", "--dim", "1536"]
    command = [
        sys.executable,
        str(BENCH / "search_throughput.py"),
        *size,
        "--k",
        "50",
        "--backends",
        "torch",
        "--pool",
        str(check.out / "pool.npy"),
    ]
    _table(check, "search", "exact search (search_throughput.py)", command, 150)


def _table(check: Check, step: str, name: str, command: list[str], limit: float) -> None:
    """A benchmark script's Markdown table (and the context line before it) kept in the step's row."""
    _, output = check.run(step, name, command, limit)
    lines = output.splitlines()
    table = [line for line in lines if line.startswith("|")]
    context = [line for line in lines if line and not line.startswith(("|", "{", "[")) and "TFLOP/s" in line]
    if table:
        check.rows[-1]["table"] = context[-1:] + table


def markdown(check: Check, environment_line: str) -> str:
    lines = [
        f"### gpu_check.sh{' --dry-run' if check.dry_run else ''}, {time.strftime('%Y-%m-%d')}",
        "",
        f"Environment: {environment_line}.",
        "",
        "| step | command | status | seconds |",
        "|---|---|---|---:|",
    ]
    for row in check.rows:
        status = row["status"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['step']} | {row['command']} | {status} | {row['seconds']:.1f} |")
    for row in check.rows:
        if row.get("table"):
            lines += ["", f"{row['step']}: {row['command']}", "", *row["table"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny sizes")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the environment step's JSON
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="logs, jsonl and Markdown")
    parser.add_argument("--budget", type=float, default=470.0, help="seconds for all the steps together")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="these steps, in this order")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[64, 96], help="the train step's")
    args = parser.parse_args()
    if args.probe:
        probe()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    check = Check(args.out, args.budget, args.dry_run, args.train_batch_sizes)
    environment_line = environment(check) if "environment" in args.only else "not probed"
    functions = {"pipeline": pipeline, "train": train, "gradcache": gradcache, "search": search}
    for step in args.only:
        if step in functions:
            functions[step](check)
    with open(args.out / "gpu_check.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in check.rows)
    report = markdown(check, environment_line)
    (args.out / "gpu_check.md").write_text(report, encoding="utf-8")
    print("\n" + report)
    failed = [row for row in check.rows if row["status"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
