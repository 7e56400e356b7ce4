"""Byte ranges of the samples in WebDataset tar shards, for random access without reading a shard through.

Shards are plain (uncompressed) tar files, so a sample (consecutive members sharing a key, as WebDataset groups
them) is one byte range: from its first member's header to the end of its last member's data. `scan_tar` reads
only the headers (tarfile seeks over the data), and says when a shard is damaged: a well-formed tar ends with
at least two zero blocks after its last member, padded with zeros to a whole record of the blocking factor it was
written with (10 KiB by Python's tarfile and GNU tar's default, 32 KiB by `tar -b 64`, any number of blocks), so
anything else after the last readable member (a truncated file, a corrupt header, bytes that are not zero, a tail
that does not end on a 512-byte block) is reported, and the last sample before the damage, which may have lost
members, is left out of the ranges.

Keys are unique within a shard: a sample whose key an earlier sample of the same shard has (after other samples,
or right after it, which WebDataset would merge into one sample) is left out of the ranges and reported in
`TarScan.repeated`: the first sample with a key wins. Keys are not compared across shards (the byte ranges keep
such samples apart). A shard that yields no sample says whether its bytes are all zero (`TarScan.zeroed`): a file
of zeros reads as an empty tar of any size, so a zeroed shard (a disk or a copy that lost the data) differs from an
empty one by its size only, or by what its folder's sizes.json says.

Readers that must read every sample (indexing, evaluation, the tools) take a shard through `scan_whole`: damage, a
repeated key, or a count that differs from its folder's sizes.json (`listed_sizes`) is a BadSampleError naming the
shard; an empty tar that sizes.json lists as empty, or does not list, is read as empty. (Training counts and skips
such shards instead: `lamra_pl.data.stream`.)
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats import read_json

BLOCK = tarfile.BLOCKSIZE
# An empty archive as Python's tarfile and GNU tar write it by default: two zero blocks padded to a 20-block record.
# A file of zeros no longer than this is an empty tar; a longer one is rather a zeroed shard (`lamra_pl.data.stream`).
EMPTY_TAR = tarfile.RECORDSIZE
CHUNK = 1 << 20  # bytes read at a time when a tail or a file is checked for zeros
SIZES_FILE = "sizes.json"  # a shard folder's {shard file name: samples} (`lamra_pl.formats.shards`)


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
    # No member at all and a tail of zeros to the end: the whole file is zeros (already read, not read again).
    zeroed = not samples and size > 0 and ((current is None and damage is None) or _all_zero(url))
    return TarScan(url, samples, damage, repeated, size, zeroed=zeroed)


def _all_zero(url: str) -> bool:
    with Path(url).open("rb") as f:
        return _first_nonzero(f, 0, Path(url).stat().st_size) is None


def _first_nonzero(fileobj: Any, start: int, end: int) -> int | None:
    """The offset of the first byte that is not zero in [start, end) of a file, read in chunks; None if all are."""
    fileobj.seek(start)
    position = start
    while position < end:
        chunk = fileobj.read(min(CHUNK, end - position))
        if not chunk:
            return position  # the file shrank while being read: its bytes there are not the zeros counted on
        rest = chunk.lstrip(b"\0")
        if rest:
            return position + len(chunk) - len(rest)
        position += len(chunk)
    return None


def _tail_damage(fileobj: Any, end: int, size: int) -> str | None:
    """Why the bytes after the last member (from `end`) are not a tar's end, or None: at least two zero blocks,
    zeros up to a whole number of blocks (the record padding of any blocking factor)."""
    tail = size - end
    if tail < 2 * BLOCK:
        return f"truncated: {tail} bytes after the last member, where a complete tar has at least {2 * BLOCK}"
    if tail % BLOCK:
        return f"{tail} bytes after byte {end} are not whole {BLOCK}-byte blocks, as the end of a tar is"
    nonzero = _first_nonzero(fileobj, end, size)
    if nonzero is not None:
        return (
            f"bytes after byte {end} are neither tar members nor the end-of-archive blocks (byte {nonzero} is not zero)"
        )
    return None


def listed_sizes(folder: str | Path) -> dict[str, Any]:
    """A shard folder's sizes.json, {shard file name: samples} as its writer wrote it: {} when the folder has none,
    or it is not readable JSON or not a mapping (it is a manifest for people: the shards themselves are read)."""
    try:
        sizes = read_json(Path(folder) / SIZES_FILE, "a sizes manifest")
    except LamraError:
        return {}
    return sizes if isinstance(sizes, dict) else {}


def scan_whole(url: str, listed: Any = None, read: Collection[str] = ()) -> TarScan:
    """`scan_tar` for readers that must read every sample of a shard (indexing, evaluation, the tools): a shard
    that cannot be read as a tar, is damaged, repeats a key (WebDataset would merge or double the sample) or holds
    another number of samples than `listed` (its entry in its folder's sizes.json, `listed_sizes`; None: none)
    says, e.g. a zeroed shard that reads as an empty tar, is a BadSampleError naming it, never a silently shorter
    pool. An empty tar that sizes.json lists as 0, or does not list, is an empty shard."""
    try:
        scan = scan_tar(url, read)
    except (OSError, tarfile.TarError) as err:
        raise BadSampleError(f"shard {url} cannot be read as a tar ({type(err).__name__}: {err})") from None
    if scan.damage is not None:
        raise BadSampleError(f"shard {url} is damaged: {scan.damage}")
    if scan.repeated:
        raise BadSampleError(f"shard {url}: sample key {scan.repeated[0].key!r} repeats an earlier sample's")
    if isinstance(listed, int) and not isinstance(listed, bool) and listed != len(scan.samples):
        raise BadSampleError(f"shard {url} holds {len(scan.samples)} samples; its folder's {SIZES_FILE} says {listed}")
    return scan


def parse_sample(data: bytes, url: str) -> dict[str, Any]:
    """The WebDataset sample held by one sample's byte range: {"__key__", "__url__", suffix: bytes, ...}."""
    sample: dict[str, Any] = {"__url__": url}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                sample["__key__"], suffix = split_key(member.name)
                sample[suffix] = tar.extractfile(member).read()
    return sample
