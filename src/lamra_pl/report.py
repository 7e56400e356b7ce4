"""`lamra-pl report --runs RUNS_DIR`: compare training runs from what they wrote, not from what they printed.

A run is a folder with TensorBoard event files (a `TensorBoardLogger` version folder); its hyperparameters are its
`config.yaml` (LightningCLI) or else its `hparams.yaml`. The report is a Markdown table (one row per run; columns:
the hyperparameters that differ between runs, then every retrieval metric, best per column in bold) and two
plots, written into RUNS_DIR.

A run is *finished* when `FinalMetrics` logged its `hp/*` metrics at the end of fit; its row shows those. An
unfinished run (still training, or killed) shows its last `val/*` values and is marked. A run whose event files
cannot be read is listed with the reason, never dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lamra_pl.errors import LamraError

FINAL = "hp/"  # final metrics, logged once by FinalMetrics
LIVE = "val/"  # validation metrics over steps
# Config entries that name where and how a run was logged, not what it trained: never "varied".
IGNORED = ("trainer.logger", "trainer.callbacks", "trainer.plugins", "trainer.enable_progress_bar", "ckpt_path")


class FinalMetrics(Callback):
    """At the end of a successful fit, log the hyperparameters once with the final `val/*` metrics as `hp/*`
    (TensorBoard's HParams tab; use `TensorBoardLogger(default_hp_metric=False)`)."""

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted or not isinstance(trainer.logger, TensorBoardLogger):
            return
        metrics = {
            FINAL + name[len(LIVE) :]: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(LIVE)
        }
        hparams = {**pl_module.hparams, **(trainer.datamodule.hparams if trainer.datamodule else {})}
        trainer.logger.log_hyperparams(hparams, metrics)


@dataclass
class Run:
    name: str
    hparams: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    problem: str | None = None  # why its events could not be read
    notes: list[str] = field(default_factory=list)  # damaged event files beside readable ones

    @property
    def finished(self) -> bool:
        return any(tag.startswith(FINAL) for tag in self.curves)

    @property
    def status(self) -> str:
        if self.problem:
            return self.problem
        return "; ".join(["finished" if self.finished else "unfinished", *self.notes])

    def metrics(self) -> dict[str, float]:
        """Metric name (without prefix) -> final value: `hp/*` if finished, else the last `val/*` value."""
        prefix = FINAL if self.finished else LIVE
        return {tag[len(prefix) :]: points[-1][1] for tag, points in self.curves.items() if tag.startswith(prefix)}


def find_runs(root: Path) -> list[Path]:
    """Folders under `root` holding event files, config.yaml or hparams.yaml (each a run), sorted."""
    marks = [*root.rglob("events.out.tfevents.*"), *root.rglob("config.yaml"), *root.rglob("hparams.yaml")]
    return sorted({p.parent for p in marks if "checkpoints" not in p.parts})


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree if isinstance(tree, (int, float, str, bool)) or tree is None else json.dumps(tree)}


def read_hparams(folder: Path) -> dict[str, Any]:
    for name in ("config.yaml", "hparams.yaml"):
        path = folder / name
        if path.is_file():
            try:
                tree = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise LamraError(f"{path}: not valid YAML ({err})") from None
            flat = flatten(tree)
            # init_args is how LightningCLI nests a class's arguments; it says nothing to a reader.
            flat = {k.replace(".init_args.", ".").replace("class_path", "class"): v for k, v in flat.items()}
            return {k: v for k, v in flat.items() if not k.startswith(IGNORED)}
    return {}


def read_run(folder: Path, root: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(str(folder.relative_to(root)) or ".", read_hparams(folder))
    files = sorted(folder.glob("events.out.tfevents.*"))
    if not files:
        run.problem = "no event file"
        return run
    problems = []
    for path in files:
        size = path.stat().st_size
        if size == 0:
            problems.append(f"{path.name}: empty event file")
            continue
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        try:
            events.Reload()
            events.FirstEventTimestamp()  # every event file starts with a version record
        except Exception as err:  # no readable record (tensorboard skips damaged ones with a warning)
            problems.append(f"{path.name}: damaged event file, no readable record in {size} bytes ({err})")
            continue
        for tag in events.Tags()["scalars"]:
            run.curves.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    if problems and not run.curves:
        run.problem = "; ".join(problems)
        return run
    run.notes = problems
    for points in run.curves.values():
        points.sort(key=lambda p: p[0])
    if not any(tag.startswith((FINAL, LIVE)) for tag in run.curves):
        run.problem = "no val/ or hp/ metrics in the event files (stopped before the first validation?)"
    return run


def varied(runs: list[Run]) -> list[str]:
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


def table(runs: list[Run]) -> str:
    keys = varied(runs)
    metrics = sorted({m for r in runs for m in r.metrics()}, key=metric_order)
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


def plot(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = [(r, tag) for r in runs for tag in sorted(r.curves) if tag.startswith(LIVE + "average/")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r, tag in curves:
            steps, values = zip(*r.curves[tag], strict=True)
            ax.plot(steps, [100 * v for v in values], marker="o", label=f"{r.name} {tag[len(LIVE) :]}")
        ax.set(xlabel="step", ylabel="Recall (%)", title="validation Recall, average over tasks")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "val_recall.png", dpi=120)
        plt.close(fig)
        written.append(out / "val_recall.png")
    finals = [(r, r.metrics()) for r in runs if not r.problem]
    names = sorted({m for _, ms in finals for m in ms if m.startswith("average/")}, key=metric_order)
    if finals and names:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(finals)
        for i, (r, ms) in enumerate(finals):
            xs = [j + i * width for j in range(len(names))]
            label = r.name + ("" if r.finished else " (unfinished)")
            ax.bar(xs, [100 * ms.get(m, 0.0) for m in names], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [m.split("/")[-1] for m in names])
        ax.set(ylabel="Recall (%)", title="final average Recall")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "final_average.png", dpi=120)
        plt.close(fig)
        written.append(out / "final_average.png")
    return written


def report(root: str | Path) -> dict[str, Any]:
    """Write RUNS_DIR/report.md, report.json and the plots; return what was written."""
    base = Path(root)
    if not base.is_dir():
        raise LamraError(f"runs folder {str(root)!r} does not exist")
    runs = [read_run(folder, base) for folder in find_runs(base)]
    if not runs:
        raise LamraError(f"{base}: no runs found (no TensorBoard event files, config.yaml or hparams.yaml)")
    text = table(runs)
    (base / "report.md").write_text(text)
    exact = {r.name: {"status": r.status, "hparams": r.hparams, "metrics": r.metrics()} for r in runs}
    (base / "report.json").write_text(json.dumps(exact, indent=1, sort_keys=True))
    plots = plot(runs, base)
    return {"table": text, "runs": exact, "files": [str(base / "report.md"), *map(str, plots)]}
