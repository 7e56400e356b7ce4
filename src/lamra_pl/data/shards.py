"""Writing and streaming WebDataset shards of the sample schema in `lamra_pl.data.schema`.

Shard folders carry a `sizes.json` (samples per shard), a manifest for people and tools; the training stream
counts samples from the tar headers themselves (`lamra_pl.data.stream.SampleIndex`).
"""

from __future__ import annotations

import glob
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import braceexpand
import torch
import webdataset as wds

from lamra_pl.data.schema import (
    SKIP_REASONS,
    Example,
    Item,
    Record,
    UnreadableImage,
    decode_record,
    sample_location,
    with_instruction,
)
from lamra_pl.errors import BadSampleError, LamraError

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
POOL_IDS = "ids.txt"  # in a candidate-pool shard folder: its ids in shard order (written by convert-mbeir)


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str = "shard", maxcount: int = 1000
) -> dict[str, int]:
    """Write samples (see `schema.encode_record`) to `out_dir/<prefix>-NNNNNN.tar`; return samples per shard."""
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


class Collator(Protocol):
    """What a LightningModule's `collator()` gives the data pipelines: how one record becomes a training example
    (`choose`, seeded by `rng`; `rng=None` is the deterministic evaluation choice) and how examples become a batch."""

    def choose(self, record: Record, rng: random.Random | None, num_negatives: int) -> Any: ...

    def __call__(self, examples: list[Any]) -> dict[str, Any]: ...


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
        yield choose(record, None, num_negatives)


def choose_example(record: Record, rng: random.Random | None, num_negatives: int, instructions: bool = True) -> Example:
    """One positive, one instruction (prepended to the query text) and `num_negatives` negatives of a record.

    `rng=None` is the deterministic evaluation choice: the first of each. `instructions=False` leaves the query
    text bare (the "no instruction" ablation).
    """
    instruction_choices = record.instructions if instructions else []
    if rng is None:
        positive = record.positives[0]
        instruction = instruction_choices[0] if instruction_choices else None
        negatives = record.negatives[:num_negatives]
    else:
        # LamRA's call order: positive, then instruction.
        positive = rng.choice(record.positives)
        instruction = rng.choice(instruction_choices) if instruction_choices else None
        negatives = rng.sample(record.negatives, num_negatives)
    query = Item(record.qid, with_instruction(instruction, record.query.text), record.query.image)
    return Example(query, positive, negatives, [p.id for p in record.positives])


def evaluation_query(record: Record, instruction_seed: int | None = None, instructions: bool = True) -> Item:
    """The query an evaluation encodes, with its instruction chosen deterministically.

    `instruction_seed=None`: the task's first instruction (MM-Embed's fixed prompt). An int: one instruction drawn
    by a generator seeded with (seed, qid), so the choice depends on neither the order nor the rank that reads it.
    `instructions=False`: no instruction (a model trained without them).
    """
    instruction = None
    if record.instructions and instructions:
        if instruction_seed is None:
            instruction = record.instructions[0]
        else:
            instruction = random.Random(f"{instruction_seed}:{record.qid}").choice(record.instructions)
    q = record.query
    return Item(record.qid, with_instruction(instruction, q.text), q.image, source=q.source)


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
    buffer: list[Example] = []
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
        wds.tarfile_to_samples(),
        partial(to_records),
        partial(to_examples, choose=collate.choose, num_negatives=num_negatives),
        partial(to_batches, batch_size=batch_size, collate=collate, partial_last=True),
    )
