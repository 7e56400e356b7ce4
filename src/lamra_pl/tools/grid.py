"""`lamra-pl grid --grid GRID.yaml`: run a named sequence of `lamra-pl` commands, each fit a TensorBoard run.

A grid file lists steps in order (later ones may use what earlier ones wrote):

    vars:                              # optional: {name} in any string below; `--variables+=model=X` sets one
      model: null                      # null: must be set on the command line
      split: test
      args: ""                         # a `run` element that is exactly "{args}" becomes its words (shell-split)
    out: runs/ablations/demo           # OUT: every fit logs to OUT/<name> (TensorBoardLogger name/version)
    steps:
      - run: [mine, --runs=..., --out={out}/mined]   # a lamra-pl tool command (`grid` too), or [python, -m, MODULE]
        creates: "{out}/mined"                         # skipped when this exists
      - fit: lamra                                   # a run name
        configs: [experiments/demo/stage2_instruct.yaml, experiments/ablations/no_instruction.yaml]
        args: ["--model.init_args.backbone.path={out}/stage1_merged"]   # {out} is replaced by OUT
      - fit: rerank_joint                            # a fit that validates nothing itself:
        configs: [...]
        final_metrics: later                         # a later `evaluate --log_to={out}/rerank_joint` logs them
                                                     # (`none`: nobody does; the fit is done when it finished)

A fit's hyperparameters and final metrics are logged as TensorBoard hparams by `lamra_pl.callbacks.FinalMetrics`
(in `trainer.callbacks` of every shipped config; a fit without it is an error), or, for a fit marked
`final_metrics: later`, by a later step's `lamra-pl evaluate --log_to RUN` (the grid checks at its end that it
did); `lamra-pl report --runs OUT` compares the runs. Each grid writes its summary to OUT/<grid file name>.json,
so several grids may share OUT. Run the grid again after a crash or a kill: finished fits and steps whose output
exists are skipped, and an unfinished fit resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lamra_pl.errors import LamraError
from lamra_pl.formats.tensorboard import has_events, read_board

LAMRA = str(Path(sys.executable).parent / "lamra-pl")
FINAL_METRICS = ("fit", "later", "none")
DONE = "grid_done.json"  # written into a fit's run folder when its step succeeded


@dataclass
class Step:
    name: str  # the fit's run name, or the tool command
    command: list[str]
    creates: Path | None = None  # a tool step's output: the step is done when it exists
    run_dir: Path | None = None  # a fit's TensorBoard folder
    final_metrics: str = "fit"  # who logs a fit's final metrics: FinalMetrics ("fit"), a later step, or "none"

    @property
    def metrics_later(self) -> bool:
        return self.final_metrics == "later"


@dataclass
class Grid:
    out: Path
    name: str  # the grid file's stem: its summary is OUT/<name>.json
    steps: list[Step] = field(default_factory=list)


def _substitute(text: str, values: dict[str, str]) -> str:
    """`text` with each {name} of `values` replaced (other braces, e.g. a shard brace pattern, are left alone)."""
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def _variables(spec: dict[str, Any], given: dict[str, str], file: Path) -> dict[str, str]:
    declared = spec.get("vars") or {}
    if not isinstance(declared, dict):
        raise LamraError(f"{file}: `vars:` is a mapping of name to default value (null: to be given)")
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise LamraError(f"{file}: --variables names {unknown}, which the grid does not declare ({sorted(declared)})")
    values: dict[str, str] = {}
    for name, default in declared.items():  # in order: a default may use the variables before it
        value = given.get(name, default)
        if value is None:
            raise LamraError(f"{file}: variable {name!r} has no default: give it, e.g. --variables+={name}=VALUE")
        values[name] = _substitute(str(value), values)
    return values


def parse_variables(pairs: list[str] | None) -> dict[str, str]:
    """{name: value} from NAME=VALUE strings."""
    values = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise LamraError(f"--variables takes NAME=VALUE, got {pair!r}")
        values[name] = value
    return values


def _words(element: Any, values: dict[str, str]) -> list[str]:
    """A `run` element's words: a lone "{name}" is its value's shell words (none for an empty value), anything
    else one word with its {name}s replaced."""
    match = re.fullmatch(r"\{(\w+)\}", str(element))
    if match and match.group(1) in values and match.group(1) != "out":
        return shlex.split(values[match.group(1)])
    return [_substitute(str(element), values)]


def load_grid(path: str | Path, only: list[str] | None = None, variables: dict[str, str] | None = None) -> Grid:
    """Parse a grid file; `only` keeps the tool steps and the named fits; `variables` sets its `vars`."""
    file = Path(path)
    if not file.is_file():
        raise LamraError(f"grid file {str(path)!r} does not exist")
    try:
        spec = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise LamraError(f"{file}: not valid YAML ({err})") from None
    if not isinstance(spec, dict) or "out" not in spec or not isinstance(spec.get("steps"), list):
        raise LamraError(f"{file}: a grid needs `out:` and a list of `steps:`")
    values = _variables(spec, {k: str(v) for k, v in (variables or {}).items()}, file)
    out = Path(_substitute(str(spec["out"]), values))
    values["out"] = str(out)
    grid = Grid(out, file.stem)
    names: set[str] = set()
    for n, entry in enumerate(spec["steps"], start=1):
        where = f"{file}, step {n}"

        def text(value: Any) -> str:
            return _substitute(str(value), values)

        if not isinstance(entry, dict) or ("fit" in entry) == ("run" in entry):
            raise LamraError(f"{where}: each step is either `fit: NAME` (with configs) or `run: [COMMAND...]`")
        unknown = set(entry) - {"fit", "configs", "args", "run", "creates", "final_metrics"}
        if unknown:
            raise LamraError(f"{where}: unknown keys {sorted(unknown)}")
        if "run" in entry:
            command = [word for element in entry["run"] for word in _words(element, values)]
            creates = Path(text(entry["creates"])) if entry.get("creates") else None
            grid.steps.append(Step(" ".join(command[:1]), command, creates=creates))
            continue
        name = str(entry["fit"])
        if name in names:
            raise LamraError(f"{where}: a second fit named {name!r}")
        names.add(name)
        configs = [text(c) for c in entry.get("configs") or []]
        if not configs:
            raise LamraError(f"{where}: fit {name!r} has no configs")
        missing = [c for c in configs if not Path(c).is_file()]
        if missing:
            raise LamraError(f"{where}: fit {name!r}: config files {missing} do not exist")
        command = ["fit", *(a for c in configs for a in ("-c", c)), *(text(a) for a in entry.get("args") or [])]
        command += [
            f"--trainer.logger.init_args.save_dir={out.parent}",
            f"--trainer.logger.init_args.name={out.name}",
            f"--trainer.logger.init_args.version={name}",
        ]
        final = entry.get("final_metrics", "fit")
        if final not in FINAL_METRICS:
            raise LamraError(
                f"{where}: final_metrics is `fit` (FinalMetrics, the default), `later` (a later `evaluate --log_to`) "
                f"or `none`, not {final!r}"
            )
        grid.steps.append(Step(name, command, run_dir=out / name, final_metrics=final))
    if only:
        unknown_names = sorted(set(only) - names)
        if unknown_names:
            raise LamraError(f"{file}: no fit named {unknown_names} (fits: {sorted(names)})")
        grid.steps = [s for s in grid.steps if s.run_dir is None or s.name in only]
    return grid


def fit_state(step: Step) -> str:
    """ "finished" (final metrics logged, or a `final_metrics: none` fit that ended), "resume" (a last checkpoint
    to go on from) or "new"."""
    assert step.run_dir is not None
    if has_events(step.run_dir):
        done = (step.run_dir / DONE).is_file() if step.final_metrics == "none" else False
        if done or read_board(step.run_dir, step.run_dir.parent).finished:
            return "finished"
        if (step.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "resume"
        # Died before its first checkpoint: start again in a clean folder, keeping the old one aside (its event
        # files would otherwise mix into the new run's curves).
        aside = step.run_dir.with_name(f"{step.run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        step.run_dir.rename(aside)
        print(f"== fit {step.name}: no checkpoint to resume from; the partial run is kept in {aside}", flush=True)
    return "new"


def run_grid(
    grid: str,
    only: list[str] | None = None,
    dry_run: bool = False,
    variables: list[str] | None = None,
    fit_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run a grid of fits and tool steps (a grid file), skipping the steps already done.

    Prints and returns {"<n> <step>": {"state": done | skipped | resumed, "minutes"}}, also written to
    OUT/<grid file name>.json.

    Args:
        grid: the grid file (format: lamra_pl.tools.grid).
        only: run only these fits (and every tool step).
        dry_run: print the commands without running them.
        variables: values of the grid's `vars`, NAME=VALUE each: --variables+=model=CKPT --variables+=data=DIR.
        fit_args: arguments added to every fit's command line: --fit_args+=--trainer.max_steps=10.
    """
    path = grid
    spec = load_grid(path, only, parse_variables(variables))
    spec.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for number, step in enumerate(spec.steps, start=1):
        command = list(step.command)
        if step.run_dir is None:
            state = "done" if step.creates is not None and step.creates.exists() else "new"
        else:
            command += fit_args or []
            state = fit_state(step)
            if state == "resume":
                command.append(f"--ckpt_path={step.run_dir / 'checkpoints' / 'last.ckpt'}")
        # Numbered: a grid runs the same tool (index, evaluate, ...) more than once.
        label = f"{number:02d} {'fit ' if step.run_dir else ''}{step.name}"
        if state in ("done", "finished"):
            print(f"== {label}: already done, skipped", flush=True)
            summary[label] = {"state": "skipped"}
            continue
        shown = " ".join(command) if command[0] == "python" else "lamra-pl " + " ".join(command)
        print(f"== {label}: {shown}", flush=True)
        if dry_run:
            summary[label] = {"state": "dry run"}
            continue
        start = time.time()
        argv = [sys.executable, *command[1:]] if command[0] == "python" else [LAMRA, *command]
        result = subprocess.run(argv)
        if result.returncode != 0:
            raise LamraError(
                f"grid {path}: step {label!r} failed (exit {result.returncode}); fix it and run the grid again, "
                "finished steps are skipped"
            )
        minutes = round((time.time() - start) / 60, 2)
        if step.run_dir is not None:
            if step.final_metrics == "fit" and not read_board(step.run_dir, spec.out).finished:
                raise LamraError(
                    f"grid {path}: fit {step.name!r} logged no final metrics to {step.run_dir}: add "
                    "lamra_pl.callbacks.FinalMetrics to its trainer.callbacks (and validation: data.val_tasks)"
                )
            (step.run_dir / DONE).write_text(json.dumps({"command": command, "minutes": minutes}, indent=1))
        summary[label] = {"state": "resumed" if state == "resume" else "done", "minutes": minutes}
    (spec.out / f"{spec.name}.json").write_text(json.dumps(summary, indent=1))
    if not dry_run:
        unlogged = [s.name for s in spec.steps if s.metrics_later and not read_board(s.run_dir, spec.out).finished]
        if unlogged:
            raise LamraError(
                f"grid {path}: fits {unlogged} are marked `final_metrics: later`, but no later step logged them: "
                "add a step `[evaluate, --runs=..., --log_to={out}/NAME]`"
            )
    print(json.dumps(summary, indent=1))
    return summary
