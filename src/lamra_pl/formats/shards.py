"""Shard folders: WebDataset tar shards of samples (`lamra_pl.formats.sample`), written and found.

Layout version VERSION:

    FOLDER/
      shard-000000.tar, ...  plain (uncompressed) tar files, samples in order, at most `maxcount` each
      sizes.json             {shard file name: samples}: a manifest for people and tools; the training stream
                             counts samples from the tar headers themselves (`lamra_pl.data.stream.SampleIndex`)
      ids.txt                pool shard folders only: the candidates' ids in shard order (written by
                             `convert-mbeir`), so a search can be restricted to the pool without reading it

A shard spec names shards as a folder (every .tar below it, sorted), a glob of folders or files ("train/*_task1")
or a brace pattern ("data/train-{000000..000009}.tar").
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds

from lamra_pl.errors import BadSampleError, LamraError

VERSION = 1
SIZES_FILE = "sizes.json"
POOL_IDS = "ids.txt"


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000
) -> dict[str, int]:
    """Write samples (see `sample.encode_record`) to `out_dir/<prefix>-NNNNNN.tar`; return samples per shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes: Counter[str] = Counter()
    keys: set[str] = set()
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            if sample["__key__"] in keys:
                raise BadSampleError(f"duplicate sample key {sample['__key__']!r} while writing {out}")
            keys.add(sample["__key__"])
            sink.write(sample)
            sizes[Path(sink.fname).name] += 1
    sizes_path = out / SIZES_FILE
    previous = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    sizes_path.write_text(json.dumps({**previous, **sizes}, indent=1, sort_keys=True))
    return dict(sizes)


def write_pool_ids(folder: str | Path, ids: Iterable[str]) -> Path:
    """A pool shard folder's ids.txt: its candidates' ids in shard order."""
    path = Path(folder) / POOL_IDS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a folder (every .tar below it, sorted), a glob of folders or files ("train/*_task1"),
    or a brace pattern ("data/train-{000000..000009}.tar")."""
    path = Path(spec).expanduser()
    if path.is_dir():
        urls = sorted(str(p) for p in path.rglob("*.tar"))
        if not urls:
            raise LamraError(f"shard folder {spec!r} holds no .tar files")
        return urls
    if any(c in spec for c in "*?["):
        matches = sorted(glob.glob(str(path)))
        urls = [u for m in matches for u in (expand_shards(m) if Path(m).is_dir() else [m]) if u.endswith(".tar")]
        if not urls:
            raise LamraError(f"no shards match {spec!r}")
        return urls
    urls = list(braceexpand.braceexpand(str(path)))
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise LamraError(f"shard file {missing[0]!r} does not exist ({len(missing)} of {len(urls)} missing)")
    return urls


def read_samples(urls: list[str]) -> Iterable[dict[str, Any]]:
    """The raw WebDataset samples of shards, in order: {"__key__", "__url__", member suffix: bytes, ...}."""
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())
