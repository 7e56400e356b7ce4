"""Every on-disk contract of lamra-pl, one module each, each with its layout and its version.

    sample.py       a shard sample (one query with its candidates; a pool candidate) and the query an evaluation
                    encodes
    shards.py       shard folders: writing, `sizes.json`, globbing
    tar_index.py    samples' byte ranges inside a tar shard, damage detection
    task.py         an evaluation task folder (task.json, qrels.txt, queries/, pool/ids.txt)
    runs.py         a run folder (TREC run files, the versioned runs.json)
    index.py        an index folder (embeddings, ids, items, index.json)
    settings.py     the settings file a model folder carries (how `merge`d weights read their inputs)
    tensorboard.py  a TensorBoard run folder (hparams, hp/* final metrics, curves)

Modules here import nothing of the project but `lamra_pl.errors` and `lamra_pl.files`: every other layer reads and
writes its files through them.

This package's own module holds what several contracts share (and imports none of them):

    portable_path, resolve_path   paths stored in an artefact: relative to the artefact's folder, resolved against
                                  where the artefact is now
    read_json, parse_json         JSON from a file that may be anything: every failure a one-line LamraError
    safe_name, SAFE_NAME          a file name made from data (a task name, a dataset name): a plain name
    spec_root, shard_fingerprint  the folder a shard spec's names are relative to; what a shard file is (name, size
                                  and a digest of its ends), for the resumes that must see the same inputs
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError

# A file or folder name made from data (a task name in runs.json, a dataset name in M-BEIR's files): letters, digits,
# `_ . -`, starting with a letter or digit, at most 200 characters, and (`safe_name`) no "..": `folder / name` stays
# in `folder`.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
ENDS = 1 << 16  # bytes read at each end of a shard for its fingerprint


def safe_name(name: object) -> bool:
    """Whether `name` is a plain file name (SAFE_NAME, without ".."), so `folder / name` names a file in `folder`."""
    return isinstance(name, str) and bool(SAFE_NAME.fullmatch(name)) and ".." not in name


# ------------------------------------------------------------------------------------------------- paths
def portable_path(path: str, folder: str | Path) -> str:
    """How an artefact in `folder` stores `path` (given absolute, or relative to the working directory): an
    absolute path as given, a relative one relative to `folder`, so the artefact moved together with what it names
    still finds it (`resolve_path`)."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def resolve_path(stored: str, folder: str | Path, relative_to_folder: bool = True) -> str:
    """Where a path stored in an artefact that is now in `folder` is: an absolute path as stored; a relative one
    against `folder` (as `portable_path` stores it), or, for artefacts that stored paths as given
    (`relative_to_folder` False: relative to the working directory of the run that wrote them), against the
    working directory first, then against `folder`."""
    if os.path.isabs(stored):
        return stored
    beside = os.path.normpath(os.path.join(folder, stored))
    if relative_to_folder or (not os.path.exists(stored) and os.path.exists(beside)):
        return beside
    return stored


# -------------------------------------------------------------------------------------------------- JSON
def parse_json(text: str | bytes, where: str) -> Any:
    """`text` as JSON; every way it can fail (bytes that are not UTF-8, not JSON, nested too deep, a number too long
    to convert) is a one-line LamraError that starts with `where` (a file, or `file:line`)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as err:
        problem = f"not UTF-8 text (byte {err.start})"
    except json.JSONDecodeError as err:
        problem = f"not JSON ({err})"
    except RecursionError:
        problem = "its JSON nests too deep"
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        problem = f"not readable JSON ({err})"
    raise LamraError(f"{where}: {' '.join(problem.split())}")


def read_json(path: str | Path, what: str) -> Any:
    """The JSON value in the file `path`, which should hold `what` (e.g. "a lamra-pl-runs manifest"). Every way the
    read can fail (the file missing or unreadable, not UTF-8, not JSON, nested too deep, a number too long) is a
    one-line LamraError naming the path and `what`; what the value holds is the caller's to check."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LamraError(f"{path} does not exist (expected {what})") from None
    except OSError as err:
        raise LamraError(f"{path} cannot be read ({err.strerror or type(err).__name__}); expected {what}") from None
    return parse_json(data, f"{path} is not {what}")


# ---------------------------------------------------------------------------------------- shard inputs
def spec_root(spec: str) -> Path:
    """The folder a shard spec's shard names are relative to: the folder itself, or the path before its first part
    with a wildcard or a brace ("data/{a,b}/x-*.tar" -> "data"), or a single file's folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    for i, part in enumerate(path.parts):
        if any(c in part for c in "*?[{"):
            return Path(*path.parts[:i])
    return path.parent


def shard_fingerprint(url: str, root: str | Path) -> list[Any]:
    """What a shard file is, wherever it lies: [its name relative to `root` (its spec's `spec_root`), its size in
    bytes, a digest of its first and last ENDS bytes]. Tar sizes move in whole records, so a size alone misses most
    edits; a rewritten shard has new member headers (names, sizes, times) and data at its start. Cheap on any pool.
    A file that cannot be read is a LamraError naming it."""
    digest = hashlib.sha256()
    try:
        with open(url, "rb") as f:
            digest.update(f.read(ENDS))
            size = f.seek(0, os.SEEK_END)
            f.seek(max(ENDS, size - ENDS))
            digest.update(f.read(ENDS))
    except OSError as err:
        raise LamraError(f"shard {url} cannot be read ({err.strerror or type(err).__name__})") from None
    return [os.path.relpath(url, root), size, digest.hexdigest()[:16]]
