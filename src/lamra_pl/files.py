"""Atomic file and folder writes: a reader (or a resumed run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


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


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: yields a temporary folder beside `path` to write into, renamed to `path`
    when the block ends, removed when it raises. `path` must not exist, or be an empty folder (the caller refuses
    anything else: an existing folder's files are never mixed with new ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own leftover, from an earlier failed attempt
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, path)


def __getattr__(name: str) -> Any:
    # `lamra_pl.files.AtomicCheckpointIO` is the class path that configs of earlier versions name (LightningCLI
    # dumps it into every run's config.yaml); the class now lives with the checkpoint format, and importing it
    # here lazily keeps this module free of Lightning (seconds of start-up for every tool that writes a file).
    if name == "AtomicCheckpointIO":
        from lamra_pl.formats.checkpoint import AtomicCheckpointIO

        return AtomicCheckpointIO
    raise AttributeError(f"module 'lamra_pl.files' has no attribute {name!r}")
