"""Byte ranges of the samples in WebDataset tar shards, for random access without reading a shard through.

Shards are plain (uncompressed) tar files, so a sample (consecutive members sharing a key, as WebDataset groups
them) is one byte range: from its first member's header to the end of its last member's data. `scan_tar` reads
only the headers (tarfile seeks over the data), and says when a shard is damaged: a well-formed tar ends with
at least two zero blocks after its last member, so anything else after the last readable member (a truncated
file, a corrupt header) is reported, and the last sample before the damage, which may have lost members, is
left out of the ranges.

Keys are unique within a shard: a sample whose key an earlier sample of the same shard has (after other samples,
or right after it, which WebDataset would merge into one sample) is left out of the ranges and reported in
`TarScan.repeated`: the first sample with a key wins. Keys are not compared across shards (the byte ranges keep
such samples apart). A shard that yields no sample says whether its bytes are all zero (`TarScan.zeroed`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = tarfile.BLOCKSIZE
# Python's tarfile and GNU tar pad an archive to 20-block records after the two zero blocks that end it.
MAX_TAIL = 2 * BLOCK + tarfile.RECORDSIZE


@dataclass
class TarSample:
    key: str
    start: int  # offset of its first member's header
    end: int  # offset just after its last member's (padded) data
    members: list[tuple[str, int, int]] = field(default_factory=list)  # (suffix after the key, data offset, size)
    data: dict[str, bytes] = field(default_factory=dict)  # members read during the scan (`read=`)


@dataclass
class TarScan:
    url: str
    samples: list[TarSample]
    damage: str | None = None  # why the shard could not be read to its end (None: it was)
    repeated: list[TarSample] = field(default_factory=list)  # later samples with an earlier sample's key: left out
    size: int = 0  # the file's bytes
    zeroed: bool = False  # no sample, and every byte is zero (a zeroed file); checked only when there is no sample


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix


def scan_tar(url: str, read: Collection[str] = ()) -> TarScan:
    """The samples of one tar shard with their byte ranges; members whose suffix is in `read` are read too.

    Raises OSError or tarfile.ReadError when the file cannot be opened as a tar at all.
    """
    samples: list[TarSample] = []
    repeated: list[TarSample] = []
    keys: set[str] = set()
    current: TarSample | None = None  # the sample being read (in `samples` or in `repeated`)
    damage = None
    size = Path(url).stat().st_size
    with tarfile.open(url, mode="r:") as tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = split_key(member.name)
                if current is None or current.key != key or any(s == suffix for s, _, _ in current.members):
                    current = TarSample(key, member.offset, member.offset)
                    (repeated if key in keys else samples).append(current)
                    keys.add(key)
                current.members.append((suffix, member.offset_data, member.size))
                current.end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                if suffix in read and current is samples[-1]:
                    current.data[suffix] = tar.extractfile(member).read()
        except tarfile.ReadError as err:
            damage = f"unreadable after byte {current.end if current else 0} ({err})"
        end = current.end if current else 0
        if damage is None:
            damage = _tail_damage(tar.fileobj, end, size)
    if damage is not None and samples and current is samples[-1]:
        samples.pop()  # it may have lost members to the damage
    return TarScan(url, samples, damage, repeated, size, zeroed=not samples and size > 0 and _all_zero(url))


def _all_zero(url: str) -> bool:
    with Path(url).open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return False
    return True


def _tail_damage(fileobj: Any, end: int, size: int) -> str | None:
    tail = size - end
    if tail < 2 * BLOCK:
        return f"truncated: {tail} bytes after the last member, where a complete tar has at least {2 * BLOCK}"
    if tail > MAX_TAIL:
        return f"{tail} bytes after byte {end} could not be read as tar members"
    fileobj.seek(end)
    if fileobj.read(tail).strip(b"\0"):
        return f"bytes after byte {end} are neither tar members nor the end-of-archive blocks"
    return None


def parse_sample(data: bytes, url: str) -> dict[str, Any]:
    """The WebDataset sample held by one sample's byte range: {"__key__", "__url__", suffix: bytes, ...}."""
    sample: dict[str, Any] = {"__url__": url}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                sample["__key__"], suffix = split_key(member.name)
                sample[suffix] = tar.extractfile(member).read()
    return sample
