"""A `lamra-pl fit` checkpoint: Lightning's .ckpt file, read as data, with its paths relative to itself.

Layout version VERSION (a torch zip file, read with `torch.load(weights_only=True)` only):

    {"state_dict": {name: tensor},          the module's trainable tensors only (LoRA, unfrozen parts)
     "hyper_parameters": {"_class_path": "lamra_pl.EmbeddingModule", "_instantiator": ...,
                          "backbone": {"path": ..., ...}, "lora": {...}, "optimizer": {"class_path": ...}, ...},
                                            the module's own arguments as LightningCLI recorded them
     "lamra_pl_resume": {...},              the training policies' state (`lamra_pl.callbacks`)
     "lamra_pl_checkpoint": {"format": "lamra-pl-checkpoint", "version": 1, "paths": "relative to the file"},
     ...}                                   Lightning's own keys (optimizer states, loops, datamodule state)

Paths. `CheckpointWriter` (the default `trainer.plugins` of `lamra-pl fit`) writes a relative backbone path
relative to the checkpoint's folder (an absolute one as given), so a checkpoint folder moved together with its
backbone, or used from another working directory, still finds it (`backbone_path`). Checkpoints without the
`lamra_pl_checkpoint` key (written before it, or by another writer) hold the path as it was given: relative to the
working directory of the run; they are read that way, then relative to the file.

Trust. Nothing in a checkpoint is run: it is read with weights_only=True (no pickle payload executes) and the
class paths its hyper-parameters name are data that `lamra_pl.models.checkpoints` checks against an allow-list
(`class_paths` lists them with their keys).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats import portable_path, resolve_path

FORMAT, VERSION = "lamra-pl-checkpoint", 1
KEY = "lamra_pl_checkpoint"
RELATIVE_TO_FILE = "relative to the file"


def read(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`, loaded with weights_only=True; a one-line LamraError when it is missing, not a
    checkpoint, truncated or holds objects other than tensors and plain values."""
    p = Path(path)
    if not p.exists():
        raise LamraError(f"checkpoint {str(path)!r} does not exist")
    if not p.is_file():
        raise LamraError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(p):
        raise LamraError(f"{path} is not a checkpoint (not a torch zip file: truncated, or another kind of file)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated member, or a pickle naming what weights_only refuses
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LamraError(f"{path} is not a readable lamra-pl checkpoint ({type(err).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise LamraError(f"{path} is not a Lightning checkpoint (no 'state_dict' mapping)")
    return ckpt


def global_step(path: str | Path) -> int | None:
    """The training step a `fit` checkpoint at `path` was saved at (Lightning's "global_step"); None when `path` is
    not a file (a merged model folder, which has no step). A file that is no checkpoint is a LamraError (`read`)."""
    if not Path(path).is_file():
        return None
    step = read(path).get("global_step")
    return int(step) if isinstance(step, int) else None


def class_paths(value: Any, key: str = "hyper_parameters") -> Iterator[tuple[str, str]]:
    """(key, class path) of every `class_path` (and Lightning's `_class_path`, `_instantiator`) in `value`."""
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{key}.{k}"
            if k in ("class_path", "_class_path", "_instantiator"):
                yield where, v if isinstance(v, str) else repr(v)
            else:
                yield from class_paths(v, where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from class_paths(v, f"{key}[{i}]")


def portable(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint to write at `path`, its relative backbone path made relative to the checkpoint's folder."""
    hparams = checkpoint.get("hyper_parameters")
    backbone = hparams.get("backbone") if isinstance(hparams, dict) else None
    out = {**checkpoint, KEY: {"format": FORMAT, "version": VERSION, "paths": RELATIVE_TO_FILE}}
    if isinstance(backbone, dict) and isinstance(backbone.get("path"), str):
        stored = portable_path(backbone["path"], Path(path).parent)
        out["hyper_parameters"] = {**hparams, "backbone": {**backbone, "path": stored}}
    return out


def backbone_path(stored: str, checkpoint: dict[str, Any], path: str | Path) -> str:
    """Where the backbone a checkpoint at `path` names is: an absolute path as stored; a relative one against the
    checkpoint's folder (or, for checkpoints of another writer, the working directory first)."""
    marked = isinstance(checkpoint.get(KEY), dict) and checkpoint[KEY].get("paths") == RELATIVE_TO_FILE
    return resolve_path(stored, Path(path).parent, relative_to_folder=marked)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on local disks: a kill during a save leaves the previous checkpoint.

    Lightning's own save goes through an fsspec transaction, which writes to the system temp folder and moves
    the file into place; across file systems that move is a copy, and a kill during it leaves half a checkpoint
    under the final name. Here the temporary is beside the target, so the rename is atomic. Remote paths
    (s3://, ...) keep Lightning's way. `lamra-pl fit` uses this by default (`trainer.plugins`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(str(path).removeprefix("file://"), lambda f: torch.save(checkpoint, f))


class CheckpointWriter(AtomicCheckpointIO):
    """lamra-pl's checkpoint IO (the default `trainer.plugins` of `lamra-pl fit`): atomic writes
    (`AtomicCheckpointIO`) of portable checkpoints (`portable`), read back with weights_only=True and one-line
    errors (`read`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):  # a remote file: no folder to be relative to
            return super().save_checkpoint(checkpoint, path, storage_options)
        super().save_checkpoint(portable(checkpoint, str(path).removeprefix("file://")), path, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().load_checkpoint(path, weights_only=True)
        return read(str(path).removeprefix("file://"))
