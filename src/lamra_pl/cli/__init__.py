"""The `lamra-pl` command: LightningCLI's subcommands (fit, validate, test, predict) and the tool subcommands, each
the library function COMMANDS names, whose signature and docstring are its command line.

    lamra-pl fit -c experiments/lamra_ret/stage1_text.yaml [--model.init_args.backbone.path PATH]
    lamra-pl index --model CKPT --pool data/eval/test/global_pool --out indexes/test_global
    lamra-pl grid --grid experiments/demo/demo.yaml
    lamra-pl TOOL --help

Errors in user input (paths, config keys, data) print as one line and exit with status 2. A tool's command line is
read from its function's source (`tool`): its --help, and a mistake in its arguments, answer without importing the
tool (and torch); the tool's module is imported once the arguments parse.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import difflib
import errno
import functools
import importlib
import importlib.util
import inspect
import itertools
import logging
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ArgumentParser

from lamra_pl.errors import LamraError

# Subcommand -> ("module:function", its one-line summary: the first sentence of the function's docstring, kept
# here so that `lamra-pl --help` imports no tool; tests/test_cli.py checks the two agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-backbone": (
        "lamra_pl.testing.tiny:tiny_backbone",
        "Write a tiny randomly initialised checkpoint (for tests and the CPU demo)",
    ),
    "emoji": (
        "lamra_pl.recipes.emoji:emoji_data",
        "Write the embedded default data set (OpenMoji images, CLDR names) in M-BEIR layout",
    ),
    "convert-mbeir": (
        "lamra_pl.recipes.mbeir:convert",
        "Convert an M-BEIR folder to training shards, evaluation sets and the global pool",
    ),
    "convert-nli": (
        "lamra_pl.recipes.nli:convert",
        "Convert SimCSE-style NLI triples (sent0,sent1,hard_neg) or pairs (sent0,sent1) to text-only training shards",
    ),
    "convert-zeroshot": (
        "lamra_pl.recipes.zeroshot:convert",
        "Convert one of LamRA's zero-shot sets from its published files to evaluation task folders",
    ),
    "merge": (
        "lamra_pl.pipelines.merge:merge",
        "Merge a LoRA adapter into its base weights (float32) and save a full checkpoint in the base dtype",
    ),
    "merge-models": (
        "lamra_pl.pipelines.merge_models:merge_models",
        "Merge several fits into one model folder: a weighted average, or task arithmetic, of their weights",
    ),
    "settings": (
        "lamra_pl.pipelines.model_settings:model_settings",
        "Print a model folder's settings file, as it is or with the settings given; --write saves it into the folder",
    ),
    "export": (
        "lamra_pl.pipelines.export:export",
        "Export a training checkpoint or model folder for other libraries: PEFT, sentence-transformers, vLLM (`--to`)",
    ),
    "index": (
        "lamra_pl.pipelines.encode:index",
        "Encode a candidate pool into an index folder (run again, a killed run continues where it stopped)",
    ),
    "retrieve": (
        "lamra_pl.pipelines.retrieve:retrieve",
        "Search an index with the queries of evaluation tasks: a TREC run file per task and pool setting",
    ),
    "evaluate": (
        "lamra_pl.pipelines.evaluate:evaluate",
        "Score a run folder: M-BEIR Recall@K per task and averaged, and MM-Embed's modality bias",
    ),
    "chance": (
        "lamra_pl.pipelines.evaluate:chance",
        "Print the Recall@K of a random ranking on each task's local pool, to read real numbers against",
    ),
    "zeroshot-report": (
        "lamra_pl.pipelines.evaluate:zeroshot_report",
        "Put the evaluated zero-shot sets in one table, as LamRA's zero-shot table: each task's reported metric",
    ),
    "search": (
        "lamra_pl.api:search",
        "Search an index for a text, an image or a video (or text with either), and print the ranked candidates",
    ),
    "rerank-data": (
        "lamra_pl.pipelines.rerank_data:rerank_data",
        "Reranker training shards from a retriever's run files on the training queries (LamRA-Rank's data)",
    ),
    "mine": (
        "lamra_pl.pipelines.mine:mine",
        "MM-Embed's modality-aware hard negatives: training shards whose queries carry c1 + c2 mined negatives",
    ),
    "distill-data": (
        "lamra_pl.pipelines.distill_data:distill_data",
        "Distillation training shards: each training query with its retrieved top K and the reranker's score of each",
    ),
    "rerank": (
        "lamra_pl.pipelines.rerank:rerank",
        "Rerank the top N of each run file with a reranker and fuse: final = retrieval + w * rerank score",
    ),
    "tune-fusion": (
        "lamra_pl.pipelines.rerank:tune",
        "Pick the fusion weight w of each task on a validation split's reranked runs",
    ),
    "report": (
        "lamra_pl.tools.report:report",
        "Compare the training runs under a folder: a Markdown table and PNG plots, written into that folder",
    ),
    "grid": (
        "lamra_pl.tools.grid:run_grid",
        "Run a grid of fits and tool steps (a grid file), skipping the steps already done",
    ),
}
LIGHTNING = {
    "fit": "train a module (a LightningCLI config: -c experiments/<stage>.yaml)",
    "validate": "run a module's validation (e.g. Recall on task folders)",
    "test": "run a module's test loop",
    "predict": "run a module's prediction loop",
}


def command(name: str) -> Callable[..., Any]:
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


# A tool's command line is its function's signature and docstring, but importing the function's module imports the
# job's whole stack (torch, transformers, Lightning: seconds). So the parser is built from the function's twin: the
# same parameters, defaults, annotations and docstring, read from the module's source without running it. Each name
# the signature uses is evaluated as the module binds it: an assignment at the module's top level (evaluated, its
# own names likewise), an import (a lamra_pl module's name followed into that module's source, any other module
# imported), a class or function defined there (its module imported: a type of a command line lives in a module
# that imports nothing heavy, e.g. pipelines/trainer.py). Called with the parsed arguments, the twin imports the
# function and calls it. Whatever the reader does not follow (a name bound twice or under an `if`, *args, a
# decorator, no source file) gives the function itself: slower, never different. tests/test_cli.py checks that every
# tool has a twin, that its parser is the function's own, and that its --help imports no torch.


class _Unread(Exception):
    """A signature or a name the source reader does not follow."""


@functools.cache
def _bindings(module: str) -> dict[str, list[ast.stmt]]:
    """The top-level statements of `module`'s source that bind each name (the module is not imported, only its
    parent packages)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise _Unread(f"{module} has no source file")
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    except (OSError, SyntaxError, UnicodeDecodeError) as err:  # the import says what is wrong
        raise _Unread(f"{spec.origin}: {err}") from err
    bindings: dict[str, list[ast.stmt]] = defaultdict(list)
    for node in tree.body:
        for name in _bound(node):
            bindings[name].append(node)
    return bindings


def _bound(statement: ast.stmt) -> set[str]:
    """The names a top-level statement binds; for an if, try, for or with, every name bound inside it (which
    `_value` then refuses)."""
    if isinstance(statement, ast.AnnAssign) and statement.value is None:
        return set()  # an annotation alone binds nothing
    names: set[str] = set()
    pending: list[ast.AST] = [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)  # and not the names of its body: they are its own
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif not isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp | ast.Lambda):
            pending.extend(ast.iter_child_nodes(node))  # (a comprehension's variables are its own)
    return names


@functools.cache
def _value(module: str, name: str) -> Any:
    """What `name` is bound to at the top level of `module`, as importing the module would bind it."""
    nodes = _bindings(module).get(name, [])
    if not nodes:
        if hasattr(builtins, name):
            return getattr(builtins, name)
        raise _Unread(f"{module}.{name} is not bound at its top level")
    if len(nodes) > 1:
        raise _Unread(f"{module}.{name} is bound more than once")
    node = nodes[0]
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return _evaluate(module, node.value)
    if isinstance(node, ast.AnnAssign) and node.value is not None:
        return _evaluate(module, node.value)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        imported = next(a.name for a in node.names if (a.asname or a.name) == name)
        if node.module.split(".")[0] != "lamra_pl":
            found = importlib.import_module(node.module)
            return (
                getattr(found, imported)
                if hasattr(found, imported)
                else importlib.import_module(f"{node.module}.{imported}")
            )
        if imported not in _bindings(node.module):
            raise _Unread(f"{node.module}.{imported} is a module, or not bound at its top level")
        return _value(node.module, imported)
    if isinstance(node, ast.Import):
        alias = next(a for a in node.names if (a.asname or a.name.split(".")[0]) == name)
        imported = importlib.import_module(alias.name)
        return imported if alias.asname else sys.modules[alias.name.split(".")[0]]
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return getattr(importlib.import_module(module), name)
    raise _Unread(f"{module}.{name} is bound by a statement the reader does not follow")


def _evaluate(module: str, expression: ast.expr) -> Any:
    """An expression of `module`'s source, evaluated with the module's top-level names."""
    names = {n.id for n in ast.walk(expression) if isinstance(n, ast.Name)}
    scope = {name: _value(module, name) for name in names}
    return eval(compile(ast.Expression(expression), module, "eval"), {"__builtins__": {}}, scope)


def tool(name: str) -> Callable[..., Any]:
    """The function of subcommand `name` for its command line: its twin (above), or the function itself when the
    reader does not follow its signature."""
    try:
        return _twin(name)
    except _Unread:
        return command(name)


def _twin(name: str) -> Callable[..., Any]:
    module, function = COMMANDS[name][0].split(":")
    nodes = _bindings(module).get(function, [])
    if len(nodes) != 1 or not isinstance(nodes[0], ast.FunctionDef):
        raise _Unread(f"{module}.{function} is not a function defined once")
    node = nodes[0]
    args = node.args
    if args.posonlyargs or args.vararg or args.kwarg or node.decorator_list:
        raise _Unread(f"{module}.{function}: positional-only parameters, *args, **kwargs or a decorator")
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    parameters = []
    for kind, arguments, values in (
        (inspect.Parameter.POSITIONAL_OR_KEYWORD, args.args, defaults),
        (inspect.Parameter.KEYWORD_ONLY, args.kwonlyargs, args.kw_defaults),
    ):
        for arg, default in zip(arguments, values, strict=True):
            annotation = inspect.Parameter.empty if arg.annotation is None else _evaluate(module, arg.annotation)
            value = inspect.Parameter.empty if default is None else _evaluate(module, default)
            parameters.append(inspect.Parameter(arg.arg, kind, default=value, annotation=annotation))

    def twin(**kwargs: Any) -> Any:
        return command(name)(**kwargs)

    twin.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    twin.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
    twin.__doc__ = ast.get_docstring(node, clean=False)
    twin.__name__ = twin.__qualname__ = function
    return twin


def usage() -> str:
    lines = ["usage: lamra-pl SUBCOMMAND [--help] ...", "       lamra-pl --version", "", "subcommands:"]
    lines += [f"  {name:<14} {text}" for name, text in LIGHTNING.items()]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`lamra-pl SUBCOMMAND --help` describes one."]
    return "\n".join(lines)


def summary(doc: str) -> str:
    """A docstring's first sentence, on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split()).rstrip(".")


def with_bare_flags(function: Callable[..., Any], args: list[str]) -> list[str]:
    """`args` with a bare boolean flag (`--strict`, as argparse and click users type it) given its value
    (`--strict true`); a flag followed by a value, or written `--strict=false`, is left as it is."""
    booleans = {
        f"--{name}"
        for name, parameter in inspect.signature(function, eval_str=True).parameters.items()
        if parameter.annotation is bool or parameter.annotation == (bool | None)
    }
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in booleans and (following is None or following.startswith("--")):
            out.append("true")
    return out


class OneLineErrors:
    """A parser that raises its errors (`argparse.ArgumentError`) for `main` to print as one line, instead of
    printing the whole usage before them. `--help` prints the usage as before."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _parsers.append(self)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        raise argparse.ArgumentError(None, message) from ex


class ToolParser(OneLineErrors, ArgumentParser):
    """The tools' parser (jsonargparse's, built from each function's signature), its errors raised as one line."""


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
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS):
            raise
        print(f"lamra-pl {name}: error: {err.strerror}: {err.filename or 'while writing'}", file=sys.stderr)
        raise SystemExit(2) from None
    except LamraError as err:
        print(f"lamra-pl: error: {_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # last: everything above is more specific
        if type(err).__name__ != "MisconfigurationException":  # Lightning's word for a bad Trainer setting
            raise
        print(f"lamra-pl {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
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
    from lamra_pl.cli.quiet import quiet_upstream  # the one place upstream noise is filtered

    quiet_upstream()
    if name is None or name in ("-h", "--help"):
        print(usage())
    elif name == "--version":
        print(f"lamra-pl {version('lamra-pl')}")
    elif name in LIGHTNING:
        from lamra_pl.cli.lightning import lightning_cli

        lightning_cli(None if argv is None else args)
    elif name in COMMANDS:
        from jsonargparse import auto_cli

        # The tools' per-line warnings (skipped records, ...) go to stderr as plain lines.
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        function = tool(name)
        tool_args = with_bare_flags(function, args[1:])
        auto_cli(function, args=tool_args, as_positional=False, prog=f"lamra-pl {name}", parser_class=ToolParser)
    else:
        close = difflib.get_close_matches(name, [*LIGHTNING, *COMMANDS], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise LamraError(f"unknown subcommand {name!r}{hint}; `lamra-pl --help` lists them")
