"""The evaluation pipeline over validation and test shards: every sample exactly once over all ranks and workers,
with the collator's deterministic choices, batched with the counts of what was skipped."""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import webdataset as wds

from lamra_pl.data.collate import Collator
from lamra_pl.errors import BadSampleError
from lamra_pl.formats.sample import SKIP_REASONS, Record, UnreadableImage, decode_record, sample_location
from lamra_pl.formats.shards import read_samples

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ pipeline stages
@dataclass
class Skip:
    reason: str
    where: str


@dataclass
class Failure:
    message: str


def to_records(samples: Iterator[dict[str, Any]]) -> Iterator[Record | Skip | Failure]:
    for sample in samples:
        where = sample_location(sample)
        try:
            yield decode_record(sample)
        except UnreadableImage as err:
            log.warning("skipping %s: %s", where, err)
            yield Skip("unreadable_image", where)
        except BadSampleError as err:
            yield Failure(str(err))


def to_examples(
    records: Iterator[Record | Skip | Failure],
    *,
    choose: Callable[[Record, random.Random | None, int], Any],
    num_negatives: int,
) -> Iterator[Any]:
    """One example per record, by `choose` with `rng=None`: the deterministic evaluation choice (the retriever's:
    its first positive, first instruction and first `num_negatives` hard negatives). Training makes its
    random choices in `lamra_pl.data.stream`."""
    for record in records:
        if not isinstance(record, Record):
            yield record
            continue
        if len(record.negatives) < num_negatives:
            yield Failure(
                f"sample {record.key!r} (qid {record.qid}) has {len(record.negatives)} hard negatives but "
                f"data.num_negatives is {num_negatives}"
            )
            continue
        try:
            yield choose(record, None, num_negatives)
        except BadSampleError as err:  # a record the collator cannot use (e.g. no list for model.distill): one line
            yield Failure(str(err))


def to_batches(
    examples: Iterator[Any],
    *,
    batch_size: int,
    collate: Callable[[list[Any]], dict[str, Any]],
    partial_last: bool,
) -> Iterator[dict[str, Any]]:
    """Collated batches, each carrying the counts of samples skipped since the previous batch.

    A bad sample becomes a batch `{"error": message}`, raised in the main process by the DataModule, so the
    user sees the message rather than a worker traceback.
    """
    buffer: list[Any] = []
    skipped: Counter[str] = Counter()

    def emit() -> dict[str, Any]:
        batch = collate(buffer)
        batch["skipped"] = torch.tensor([skipped[r] for r in SKIP_REASONS], dtype=torch.long)
        buffer.clear()
        skipped.clear()
        return batch

    for item in examples:
        if isinstance(item, Failure):
            yield {"error": item.message}
            return
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            continue
        buffer.append(item)
        if len(buffer) == batch_size:
            yield emit()
    if buffer and partial_last:
        yield emit()


def _split_by_node(src: Iterable[Any], rank: int, world: int) -> Iterator[Any]:
    for i, item in enumerate(src):
        if i % world == rank:
            yield item


def _samples(urls: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every sample of each shard (this rank's and worker's), or an error naming a shard that would lose or merge
    samples: one `read_samples` over the stream of shards, so each folder's sizes.json is read once."""
    return read_samples(shard["url"] for shard in urls)


def eval_pipeline(
    urls: list[str],
    *,
    batch_size: int,
    collate: Collator,
    num_negatives: int,
    rank: int,
    world: int,
) -> wds.DataPipeline:
    """Every sample exactly once over all ranks and workers, with deterministic choices; align by id."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        partial(_split_by_node, rank=rank, world=world),
        wds.split_by_worker,
        _samples,
        partial(to_records),
        partial(to_examples, choose=collate.choose, num_negatives=num_negatives),
        partial(to_batches, batch_size=batch_size, collate=collate, partial_last=True),
    )
