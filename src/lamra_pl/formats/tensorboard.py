"""A TensorBoard run folder: what a fit or an evaluation logged, read back for `lamra-pl report` and `grid`.

Layout version VERSION (a `TensorBoardLogger` version folder; `lamra-pl evaluate` writes one into each run folder):

    RUN/
      events.out.tfevents.*  scalars: `train/*`, `val/*` (validation over steps: LIVE), `eval_<pool>/*`, and the
                             final metrics `hp/<task>/<metric>` (FINAL), logged once with the hyperparameters as
                             TensorBoard hparams when a fit ends (`lamra_pl.callbacks.FinalMetrics`) or an
                             evaluation is written (`write_evaluation`)
      config.yaml            the run's hyperparameters (LightningCLI), or else
      hparams.yaml           (Lightning's own)

A run is *finished* when it has FINAL metrics. Event files that cannot be read are reported, never dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lamra_pl.errors import LamraError

VERSION = 1
FINAL = "hp/"  # final metrics, logged once
LIVE = "val/"  # validation metrics over steps
EVENTS = "events.out.tfevents.*"
# Config entries that name where and how a run was logged, not what it trained: never "varied".
IGNORED = ("trainer.logger", "trainer.callbacks", "trainer.plugins", "trainer.enable_progress_bar", "ckpt_path")


@dataclass
class Board:
    """What a TensorBoard run folder holds: its hyperparameters and scalar curves."""

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


def find_boards(root: Path) -> list[Path]:
    """Folders under `root` holding event files, config.yaml or hparams.yaml (each a run), sorted."""
    marks = [*root.rglob(EVENTS), *root.rglob("config.yaml"), *root.rglob("hparams.yaml")]
    return sorted({p.parent for p in marks if "checkpoints" not in p.parts})


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(EVENTS))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree if isinstance(tree, (int, float, str, bool)) or tree is None else json.dumps(tree)}


def read_hparams(folder: Path) -> dict[str, Any]:
    """A run's hyperparameters, flattened to dotted keys (`model.temperature`), without the logging settings."""
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


def read_board(folder: Path, root: Path) -> Board:
    """The run in `folder`, named by its path relative to `root`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = Board(str(folder.relative_to(root)) or ".", read_hparams(folder))
    files = sorted(folder.glob(EVENTS))
    if not files:
        board.problem = "no event file"
        return board
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
            board.curves.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    if problems and not board.curves:
        board.problem = "; ".join(problems)
        return board
    board.notes = problems
    for points in board.curves.values():
        points.sort(key=lambda p: p[0])
    if not any(tag.startswith((FINAL, LIVE)) for tag in board.curves):
        board.problem = "no val/ or hp/ metrics in the event files (stopped before the first validation?)"
    return board


def write_evaluation(
    folder: Path, scalars: dict[str, float], step: int, hparams: dict[str, Any], final: dict[str, float]
) -> None:
    """Log an evaluation into the run in `folder`: `scalars` at `step`, then `hparams` with `final` as FINAL
    metrics (their names without the prefix), as a fit's end logs them."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(folder), name="", version="", default_hp_metric=False)
    logger.log_metrics(scalars, step=step)
    logger.log_hyperparams(hparams, {FINAL + name: value for name, value in final.items()})
    logger.finalize("success")
