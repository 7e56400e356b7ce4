"""Encoding shard folders into index folders with `Trainer.predict`: sharded across ranks, resumable.

The unit of work is a chunk: one input shard. Chunks are dealt to ranks by number (chunk i goes to rank
i % world), then to data workers. A chunk is read whole, its items are sorted by length so that a batch pads
little (`bucket=True`), and each batch carries where its items go, so the chunk is written in shard order,
atomically, once all its batches are embedded (`ChunkWriter`). A killed run skips the chunks already written;
each chunk is always batched the same way, so the resumed index is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from lamra_pl.data.schema import Item, UnreadableImage, decode_candidate, decode_record, sample_location
from lamra_pl.data.shards import evaluation_query, expand_shards
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.models.inputs import EmbeddingCollator
from lamra_pl.retrieval.index import ChunkStore, EmbeddingIndex, probe_embeddings

Kind = Literal["pool", "queries"]


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
    for sample in wds.DataPipeline(wds.SimpleShardList([chunk.url]), wds.tarfile_to_samples()):
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


class ChunkedItems(IterableDataset):
    """Batches of `chunks`, each chunk read whole and (with `bucket`) sorted by length before batching."""

    def __init__(
        self,
        chunks: list[Chunk],
        collator: EmbeddingCollator,
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.chunks[info.id :: info.num_workers] if info else self.chunks
        for chunk in mine:
            # A model trained without instructions (its collator says so) is evaluated without them.
            items = read_chunk(chunk, self.instruction_seed, self.collator.instructions)
            order = list(range(len(items)))
            if self.bucket:
                lengths = [self.collator.length(item) for item in items]
                order.sort(key=lambda i: (lengths[i], i))
            batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)] or [[]]
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
    return {"id": item.id, "txt": item.text, "img": item.source}


class ChunkWriter(BasePredictionWriter):
    """Collects each chunk's batches and writes the chunk (in shard order) once all of them are embedded."""

    def __init__(self, chunks: list[Chunk], stores: list[ChunkStore]) -> None:
        super().__init__(write_interval="batch")
        self.chunks = chunks
        self.stores = stores
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor | None, list[dict[str, Any]]]]] = {}

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        parts = self.pending.setdefault(batch["chunk"], [])
        embeddings = None if prediction is None else prediction.detach().float().cpu()
        parts.append((batch["positions"].cpu(), embeddings, batch["records"]))
        if len(parts) == batch["num_batches"]:
            self._write(self.chunks[batch["chunk"]], self.pending.pop(batch["chunk"]))

    def _write(self, chunk: Chunk, parts: list[tuple[torch.Tensor, torch.Tensor | None, list[dict[str, Any]]]]) -> None:
        n = sum(len(p) for p, _, _ in parts)
        dim = next((e.shape[1] for _, e, _ in parts if e is not None), 0)
        embeddings = np.zeros((n, dim), dtype=np.float16)
        records: list[dict[str, Any]] = [{}] * n
        for positions, emb, recs in parts:
            if emb is not None:
                embeddings[positions.numpy()] = emb.numpy().astype(np.float16)
            for position, record in zip(positions.tolist(), recs, strict=True):
                records[position] = record
        self.stores[chunk.job].write(chunk.local, embeddings, records)


class EncodeDataModule(LightningDataModule):
    """Predict batches for `encode`: this rank's unfinished chunks, length-bucketed."""

    def __init__(
        self,
        chunks: list[Chunk],
        stores: list[ChunkStore],
        batch_size: int = 32,
        num_workers: int = 1,
        bucket: bool = True,
        instruction_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.chunks, self.stores = chunks, stores
        self.batch_size, self.num_workers, self.bucket = batch_size, num_workers, bucket
        self.instruction_seed = instruction_seed

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        done = [store.done() for store in self.stores]
        todo = [c for c in self.chunks if c.number % world == rank and c.local not in done[c.job]]
        dataset = ChunkedItems(
            todo, self.trainer.lightning_module.collator(), self.batch_size, self.bucket, self.instruction_seed
        )
        return DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, len(todo)))


def encode(
    module: LightningModule,
    jobs: list[Job],
    *,
    model_path: str,
    batch_size: int = 32,
    num_workers: int = 1,
    bucket: bool = True,
    instruction_seed: int | None = None,
    trainer: Trainer | None = None,
    probe: np.ndarray | None = None,
) -> bool:
    """Encode every job into its index folder (resuming unfinished ones); True on rank 0, False elsewhere.

    `trainer` decides devices and precision (default: one device, no logger). Under DDP every rank encodes its
    chunks, then rank 0 assembles the indexes. `probe`: the model's `probe_embeddings`, if already computed.
    """
    trainer = trainer or encode_trainer()
    seeds = [instruction_seed if job.kind == "queries" else None for job in jobs]
    probe = probe_embeddings(module) if probe is None else probe
    finished = [_finished(job, seed, probe) for job, seed in zip(jobs, seeds, strict=True)]
    jobs = [job for job, done in zip(jobs, finished, strict=True) if not done]
    chunks = plan(jobs)
    stores = [ChunkStore(job.out) for job in jobs]
    if trainer.is_global_zero:
        for j, (job, store) in enumerate(zip(jobs, stores, strict=True)):
            manifest = {
                "kind": job.kind,
                "sources": list(job.sources),
                "chunks": sum(c.job == j for c in chunks),
                "instruction_seed": instruction_seed if job.kind == "queries" else None,
                "model": {"path": model_path},
            }
            store.start(manifest, probe)
    if not jobs:
        return trainer.is_global_zero
    datamodule = EncodeDataModule(chunks, stores, batch_size, num_workers, bucket, instruction_seed)
    trainer.callbacks.append(ChunkWriter(chunks, stores))
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return False
    for j, store in enumerate(stores):
        store.assemble(sum(c.job == j for c in chunks))
    return True


def _finished(job: Job, instruction_seed: int | None, probe: np.ndarray) -> bool:
    """True if `job.out` is a complete index of the same inputs by the same model; an error if it is another's."""
    if not (Path(job.out) / "index.json").is_file():
        return False
    index = EmbeddingIndex(job.out)
    index.check_model(probe)
    if index.meta.get("sources") != list(job.sources) or index.meta.get("instruction_seed") != instruction_seed:
        raise LamraError(
            f"{job.out} already holds an index of {index.meta.get('sources')} (instruction_seed "
            f"{index.meta.get('instruction_seed')}); choose another folder"
        )
    return True


def encode_trainer(
    accelerator: str = "auto", devices: int | str = 1, precision: str | None = None, progress: bool = False
) -> Trainer:
    """A Trainer for encoding: no logger or checkpoints; DDP when more than one device."""
    many = devices == -1 or devices == "auto" or (isinstance(devices, int) and devices > 1)
    return Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if many else "auto",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )
