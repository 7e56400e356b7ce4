"""Checkpoints, settings files and model folders are data: written as an attacker would, they run nothing.

Each attack is a file that `torch.load(weights_only=True)` reads without complaint (no pickle payload): its
hyper-parameters or settings name a callable that would create a marker file, or ask for a backbone folder's own
code (which would create the marker when imported). Every command that reads such a file must exit with status 2
and one line naming the key, and the marker must not exist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import ROOT, clean_error, lamra, lamra_here, ok
from lamra_pl.models.checkpoints import migrate
from lamra_pl.models.embedding import EmbeddingModule

LEGACY = ROOT / "tests" / "fixtures" / "legacy_4ccdac6"
POOL = LEGACY / "data" / "eval" / "test" / "global_pool"


def modern_hparams(backbone: Path) -> dict:
    """The hyper-parameters LightningCLI records for a retriever, from the legacy fixture's (same weights)."""
    legacy = torch.load(LEGACY / "retriever.ckpt", weights_only=True)
    args = migrate(EmbeddingModule, dict(legacy["hyper_parameters"]))
    args["backbone"]["path"] = str(backbone)
    return {
        "_class_path": "lamra_pl.models.embedding.EmbeddingModule",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        **args,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}},
    }


def write_checkpoint(path: Path, hparams: dict) -> Path:
    legacy = torch.load(LEGACY / "retriever.ckpt", weights_only=True)
    torch.save({"state_dict": legacy["state_dict"], "hyper_parameters": hparams}, path)
    torch.load(path, weights_only=True)  # the attack is a clean file: weights_only reads it
    return path


def backbone_with_code(folder: Path, marker: Path) -> Path:
    """The fixture's backbone, plus a config that points transformers at a module of the folder's own which
    creates `marker` when imported."""
    shutil.copytree(LEGACY / "backbone", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForImageTextToText": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return folder


def commands(model: Path, tmp_path: Path) -> dict[str, tuple[str, ...]]:
    return {
        "index": ("index", f"--model={model}", f"--pool={POOL}", f"--out={tmp_path / 'index'}"),
        "search": ("search", f"--model={model}", f"--index={LEGACY / 'index'}", "--text=red circle"),
        "merge": ("merge", f"--ckpt={model}", f"--out={tmp_path / 'merged'}"),
    }


@pytest.mark.parametrize("command", ["index", "search", "merge", "fit"])
def test_a_checkpoint_naming_a_shell_running_class_runs_nothing(tmp_path, command, finding):
    marker = tmp_path / "pwned"
    hparams = modern_hparams(LEGACY / "backbone")
    hparams["optimizer"] = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    ckpt = write_checkpoint(tmp_path / "shared.ckpt", hparams)
    if command == "fit":  # the real console script: LightningCLI's own checkpoint parsing is what is replaced
        config = (
            "-c",
            "experiments/tiny/stage2_instruct.yaml",
            f"--model.init_args.backbone.path={LEGACY / 'backbone'}",
        )
        proc = lamra("fit", *config, f"--ckpt_path={ckpt}", "--trainer.max_steps=1", "--trainer.logger=false")
    else:
        proc = lamra_here(*commands(ckpt, tmp_path)[command])
    clean_error(proc, "hyper_parameters.optimizer.class_path", "'subprocess.Popen'")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()
    finding(
        f"a weights_only-clean checkpoint whose optimizer is `subprocess.Popen` (`{command}`)",
        "nothing runs (the marker file is absent); exit 2, one line naming `hyper_parameters.optimizer.class_path`",
    )


def test_trust_remote_code_is_never_taken_from_a_checkpoint(tmp_path, finding):
    marker = tmp_path / "pwned"
    evil = backbone_with_code(tmp_path / "backbone", marker)
    hparams = modern_hparams(evil)
    hparams["backbone"]["trust_remote_code"] = True
    ckpt = write_checkpoint(tmp_path / "shared.ckpt", hparams)
    for command in ("index", "merge"):
        proc = lamra_here(*commands(ckpt, tmp_path)[command])
        clean_error(proc, "hyper_parameters.backbone.trust_remote_code", "auto_map")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()
    finding(
        "a checkpoint whose hyper-parameters set `trust_remote_code: true` on a backbone folder with code",
        "the code is not imported (marker absent); exit 2, one line naming the key and the folder's `auto_map`",
    )


def test_trust_remote_code_is_never_taken_from_a_merged_folder(tmp_path, finding):
    marker = tmp_path / "pwned"
    merged = backbone_with_code(tmp_path / "merged", marker)
    for extra in ("evil.py",):
        assert (merged / extra).is_file()
    shutil.copy(LEGACY / "merged" / "model.safetensors", merged / "model.safetensors")
    settings = {
        "format": "lamra-pl-settings",
        "version": 2,
        "class_path": "lamra_pl.EmbeddingModule",
        "init_args": {"backbone": {"rope": "1d", "trust_remote_code": True}, "pooling": "last_token"},
    }
    (merged / "lamra_pl.json").write_text(json.dumps(settings))
    proc = lamra_here(*commands(merged, tmp_path)["index"])
    clean_error(proc, "lamra_pl.json: init_args.backbone.trust_remote_code", "auto_map")
    assert not marker.exists()
    # With no file asking, the folder loads as transformers' own class: its code is still never imported.
    (merged / "lamra_pl.json").unlink()
    ok(lamra_here(*commands(merged, tmp_path)["index"]))
    assert not marker.exists()
    finding(
        "a merged folder whose settings file sets `trust_remote_code: true`, its config naming code (`auto_map`)",
        "the code is not imported (marker absent); exit 2, one line naming the settings key; without the key the "
        "folder loads as transformers' own class, its code still not imported",
    )


def test_a_file_cannot_choose_an_attention_kernel(tmp_path, finding):
    merged = tmp_path / "merged"
    shutil.copytree(LEGACY / "merged", merged)
    settings = merged / "lamra_pl_embedding.json"  # a version-1 settings file: named as it is
    values = json.loads(settings.read_text())
    settings.write_text(json.dumps({**values, "attn_implementation": "attacker/evil-kernel"}))
    clean_error(lamra_here(*commands(merged, tmp_path)["index"]), "lamra_pl_embedding.json", "attacker/evil-kernel")
    hparams = modern_hparams(LEGACY / "backbone")
    hparams["backbone"]["attn_implementation"] = "attacker/evil-kernel"
    ckpt = write_checkpoint(tmp_path / "shared.ckpt", hparams)
    clean_error(lamra_here(*commands(ckpt, tmp_path)["index"]), "hyper_parameters.backbone.attn_implementation")
    finding(
        "a checkpoint's or settings file's `attn_implementation` naming a Hub kernel repository (code to fetch)",
        "refused before loading: exit 2, one line naming the key (only transformers' own implementations are "
        "taken from a file)",
    )


def test_a_settings_file_naming_a_class_outside_the_project_is_refused(tmp_path, finding):
    merged = tmp_path / "merged"
    shutil.copytree(LEGACY / "merged", merged)
    for name in ("lamra_pl.json", "lamra_pl_embedding.json"):
        (merged / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    nested = {
        "backbone": {"rope": "1d"},
        "pooling": {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}},
    }
    for class_path, init_args, key in (
        ("subprocess.Popen", {"args": ["touch", str(marker)]}, "lamra_pl.json.class_path"),
        ("lamra_pl.EmbeddingModule", nested, "lamra_pl.json.init_args.pooling.class_path"),
    ):
        settings = {"format": "lamra-pl-settings", "version": 2, "class_path": class_path, "init_args": init_args}
        (merged / "lamra_pl.json").write_text(json.dumps(settings))
        clean_error(lamra_here(*commands(merged, tmp_path)["index"]), key, "'subprocess.Popen'")
    assert not marker.exists()
    finding(
        "a merged folder's settings naming `subprocess.Popen` as its class or inside its arguments",
        "refused before anything is imported; exit 2, one line naming the key",
    )


class Payload:
    """A pickled object: `weights_only` refuses to build it."""


@pytest.mark.parametrize("kind", ["missing", "truncated", "not a checkpoint", "pickle payload"])
def test_a_bad_ckpt_path_is_one_line(tmp_path, kind, finding):
    path = tmp_path / "bad.ckpt"
    if kind == "truncated":
        data = (LEGACY / "retriever.ckpt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not a checkpoint":
        path.write_text("epoch: 3\n")
    elif kind == "pickle payload":
        torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Payload()}, path)
    config = ("-c", "experiments/tiny/stage2_instruct.yaml", f"--model.init_args.backbone.path={LEGACY / 'backbone'}")
    fit = lamra_here("fit", *config, f"--ckpt_path={path}", "--trainer.max_steps=1", "--trainer.logger=false")
    clean_error(fit, str(path))
    index = lamra_here(*commands(path, tmp_path)["index"])
    clean_error(index, str(path))
    for proc in (fit, index):
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finding(f"`--ckpt_path` / `--model`: a {kind} checkpoint", "exit 2 with one line naming the file; no traceback")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (
            ("trainer:\n", "trainer:\n  max_stepz: 3\n"),
            ("unknown key 'trainer.max_stepz'", "did you mean trainer.max_steps"),
        ),
        (("      r: 32\n", "      r: thirty-two\n"), ("model.init_args.lora.init_args.r", "thirty-two")),
    ],
)
def test_a_bad_yaml_key_or_value_is_one_line_naming_the_file(tmp_path, change, needles, finding):
    config = tmp_path / "stage2.yaml"
    text = (ROOT / "experiments" / "tiny" / "stage2_instruct.yaml").read_text()
    assert change[0] in text
    config.write_text(text.replace(change[0], change[1], 1))
    proc = lamra_here("fit", "-c", str(config))
    clean_error(proc, str(config), *needles)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "usage:" not in proc.stderr
    assert "usage:" in lamra_here("fit", "--help").stdout  # the full usage stays one --help away
    finding(
        f"a YAML config with {'an unknown key' if 'unknown' in needles[0] else 'a value of the wrong type'}",
        "exit 2, one line: the file, the key and (for a typo) the closest valid key; no usage dump",
    )


def test_a_bad_trainer_setting_is_one_line(finding):
    backbone = f"--model.init_args.backbone.path={LEGACY / 'backbone'}"
    proc = lamra_here("fit", "-c", "experiments/tiny/stage2_instruct.yaml", backbone, "--trainer.devices=0")
    clean_error(proc, "devices")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finding("`--trainer.devices=0`", "exit 2 with Lightning's reason on one line; no traceback")
