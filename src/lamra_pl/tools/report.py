"""`lamra-pl report --runs RUNS_DIR`: compare training runs from what they wrote, not from what they printed.

A run is a TensorBoard run folder (`lamra_pl.formats.tensorboard`: event files, and config.yaml or hparams.yaml).
The report is a Markdown table (one row per run; columns: the hyperparameters that differ between runs, then every
retrieval metric, best per column in bold) and two plots, written into RUNS_DIR; the plots also as images of the
TensorBoard run RUNS_DIR/report_plots (`REPORT_RUN`, rewritten each time). It prints a compact table: each run's
status and average columns (the full table is report.md).

A run is *finished* when `lamra_pl.callbacks.FinalMetrics` logged its `hp/*` metrics at the end of fit (or
`lamra-pl evaluate` did); its row shows those. An unfinished run (still training, or killed) shows its last `val/*`
values and is marked. A run whose event files cannot be read is listed with the reason, never dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.formats.tensorboard import EVENTS, LIVE, REPORT_RUN, Board, find_boards, read_board


def varied(runs: list[Board]) -> list[str]:
    """The hyperparameters that take more than one value among the runs that have them. A key only some runs
    have (another model class's arguments) is not a difference by itself: the class column shows that one."""
    keys = sorted({k for r in runs for k in r.hparams})
    return [k for k in keys if len({json.dumps(r.hparams[k], sort_keys=True) for r in runs if k in r.hparams}) > 1]


def metric_order(name: str) -> tuple[int, str, float, str]:
    """average first, then tasks alphabetically; within each, R@1 < R@5 < R@10 (numerically), then the others by
    name."""
    group, _, metric = name.rpartition("/")
    k = float(metric[2:]) if metric.startswith("R@") and metric[2:].isdigit() else math.inf
    return (0 if group == "average" else 1, group, k, metric)


def table(runs: list[Board], averages_only: bool = False) -> str:
    """The report's Markdown table; `averages_only`: the run, its status and the average columns (the terminal's)."""
    keys = [] if averages_only else varied(runs)
    metrics = sorted({m for r in runs for m in r.metrics()}, key=metric_order)
    if averages_only:
        metrics = [m for m in metrics if m.startswith("average/")]
    best = {
        # Lower is better for a loss and the modality bias; higher for Recall and accuracies.
        m: (min if _lower_is_better(m) else max)((r.metrics()[m] for r in runs if m in r.metrics()), default=None)
        for m in metrics
    }
    head = ["run", "status", *keys, *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        values = r.metrics()
        cells = [r.name, r.status, *(str(r.hparams.get(k, "")) for k in keys)]
        for m in metrics:
            value = values.get(m)
            text = "" if value is None else _cell(m, value)
            cells.append(f"**{text}**" if value is not None and value == best[m] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _lower_is_better(metric: str) -> bool:
    return metric.endswith("loss") or metric.rsplit("/", 1)[-1].startswith("wrong_modality")


def _cell(metric: str, value: float) -> str:
    """Recall, accuracies and shares in %, as the papers print them; anything else (a loss) as it is."""
    name = metric.rsplit("/", 1)[-1]
    percent = name.startswith(("R@", "wrong_modality")) or "acc" in name or name == "reported"
    return f"{100 * value:.2f}" if percent else f"{value:.4g}"


def figures(runs: list[Board]) -> dict[str, Any]:
    """The report's plots as matplotlib figures, by name: `val_recall` (the validation average over steps) and
    `final_average` (each run's final average Recall, one row of bars per run); a plot without data is left out.
    Both grow with the number of runs and keep their legends outside the axes, so that a grid of many runs stays
    readable (and matplotlib has no margins to give up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    curves = [(r, tag) for r in runs for tag in sorted(r.curves) if tag.startswith(LIVE + "average/")]
    if curves:
        fig, ax = plt.subplots(figsize=(10, max(4.0, 0.2 * len(curves) + 1)), layout="constrained")
        for r, tag in curves:
            steps, values = zip(*r.curves[tag], strict=True)
            ax.plot(steps, [100 * v for v in values], marker="o", label=f"{r.name} {tag[len(LIVE) :]}")
        ax.set(xlabel="step", ylabel="Recall (%)", title="validation Recall, average over tasks")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out["val_recall"] = fig
    finals = [(r, r.metrics()) for r in runs if not r.problem]
    names = sorted({m for _, ms in finals for m in ms if m.startswith("average/")}, key=metric_order)
    if finals and names:
        fig, ax = plt.subplots(figsize=(10, max(3.0, 0.12 * len(finals) * len(names) + 1.2)), layout="constrained")
        height = 0.8 / len(names)
        rows = list(reversed(finals))  # the first run at the top
        for j, m in enumerate(names):
            ys = [i + 0.4 - (j + 0.5) * height for i in range(len(rows))]
            ax.barh(ys, [100 * ms.get(m, 0.0) for _, ms in rows], height, label=m.split("/")[-1])
        labels = [r.name + ("" if r.finished else " (unfinished)") for r, _ in rows]
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set(xlabel="Recall (%)", title="final average Recall")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        out["final_average"] = fig
    return out


def plot(runs: list[Board], out: Path) -> list[Path]:
    """The plots as PNG files in `out` and as images (`report/<name>`) of the TensorBoard run `out/REPORT_RUN`,
    whose earlier event files are replaced; returns the PNG files."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    drawn = figures(runs)
    board = out / REPORT_RUN
    for old in board.glob(EVENTS) if board.is_dir() else []:  # this report's own run: one set of figures
        old.unlink()
    written: list[Path] = []
    if not drawn:
        return written
    with SummaryWriter(str(board)) as writer:
        for name, fig in drawn.items():
            fig.savefig(out / f"{name}.png", dpi=120)
            writer.add_figure(f"report/{name}", fig, global_step=0, close=False)
            plt.close(fig)
            written.append(out / f"{name}.png")
    return written


def report(runs: str) -> dict[str, Any]:
    """Compare the training runs under a folder: a Markdown table and PNG plots, written into that folder.

    Reads each run's TensorBoard event files and config.yaml (or hparams.yaml), not its console output. Rows:
    runs (finished, unfinished, or unreadable with the reason); columns: the hyperparameters that differ, then
    the final Recall per task and averaged (best in bold).

    Args:
        runs: a folder of runs, e.g. runs/ or runs/ablations (searched recursively).
    """
    base = Path(runs)
    if not base.is_dir():
        raise LamraError(f"runs folder {str(runs)!r} does not exist")
    boards = [read_board(folder, base) for folder in find_boards(base)]
    if not boards:
        raise LamraError(f"{base}: no runs found (no TensorBoard event files, config.yaml or hparams.yaml)")
    text = table(boards)
    (base / "report.md").write_text(text)
    exact = {r.name: {"status": r.status, "hparams": r.hparams, "metrics": r.metrics()} for r in boards}
    (base / "report.json").write_text(json.dumps(exact, indent=1, sort_keys=True))
    plots = plot(boards, base)
    files = [str(base / "report.md"), *map(str, plots)]
    print(table(boards, averages_only=True))
    print(f"{base / 'report.md'}: the full table (the hyperparameters that differ, every task)")
    print("\n".join(map(str, plots)))
    if plots:
        print(f"{base / REPORT_RUN}: the plots in TensorBoard")
    return {"table": text, "runs": exact, "files": files}
