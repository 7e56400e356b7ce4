"""Quiet and progress: the demo's commands print no warning of lamra-pl's (run with them as errors), no upstream
warning or Trainer banner in a tool, no carriage-return frame in a log, and progress lines with a count and a rate.

The commands run as `make demo` runs them, with stdout and stderr captured (not a terminal), on the tiny model and
the tiny M-BEIR fixture: convert-mbeir, fit (LoRA, so peft's code paths run), merge, index, retrieve, evaluate,
rerank, search.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import THREADS
from helpers import ROOT
from lamra_pl.progress import LogLines, progress

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
# `lamra-pl ARGS` with lamra-pl's own warnings as errors: a warning attributed to a lamra_pl module (raised there,
# or an upstream deprecation it calls) fails the command with a traceback. Every other warning keeps Python's
# default handling, as in `make demo`, and so shows in the output the tests read.
RUNNER = (
    "import sys, warnings\n"
    "warnings.filterwarnings('error', module=r'lamra_pl(\\.|$)')\n"
    "from lamra_pl.cli import main\n"
    "main(sys.argv[1:])\n"
)
WARNING = re.compile(r"Warning\b|warnings\.warn")
BANNER = re.compile(r"GPU available|TPU available|HPU available|LOCAL_RANK|Initializing distributed|💡|Tip:")
TOOLS = ("convert-mbeir", "merge", "index", "retrieve", "evaluate", "rerank", "search")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the suite's helpers silence warnings
    env["OMP_NUM_THREADS"] = str(THREADS)
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def demo(tiny_backbone, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """The demo's commands on the fixture, each one's output by name."""
    root = tmp_path_factory.mktemp("quiet")
    data, tb, index, runs = root / "data", root / "tb", root / "index", root / "runs"
    ran = {"convert-mbeir": run("convert-mbeir", f"--root={FIXTURE}", f"--out={data}")}
    ran["fit"] = run(
        "fit",
        "-c",
        "experiments/tiny/stage2_instruct.yaml",
        f"--model.init_args.backbone.path={tiny_backbone}",
        f"--data.init_args.train_shards={data}/train",
        "--data.init_args.batch_size=4",
        "--trainer.max_steps=4",
        "--trainer.log_every_n_steps=2",
        f"--trainer.logger.init_args.save_dir={tb}",
    )
    ckpt = tb / "tiny_stage2" / "version_0" / "checkpoints" / "last.ckpt"
    ran["merge"] = run("merge", f"--ckpt={ckpt}", f"--out={root / 'merged'}")
    ran["index"] = run(
        "index", f"--model={ckpt}", f"--pool={data}/eval/test/global_pool", f"--out={index}", "--batch_size=2"
    )
    queries = f"--queries={data}/eval/test/*_task*"
    ran["retrieve"] = run("retrieve", f"--model={ckpt}", f"--index={index}", queries, f"--out={runs}", "--k=10")
    ran["evaluate"] = run("evaluate", f"--runs={runs / 'local'}")
    # the bare backbone has no lamra-pl settings file: its settings stated, as the demo states them (else a warning)
    stated = (
        "--settings.rope=model --settings.max_text_tokens=256 --settings.min_pixels=3136 --settings.max_pixels=12544"
        " --settings.system_prompt=default"
    )
    ran["rerank"] = run(
        "rerank",
        f"--model={tiny_backbone}",
        f"--runs={runs / 'local'}",
        f"--out={root / 'reranked'}",
        "--top_n=3",
        *stated.split(),
    )
    ran["search"] = run("search", f"--model={ckpt}", f"--index={index}", "--text=red circle", "--k=2")
    return ran


def test_no_warning_banner_or_frame_in_the_demo_commands(demo):
    for name, proc in demo.items():
        output = proc.stdout + proc.stderr
        assert not WARNING.search(output), (name, output[-3000:])  # ours are errors; upstream ones are filtered
        assert "\r" not in output, (name, output[-3000:])  # a log gets lines, never a bar's frames
        tips = [line for line in output.splitlines() if "💡" in line or "Tip:" in line]
        assert not tips, (name, tips)
        if name in TOOLS:
            assert not BANNER.search(output), (name, output[-3000:])  # a tool's Trainer prints no banner
    assert "GPU available" in demo["fit"].stdout + demo["fit"].stderr  # fit keeps Lightning's device line


RATE = r"[\d.,]+ {unit}/s, \d\d:\d\d elapsed"


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("index", r"^index: \d+/13 candidates \(\d+%\), " + RATE.format(unit="candidates")),
        ("retrieve", r"^retrieve: encoding queries: \d+/\d+ queries \(\d+%\), " + RATE.format(unit="queries")),
        ("rerank", r"^rerank: \d+/\d+ pairs \(\d+%\), " + RATE.format(unit="pairs")),
        ("convert-mbeir", r"^convert-mbeir: reading: \d+ lines, " + RATE.format(unit="lines")),
        ("convert-mbeir", r"^convert-mbeir: writing: \d+ samples, " + RATE.format(unit="samples")),
        ("fit", r"^fit: 4/4 steps \(100%\), " + RATE.format(unit="steps") + r", train/loss [\d.]+$"),
    ],
)
def test_progress_lines_in_a_log_have_a_count_and_a_rate(demo, name, pattern):
    output = demo[name].stdout + demo[name].stderr
    lines = [line for line in output.splitlines() if re.search(pattern, line)]
    assert lines, (pattern, output[-3000:])
    if name == "index":  # the last line is the whole pool, once
        assert [line for line in output.splitlines() if line.startswith("index: 13/13")] == [lines[-1]]


def test_log_lines_at_each_tenth_and_at_the_end():
    out = io.StringIO()
    with LogLines(total=100, desc="job", unit="items", file=out, min_gap=0) as bar:
        for _ in range(100):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 2)[1] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert all(re.match(r"job: \d+/100 items \(\d+%\), [\d.,e+]+ items/s, 00:00 elapsed", line) for line in lines)
    # unknown total: only the closing line (a minute apart otherwise), with the count
    out = io.StringIO()
    bar = LogLines(desc="job", unit="rows", file=out)
    for _ in range(5):
        bar.update(1)
    bar.close()
    bar.close()  # once
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("job: 5 rows, ")


def test_a_terminal_gets_a_live_bar_and_a_log_gets_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    with progress(total=3, desc="index", unit="candidates", file=terminal) as bar:
        bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()  # tqdm, redrawn in place
    with progress(total=3, desc="index", unit="candidates", file=log) as bar:
        bar.update(3)
    assert "\r" not in log.getvalue() and log.getvalue().startswith("index: 3/3 candidates (100%), ")
