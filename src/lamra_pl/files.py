"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write `data` (text, bytes, or a function writing to a binary file) to `path` via a temporary + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


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
