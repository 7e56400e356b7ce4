"""Shard folders: WebDataset tar shards of samples (`lamra_pl.formats.sample`), written and found.

Layout version VERSION:

    FOLDER/
      shard-000000.tar, ...  plain (uncompressed) tar files, samples in order, at most `maxcount` each
      sizes.json             {shard file name: samples}: a manifest for people and tools; the training stream
                             counts samples from the tar headers themselves (`lamra_pl.data.stream.SampleIndex`)
      ids.txt                pool shard folders only: the candidates' ids in shard order (written by
                             `convert-mbeir`), so a search can be restricted to the pool without reading it
      .lamra_pl_incomplete   INCOMPLETE: present only while something is being written into the folder (below)

A shard spec names shards as a folder (every .tar below it, sorted), a glob of folders or files ("train/*_task1")
or a brace pattern ("data/train-{000000..000009}.tar").

Writing is atomic as seen by readers. Each tar is written under a temporary name beside it (`.shard-000000.tar.tmp-
PID`, which no spec matches) and renamed once complete, so a killed writer never leaves a truncated shard under a
shard's name. A folder being written carries the marker file INCOMPLETE from before its first shard until after
its sizes.json; `expand_shards` refuses a folder that carries it, or whose folder above carries it (a tool writing
a whole tree, e.g. `convert-mbeir`'s output folder, marks the top), so a killed or running writer's output is never
trained or evaluated on. Writing a prefix into a folder replaces that prefix's shards: none of an earlier write is
left.

The marker (MARKER_VERSION) is UTF-8 text, each line ending in a newline: MARKER_HEADER, then `<writer> <entry>` for
each thing being written, listed before its writing begins and removed once it is complete; the marker goes with its
last entry. Every writer goes through `mark_incomplete` / `unmark_incomplete`, which rewrite it atomically, and
removes only its own entries. The writers and their entries:

    lamra-pl incomplete 1
    write_shards shard                 `write_shards`: the shard prefix it writes into this folder
    convert-mbeir eval/test/global_pool   `convert-mbeir`: a folder under its output folder, relative to it

A marker of another format stops a writer with a one-line error (it belongs to something this version does not
know); readers refuse a marked folder whatever the marker holds.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import braceexpand
import webdataset as wds

from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.tar_index import SIZES_FILE, listed_sizes, parse_sample, scan_whole

VERSION = 1
POOL_IDS = "ids.txt"
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a shard prefix: a plain file name, no path
INCOMPLETE = ".lamra_pl_incomplete"  # a folder being written (or whose writer was killed): never read
MARKER_VERSION = 1
MARKER_HEADER = f"lamra-pl incomplete {MARKER_VERSION}"
WRITER = re.compile(r"[a-z][a-z0-9_-]*")  # a writer's name in the marker
WRITE_SHARDS = "write_shards"  # the name `write_shards` marks its prefixes with


def incomplete_entries(folder: Path) -> list[tuple[str, str]]:
    """The (writer, entry) lines of the folder's INCOMPLETE marker, in order; [] without one. A marker of another
    format is a one-line LamraError."""
    marker = folder / INCOMPLETE
    try:
        lines = marker.read_bytes().decode("utf-8").split("\n")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        raise LamraError(f"{marker} cannot be read as an in-progress marker ({err}); delete it") from None
    pairs = [line.split(" ", 1) for line in lines[1:-1]]
    if lines[0] != MARKER_HEADER or lines[-1] or not all(len(p) == 2 and WRITER.fullmatch(p[0]) for p in pairs):
        raise LamraError(
            f"{marker} is not a lamra-pl in-progress marker of this version; once nothing is writing into {folder}, "
            "delete it"
        )
    return list(dict.fromkeys((w, e) for w, e in pairs))


def mark_incomplete(folder: Path, writer: str, *entries: str) -> None:
    """Add `entries` of `writer` to the folder's INCOMPLETE marker, made if need be (with no entries: an empty
    marker, the folder is still refused), before they are written."""
    if not WRITER.fullmatch(writer) or not all(e and "\n" not in e for e in entries):
        raise ValueError(f"not a writer name and entries of one line: {writer!r}, {entries!r}")
    listed = incomplete_entries(folder)
    _write_marker(folder, list(dict.fromkeys([*listed, *((writer, e) for e in entries)])))


def unmark_incomplete(folder: Path, writer: str, *entries: str) -> None:
    """Remove `entries` of `writer` (every entry of it when none is named) from the folder's INCOMPLETE marker once
    they are written; the marker goes with its last entry."""
    kept = [(w, e) for w, e in incomplete_entries(folder) if w != writer or (entries and e not in entries)]
    if kept:
        _write_marker(folder, kept)
    else:
        (folder / INCOMPLETE).unlink(missing_ok=True)


def _write_marker(folder: Path, entries: list[tuple[str, str]]) -> None:
    atomic_write(folder / INCOMPLETE, "".join(f"{line}\n" for line in [MARKER_HEADER, *map(" ".join, entries)]))


class _ShardFile:
    """One tar being written under a temporary name, renamed to its own when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file: IO[bytes] = open(self.tmp, "wb")  # noqa: SIM115 (closed by commit or discard)
        self.tar = wds.TarWriter(self.file)

    def commit(self) -> None:
        self.tar.close()  # the tar's end blocks; the file stays open (it is ours)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        # Closed first, else the tar stream's finaliser writes its buffer to the closed file ("Exception ignored" on
        # stderr). It may fail as the write did (a full disk): the file is deleted anyway.
        with contextlib.suppress(Exception):
            self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000
) -> dict[str, int]:
    """Write samples (see `sample.encode_record`) to `out_dir/<prefix>-NNNNNN.tar`; return samples per shard.

    Atomic as readers see it (the module's docstring): each tar is renamed into place when complete, and the folder
    carries INCOMPLETE until sizes.json is written. The prefix's shards of an earlier write are removed first. No
    samples still make one (empty) shard, so the folder remains a shard folder.
    """
    if not PREFIX.fullmatch(prefix):
        raise LamraError(f"shard prefix {prefix!r} is not a plain file name (letters, digits, '_', '.', '-')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mark_incomplete(out, WRITE_SHARDS, prefix)
    ours = re.compile(rf"\.?{re.escape(prefix)}-\d{{6}}\.tar(\.tmp-\d+)?")
    for old in out.iterdir():
        if ours.fullmatch(old.name) and not old.is_dir():
            old.unlink()  # an earlier write of this prefix (perhaps killed): replaced, not mixed in
    sizes: Counter[str] = Counter()
    keys: set[str] = set()
    shard: _ShardFile | None = None
    number = 0
    try:
        for sample in samples:
            if sample["__key__"] in keys:
                raise BadSampleError(f"duplicate sample key {sample['__key__']!r} while writing {out}")
            keys.add(sample["__key__"])
            if shard is None or sizes[shard.path.name] >= maxcount:
                if shard is not None:
                    shard.commit()
                shard = _ShardFile(out / f"{prefix}-{number:06d}.tar")
                number += 1
            shard.tar.write(sample)
            sizes[shard.path.name] += 1
        if shard is None:
            shard = _ShardFile(out / f"{prefix}-{number:06d}.tar")
            sizes[shard.path.name] = 0
        shard.commit()
    except BaseException:
        if shard is not None:
            shard.discard()
        raise
    sizes_path = out / SIZES_FILE
    try:
        previous = json.loads(sizes_path.read_bytes()) if sizes_path.exists() else {}
    except (ValueError, RecursionError):
        previous = None  # not a manifest (it is rewritten below from what the folder holds now)
    if not isinstance(previous, dict):
        previous = {}
    previous = {name: n for name, n in previous.items() if not ours.fullmatch(name) and (out / name).is_file()}
    atomic_write(sizes_path, json.dumps({**previous, **sizes}, indent=1, sort_keys=True))
    unmark_incomplete(out, WRITE_SHARDS, prefix)  # only now: sizes.json is complete
    return dict(sizes)


def write_pool_ids(folder: str | Path, ids: Iterable[str]) -> Path:
    """A pool shard folder's ids.txt: its candidates' ids in shard order."""
    path = Path(folder) / POOL_IDS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def incomplete_folder(path: str | Path) -> Path | None:
    """The folder, `path` itself or one above it, that carries INCOMPLETE; None if there is none."""
    here = Path(os.path.abspath(path))
    for folder in (here, *here.parents):
        if (folder / INCOMPLETE).exists():
            return folder
    return None


def refuse_incomplete(folders: Iterable[Path], spec: str, below: Path | None = None) -> None:
    """A one-line LamraError if one of `folders` (or a folder above one, or below `below`) is being written."""
    found = [incomplete_folder(f) for f in sorted(set(folders))]
    if below is not None:
        found += [m.parent for m in sorted(below.rglob(INCOMPLETE))]
    found = [f for f in found if f is not None]
    if found:
        raise LamraError(
            f"shard folder {str(found[0])!r} (of {spec!r}) is incomplete: it carries {INCOMPLETE}, so its writer "
            "was killed or is still running; write it again"
        )


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a folder (every .tar below it, sorted), a glob of folders or files ("train/*_task1"),
    or a brace pattern ("data/train-{000000..000009}.tar"). Refuses (LamraError) the shards of a folder being
    written, or whose writer was killed (see the module's docstring)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.rglob("*.tar"))
        refuse_incomplete([path], spec, below=path)
        if not urls:
            raise LamraError(f"shard folder {spec!r} holds no .tar files")
        return urls
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(str(path)))
        urls = [u for m in matches for u in (expand_shards(m) if Path(m).is_dir() else [m]) if u.endswith(".tar")]
        if not urls:
            raise LamraError(f"no shards match {spec!r}")
        refuse_incomplete((Path(u).parent for u in urls), spec)
        return urls
    urls = list(braceexpand.braceexpand(str(path)))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise LamraError(f"shard file {missing[0]!r} does not exist ({len(missing)} of {len(urls)} missing)")
    refuse_incomplete((Path(u).parent for u in urls), spec)
    return urls


def read_samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The raw WebDataset samples of shards, in order: {"__key__", "__url__", member suffix: bytes, ...}.

    For evaluation and the tools, which must read every sample: a shard that would lose or merge samples
    (`tar_index.scan_whole`: unreadable, damaged, zeroed, a repeated key, another count than its sizes.json) is a
    BadSampleError naming it, never a silently shorter pool. (Training counts and skips these: `data.stream`.)
    """
    sizes: dict[Path, dict[str, Any]] = {}  # each folder's sizes.json, read once
    for url in urls:
        url = str(url)
        folder = Path(url).parent
        if folder not in sizes:
            sizes[folder] = listed_sizes(folder)
        scan = scan_whole(url, sizes[folder].get(Path(url).name))
        with open(url, "rb") as f:
            for sample in scan.samples:
                yield parse_sample(os.pread(f.fileno(), sample.end - sample.start, sample.start), url)
