"""Evaluation items: the queries or pool candidates of shard folders, read in chunks (one input shard each) and
batched for embedding, by `lamra-pl index` / `retrieve` (`lamra_pl.pipelines.encode`) and by validation on task
pools during `fit` alike.

Chunks are numbered over all jobs; a chunk is read whole, and its items are sorted by length so that a batch pads
little (`bucket=True`). Each batch carries where its items go (their positions in the chunk), the chunk's number
and its batch count, so a writer can put every chunk back in shard order once all its batches are embedded. A chunk
is always batched the same way, so its embeddings do not depend on when, or by which rank, it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch.utils.data import IterableDataset

from lamra_pl.data.collate import ItemEncoder
from lamra_pl.errors import BadSampleError
from lamra_pl.formats.sample import (
    Item,
    UnreadableImage,
    decode_candidate,
    decode_record,
    evaluation_query,
    sample_location,
)
from lamra_pl.formats.shards import expand_shards, read_samples

Kind = Literal["pool", "queries"]
T = TypeVar("T")


def worker_share(units: Sequence[T]) -> Sequence[T]:
    """This data worker's units of an iterable dataset: every W-th from its own number (all, outside a worker)."""
    info = torch.utils.data.get_worker_info()
    return units[info.id :: info.num_workers] if info else units


@dataclass(frozen=True)
class Job:
    """Encode the shards of `sources` (pool candidates, or the queries of query records) into index `out`."""

    out: str
    sources: tuple[str, ...]
    kind: Kind


@dataclass(frozen=True)
class Chunk:
    number: int  # over all jobs: decides the rank
    job: int
    local: int  # the chunk's number within its job's index
    url: str
    kind: Kind


def plan(jobs: list[Job]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for j, job in enumerate(jobs):
        urls = [u for spec in job.sources for u in expand_shards(spec)]
        chunks += [Chunk(len(chunks) + i, j, i, url, job.kind) for i, url in enumerate(urls)]
    return chunks


def read_chunk(chunk: Chunk, instruction_seed: int | None, instructions: bool = True) -> list[Item]:
    items = []
    for sample in read_samples([chunk.url]):
        try:
            items.append(
                decode_candidate(sample)
                if chunk.kind == "pool"
                else evaluation_query(decode_record(sample), instruction_seed, instructions)
            )
        except UnreadableImage as err:
            # An index must hold its whole pool: a missing candidate would silently change every metric.
            raise BadSampleError(f"{sample_location(sample)}: {err}") from err
    return items


def batch_rows(items: Sequence[Item], collator: ItemEncoder, batch_size: int, bucket: bool = True) -> list[list[int]]:
    """How `items` are batched for embedding: lists of at most `batch_size` positions, in length order (ties in
    input order) with `bucket`, so that a batch pads little; in input order without. The same items always give the
    same batches (an index's chunks, the Python API's lists)."""
    order = list(range(len(items)))
    if bucket:
        lengths = [collator.length(item) for item in items]
        order.sort(key=lambda i: (lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class ChunkedItems(IterableDataset):
    """Batches of `chunks`, each chunk read whole and (with `bucket`) sorted by length before batching; the data
    workers share the chunks out."""

    def __init__(
        self,
        chunks: list[Chunk],
        collator: ItemEncoder,
        batch_size: int,
        bucket: bool = True,
        instruction_seed: int | None = None,
        sources: list[str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.sources = sources  # a name per job, passed on with its batches (validation groups by it)
        self.collator = collator
        self.batch_size = batch_size
        self.bucket = bucket
        self.instruction_seed = instruction_seed

    @property
    def units(self) -> int:
        """Chunks to read: no more data workers than this are useful."""
        return len(self.chunks)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in worker_share(self.chunks):
            # A model trained without instructions (its collator says so) is evaluated without them.
            items = read_chunk(chunk, self.instruction_seed, self.collator.instructions)
            batches = batch_rows(items, self.collator, self.batch_size, self.bucket) or [[]]
            for rows in batches:
                yield {
                    "items": self.collator.encode([items[i] for i in rows]) if rows else None,
                    "positions": torch.tensor(rows, dtype=torch.long),
                    "records": [_record(items[i]) for i in rows],
                    "chunk": chunk.number,
                    "num_batches": len(batches),
                    "source": self.sources[chunk.job] if self.sources else None,
                    "kind": chunk.kind,
                }


def _record(item: Item) -> dict[str, Any]:
    if item.video is not None:  # a video's source under "vid", so the index knows the row's modality
        return {"id": item.id, "txt": item.text, "img": None, "vid": item.source or "video"}
    if item.parts is not None:  # an interleaved item: its texts joined, its first image's source
        texts = [t for t in (item.text, *item.parts) if isinstance(t, str)]
        return {"id": item.id, "txt": " ".join(texts) or None, "img": item.source or "interleaved"}
    return {"id": item.id, "txt": item.text, "img": item.source}
