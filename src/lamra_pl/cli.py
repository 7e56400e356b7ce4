"""The `lamra-pl` command: LightningCLI's subcommands (fit, validate, test, predict) and the tool subcommands, each
the library function COMMANDS names, whose signature and docstring are its command line.

    lamra-pl fit -c experiments/lamra_ret/stage1_text.yaml [--model.init_args.backbone.path PATH]
    lamra-pl index --model CKPT --pool data/eval/test/global_pool --out indexes/test_global
    lamra-pl grid --grid experiments/demo/demo.yaml
    lamra-pl TOOL --help

Errors in user input (paths, config keys, data) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import itertools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

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


class _OneLineErrors:
    """A parser that raises its errors (`argparse.ArgumentError`) for `main` to print as one line, instead of
    printing the whole usage before them. `--help` prints the usage as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _parsers.append(self)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise argparse.ArgumentError(None, message) from ex


class ToolParser(_OneLineErrors, ArgumentParser):
    pass


class FitParser(_OneLineErrors, LightningArgumentParser):
    pass


# jsonargparse's messages for an unknown key: "Group 'trainer' does not accept option 'max_stepz'", "Subcommand
# 'fit' does not accept option 'trainer.max_stepz'", 'Key "trainer.max_stepz" is not expected', "Unrecognized
# arguments: --max_stepz 3".
_UNKNOWN = (
    re.compile(r"Group '(?P<group>[^']*)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"does not accept option '(?P<key>[^']+)'"),
    re.compile(r'Key "(?P<key>[^"]+)" is not expected'),
    re.compile(r"[Uu]nrecognized arguments: --(?P<key>[^\s=]+)"),
)
# Lines of jsonargparse's nested report that frame the reason rather than give it.
_FRAMING = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>")


def parse_error(message: str, args: list[str], keys: list[str]) -> str:
    """jsonargparse's error as one line: an unknown key with the config file that holds it and the closest valid
    key; a bad value with its full key, the file that sets it and the reason (the innermost line of jsonargparse's
    nested report)."""
    for pattern in _UNKNOWN:
        match = pattern.search(message)
        if match is None:
            continue
        group = match.groupdict().get("group")
        key = f"{group}.{match['key']}" if group else match["key"]
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"{_config_file(key, args) or 'the command line'}: unknown key {key!r}{hint}"
    key, reason = _innermost(message)
    if not key:
        return reason
    return f"{_config_file(key, args) or 'the command line'}: {key}: {reason}"


def _innermost(message: str) -> tuple[str, str]:
    """(the full key, the reason) of jsonargparse's nested report: 'Parser key "model": ... Parser key "r":
    Expected a <class 'int'>. Got value: eight' -> ('model.init_args.lora.init_args.r', "Expected ...")."""
    path: list[tuple[int, str]] = []
    lines = [line for line in message.splitlines() if line.strip()]
    for line in lines:
        indent, text = len(line) - len(line.lstrip()), line.strip()
        path = [(i, name) for i, name in path if i < indent]
        named = re.match(r'Parser key "([^"]+)":\s*(.*)', text)
        if named:
            path.append((indent, named[1]))
            if named[2]:
                return ".".join(n for _, n in path), named[2]
        elif text.startswith("- Problem with given class_path"):
            path.append((indent, "init_args"))
        elif not text.startswith(_FRAMING):
            return ".".join(n for _, n in path), text.removeprefix("- ")
    return "", (lines or ["invalid arguments"])[0].strip()


def _config_file(key: str, args: list[str]) -> str | None:
    """The first config file given with -c/--config whose text sets `key`'s last part, unless the command line
    sets it (which wins)."""
    name = key.rsplit(".", 1)[-1]
    given = [a.lstrip("-").split("=", 1)[0] for a in args if a.startswith("--")]
    if any(g == name or g.endswith(f".{name}") for g in given):
        return None
    last = re.escape(name)
    for flag, value in itertools.pairwise(args):
        path = Path(value)
        if (
            flag in ("-c", "--config")
            and path.is_file()
            and re.search(rf"^\s*{last}\s*:", path.read_text(errors="replace"), re.MULTILINE)
        ):
            return value
    return None


def _parser_keys(parser: Any) -> list[str]:
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        keys += [o.lstrip("-") for o in action.option_strings if o.startswith("--")]
        for sub in getattr(action, "choices", None) or {}:
            sub_parser = action.choices[sub] if isinstance(action.choices, dict) else None
            if isinstance(sub_parser, argparse.ArgumentParser):
                keys += _parser_keys(sub_parser)
    return keys


class LamraCLI(LightningCLI):
    """LightningCLI over any LightningModule and DataModule by class path, which hands the DataModule the module's
    collator (`connect`), reports lamra-pl's own errors as themselves, and reads a `--ckpt_path` as data."""

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges a checkpoint's hyper-parameters into the config, and jsonargparse then instantiates
        whatever class paths they name. Here the checkpoint is first read as every checkpoint is
        (`lamra_pl.models.checkpoints.read_checkpoint`: weights_only, every class path it names allowed: lamra-pl's
        own or one your config names), and only then are a lamra-pl module's own arguments merged (migrated from
        earlier versions; trust_remote_code stays what your config says). Another module's checkpoint is checked
        and not merged; remote ones (s3://) are read by Lightning with weights_only."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or str(ckpt_path) in ("last", "best", "hpc") or str(ckpt_path).startswith("registry"):
            return  # Lightning finds these itself and reads them through CheckpointWriter.load_checkpoint
        if "://" in str(ckpt_path) and not str(ckpt_path).startswith("file://"):
            return
        from lamra_pl.formats.checkpoint import class_paths, read
        from lamra_pl.models.checkpoints import MODULES, check_class_paths, class_path_of, read_checkpoint

        config = self.config[subcommand]
        path = str(ckpt_path).removeprefix("file://")
        yours = {class_path for _, class_path in class_paths(config.as_dict(), "config")}
        hparams = read(path).get("hyper_parameters") or {}
        check_class_paths(dict(hparams), f"checkpoint {path}", "hyper_parameters", also=yours)
        if hparams.get("_class_path") not in MODULES:
            return  # a module built in Python, or one of your own: checked, its config is yours
        cls, args, _ = read_checkpoint(path, also=yours)
        backbone = args.get("backbone")
        if isinstance(backbone, dict):
            backbone.pop("trust_remote_code", None)
        model = config.get("model")
        named = model.get("class_path") if model is not None and hasattr(model, "get") else None
        class_path = named if named is not None and MODULES.get(named) is cls else class_path_of(cls)
        merged = {subcommand: {"model": {"class_path": class_path, "init_args": args}}}
        self.config = self.parser.parse_object(merged, self.config)

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
        trainer_defaults={"plugins": [{"class_path": "lamra_pl.CheckpointWriter"}]},
        args=args,  # None: LightningCLI reads sys.argv itself
        parser_kwargs={"prog": "lamra-pl"},
        parser_class=FitParser,
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
    _parsers.clear()
    try:
        run(name, args, argv)
    except argparse.ArgumentError as err:
        keys = sorted({key for parser in _parsers for key in _parser_keys(parser)})
        message = parse_error(str(err.message), args, keys)
        print(f"lamra-pl {name}: error: {message} (`lamra-pl {name} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except MisconfigurationException as err:  # Lightning's word for a bad Trainer setting (devices=0, ...)
        print(f"lamra-pl {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS):
            raise
        print(f"lamra-pl {name}: error: {err.strerror}: {err.filename or 'while writing'}", file=sys.stderr)
        raise SystemExit(2) from None
    except LamraError as err:
        print(f"lamra-pl: error: {_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _message(err: LamraError) -> str:
    """The error's own line; a LamraError raised in a DataLoader worker arrives as torch's re-raise, whose message
    is the worker's whole traceback ending in "BadSampleError: <the line>"."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


# The parsers built in this process: their keys are what an unknown key is matched to.
_parsers: list[Any] = []


def run(name: str | None, args: list[str], argv: Sequence[str] | None) -> None:
    """The subcommand `name` with `args` (args[0] is the name)."""
    if name is None or name in ("-h", "--help"):
        print(usage())
    elif name in LIGHTNING:
        lightning_cli(None if argv is None else args)
    elif name in COMMANDS:
        from jsonargparse import auto_cli

        # The tools' per-line warnings (skipped records, ...) go to stderr as plain lines.
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        auto_cli(command(name), args=args[1:], as_positional=False, prog=f"lamra-pl {name}", parser_class=ToolParser)
    else:
        close = difflib.get_close_matches(name, [*LIGHTNING, *COMMANDS], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LamraError(f"unknown subcommand {name!r}{hint}; `lamra-pl --help` lists them")
