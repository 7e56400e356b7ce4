"""A TensorBoard run folder: what a fit or an evaluation logged, read back for `lamra-pl report` and `grid`.

Layout version VERSION (a `TensorBoardLogger` version folder; `lamra-pl evaluate` writes one into each run folder):

    RUN/
      events.out.tfevents.*  scalars: `train/*`, `val/*` (validation over steps: LIVE), `eval_<pool>/*`, and the
                             final metrics `hp/<task>/<metric>` (FINAL), logged once, at the run's last training
                             step, when a fit ends (`lamra_pl.callbacks.FinalMetrics`) or an evaluation is written
                             (`write_evaluation`: the evaluated checkpoint's step); with them the run's
                             hyperparameters as a TensorBoard HParams session (`write_session`)
      config.yaml            the run's hyperparameters (LightningCLI), or else
      hparams.yaml           (Lightning's own)

A run is *finished* when it has FINAL metrics. Event files that cannot be read are reported, never dropped.

HParams sessions are written without TensorBoard's "experiment" summary, on purpose: TensorBoard takes the first
experiment summary it finds in a log folder as the list of metric columns for every run, so fits (training
scalars) and evaluations (`hp/*`) logged side by side could not be compared. Without one, the HParams tab builds
its columns from every session's hyperparameters and every scalar of the session runs, each at its last value.
TensorBoard reads one session per run, the first: an evaluation logged into a fit (`lamra-pl evaluate --log_to`)
adds its numbers to the fit's row, under the fit's own session.

`lamra-pl report` writes its plots as images into the run REPORT_RUN of the folder it compares, which is not a run
of its own (`find_boards` leaves it out).
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
REPORT_RUN = "report_plots"  # the TensorBoard run `lamra-pl report` writes its figures into
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
    """Folders under `root` holding event files, config.yaml or hparams.yaml (each a run), sorted; not checkpoint
    folders, nor the report's own figures (REPORT_RUN)."""
    marks = [*root.rglob(EVENTS), *root.rglob("config.yaml"), *root.rglob("hparams.yaml")]
    parts = [p.relative_to(root).parts for p in marks]
    return sorted({root.joinpath(*q[:-1]) for q in parts if "checkpoints" not in q and REPORT_RUN not in q[:-1]})


def has_events(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(EVENTS))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    plain = isinstance(tree, (int, float, str, bool)) or tree is None
    return {prefix[:-1]: tree if plain else json.dumps(tree, default=str)}  # a list as JSON, a path as its text


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


def session_values(hparams: dict[str, Any]) -> dict[str, int | float | str]:
    """`hparams` (flat) as the values an HParams session holds: numbers and strings as they are, booleans as "True"
    or "False" (as the report prints them; torch's summary would write 1.0 and 0.0), anything else as JSON; None (an
    unset option) is left out, as TensorBoard would leave it."""
    out: dict[str, int | float | str] = {}
    for key, value in hparams.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = str(value)
        else:
            plain = isinstance(value, (int, float, str))
            out[key] = value if plain else json.dumps(value, sort_keys=True, default=str)
    return out


def write_session(logger: Any, hparams: dict[str, Any], step: int) -> None:
    """The HParams session of the run `logger` (a Lightning `TensorBoardLogger`) writes to: `hparams` (flat, dotted
    keys) at `step`, marked successful. Its metrics are the run's scalars (see the module docstring); Lightning's
    `log_hyperparams(params, metrics)` would also write the experiment summary that hides other runs' metrics."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    _, start, end = hparams_summaries(session_values(hparams), {})  # the end marks the session successful
    writer = logger.experiment._get_file_writer()  # torch's SummaryWriter has no public add_summary
    writer.add_summary(start, step)
    writer.add_summary(end, step)
    writer.flush()


def write_evaluation(
    folder: Path, scalars: dict[str, float], step: int, hparams: dict[str, Any], final: dict[str, float]
) -> None:
    """Log an evaluation into the run in `folder`: `scalars` and `final` as FINAL metrics (their names without the
    prefix) at `step`, and `hparams` as its HParams session (also hparams.yaml), as a fit's end logs them."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(folder), name="", version="", default_hp_metric=False)
    logger.log_metrics({**scalars, **{FINAL + name: value for name, value in final.items()}}, step=step)
    logger.log_hyperparams(hparams)  # hparams.yaml only (no metrics: nothing else is written)
    write_session(logger, hparams, step)
    logger.finalize("success")
