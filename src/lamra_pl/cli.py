"""The `lamra-pl` command: LightningCLI's subcommands (fit, validate, test, predict) and the tool subcommands, each
the library function COMMANDS names, whose signature and docstring are its command line.

    lamra-pl fit -c experiments/lamra_ret/stage1_text.yaml [--model.init_args.backbone.path PATH]
    lamra-pl index --model CKPT --pool data/eval/test/global_pool --out indexes/test_global
    lamra-pl grid --grid experiments/demo/demo.yaml
    lamra-pl TOOL --help

Errors in user input (paths, config keys, data) print as one line and exit with status 2.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lamra_pl.errors import LamraError

# Subcommand -> "module:function". Imported when the subcommand runs (or `--help` lists them).
COMMANDS: dict[str, str] = {
    "tiny-backbone": "lamra_pl.testing.tiny:tiny_backbone",
    "emoji": "lamra_pl.recipes.emoji:emoji_data",
    "convert-mbeir": "lamra_pl.recipes.mbeir:convert",
    "convert-nli": "lamra_pl.recipes.nli:convert",
    "merge": "lamra_pl.pipelines.merge:merge",
    "index": "lamra_pl.pipelines.encode:index",
    "retrieve": "lamra_pl.pipelines.retrieve:retrieve",
    "evaluate": "lamra_pl.pipelines.evaluate:evaluate",
    "chance": "lamra_pl.pipelines.evaluate:chance",
    "search": "lamra_pl.api:search",
    "rerank-data": "lamra_pl.pipelines.rerank_data:rerank_data",
    "mine": "lamra_pl.pipelines.mine:mine",
    "rerank": "lamra_pl.pipelines.rerank:rerank",
    "tune-fusion": "lamra_pl.pipelines.rerank:tune",
    "report": "lamra_pl.tools.report:report",
    "grid": "lamra_pl.tools.grid:run_grid",
}
LIGHTNING = {
    "fit": "train a module (a LightningCLI config: -c experiments/<stage>.yaml)",
    "validate": "run a module's validation (e.g. Recall on task folders)",
    "test": "run a module's test loop",
    "predict": "run a module's prediction loop",
}


def command(name: str) -> Callable[..., Any]:
    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def usage() -> str:
    lines = ["usage: lamra-pl SUBCOMMAND [--help] ...", "", "subcommands:"]
    lines += [f"  {name:<14} {text}" for name, text in LIGHTNING.items()]
    for name in COMMANDS:
        lines.append(f"  {name:<14} {summary(command(name).__doc__ or '')}")
    lines += ["", "`lamra-pl SUBCOMMAND --help` describes one."]
    return "\n".join(lines)


def summary(doc: str) -> str:
    """A docstring's first sentence, on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split()).rstrip(".")


class LamraCLI(LightningCLI):
    """LightningCLI over any LightningModule and DataModule by class path, which hands the DataModule the module's
    collator (`connect`) and reports lamra-pl's own errors as themselves."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            # jsonargparse reports a failing __init__ as "does not validate against any of the Union subtypes";
            # surface our own error (which names the bad path or value) instead.
            cause = _lamra_cause(err)
            if cause is None:
                raise
            raise cause from None
        connect = getattr(self.datamodule, "connect", None)
        collator = getattr(self.model, "collator", None)
        if connect is not None and collator is not None:
            connect(collator())


def lightning_cli(args: list[str] | None) -> LamraCLI:
    """`lamra-pl fit|validate|test|predict`."""
    return LamraCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": "lamra_pl.files.AtomicCheckpointIO"}]},
        args=args,  # None: LightningCLI reads sys.argv itself
        parser_kwargs={"prog": "lamra-pl"},
    )


def _lamra_cause(err: BaseException | None) -> LamraError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LamraError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    name = args[0] if args else None
    try:
        if name is None or name in ("-h", "--help"):
            print(usage())
        elif name in LIGHTNING:
            lightning_cli(None if argv is None else args)
        elif name in COMMANDS:
            from jsonargparse import auto_cli

            # The tools' per-line warnings (skipped records, ...) go to stderr as plain lines.
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            auto_cli(command(name), args=args[1:], as_positional=False, prog=f"lamra-pl {name}")
        else:
            close = difflib.get_close_matches(name, [*LIGHTNING, *COMMANDS], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LamraError(f"unknown subcommand {name!r}{hint}; `lamra-pl --help` lists them")
    except LamraError as err:
        print(f"lamra-pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
