"""`lamra-pl index`: shard folders -> index folders (`lamra_pl.formats.index`) with `Trainer.predict`, resumable.

The unit of work is a chunk: one input shard (`lamra_pl.data.items`). Chunks are dealt to ranks by number (chunk i
goes to rank i % world), then to data workers; each is written, in shard order and atomically, once all its batches
are embedded (`ChunkWriter`). A killed run skips the chunks already written; each chunk is always batched the same
way, so the resumed index is byte-identical to an uninterrupted one. A resume, or a re-run over a finished index,
goes on only over the same inputs and model (`lamra_pl.formats.index`: Inputs); an empty pool is refused before the
model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer

from lamra_pl.data.items import Chunk, ChunkedItems, Job, plan
from lamra_pl.errors import LamraError
from lamra_pl.formats.index import ChunkStore, EmbeddingIndex, fingerprint, finished
from lamra_pl.formats.settings import ModelSettings, module_args
from lamra_pl.formats.shards import POOL_IDS, SIZES_FILE, expand_shards
from lamra_pl.formats.tar_index import listed_sizes
from lamra_pl.formats.task import TASK_FILE
from lamra_pl.models.checkpoints import caller_settings, load_retriever
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.pipelines.predict import BatchWriter, Tally, predict
from lamra_pl.pipelines.trainer import TrainerSpec


def index(
    model: str,
    pool: str,
    out: str,
    batch_size: int = 32,
    num_workers: int = 1,
    bucket: bool = True,
    trainer: TrainerSpec | None = None,
    backbone: str | None = None,
    trust_remote_code: bool = False,
    settings: ModelSettings | None = None,
) -> EmbeddingIndex | None:
    """Encode a candidate pool into an index folder (run again, a killed run continues where it stopped).

    Args:
        model: a `lamra-pl fit` checkpoint (.ckpt: LoRA adapter or trained weights) or a merged checkpoint folder.
        pool: a candidate shard folder (e.g. data/eval/test/global_pool, or a task's pool/).
        out: the index folder (format: lamra_pl.formats.index).
        batch_size: items per forward pass.
        num_workers: data loader processes per device.
        bucket: sort each shard's items by length before batching (less padding).
        trainer: the devices and precision to encode with (several devices share the pool out).
        backbone: the backbone folder of a checkpoint whose backbone is no longer where it says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
        settings: how the model reads its inputs (`--settings.rope 1d`, `--settings.max_pixels N`, ...): for a
            folder without lamra-pl's settings file, or to change what the model records. `--settings.dim D`
            encodes at that Matryoshka dimension (the index records it).
    """
    refuse_empty_pool(pool)
    module = load_retriever(
        model, backbone=caller_settings(backbone, trust_remote_code, settings), module=module_args(settings)
    )
    job = Job(out, (pool,), "pool")
    runner = (trainer or TrainerSpec()).build()
    settings = {"batch_size": batch_size, "num_workers": num_workers, "bucket": bucket, "trainer": runner}
    if not encode(module, [job], model_path=model, **settings):
        return None
    built = EmbeddingIndex(out)
    print(f"index {out}: {len(built)} candidates x {built.dim} (float16)")
    return built


def refuse_empty_pool(pool: str) -> None:
    """Raise, naming the pool (and the task it is the local pool of), when it holds no shard or no candidate: before
    a model is loaded, rather than once everything is encoded."""
    folder = Path(pool).expanduser()
    task = folder.parent / TASK_FILE
    owner = f" (the local pool of task {folder.parent})" if task.is_file() else ""
    empty = f"pool {pool}{owner} is empty"
    ids = folder / POOL_IDS
    if ids.is_file() and lists_no_id(ids):
        raise LamraError(f"{empty}: its {POOL_IDS} lists no candidate; there is nothing to index")
    if folder.is_dir() and not any(folder.rglob("*.tar")):
        raise LamraError(f"{empty}: it holds no .tar shard; there is nothing to index")
    expand_shards(pool)  # a pattern that matches nothing, or a missing shard file
    if folder.is_dir() and not ids.is_file():
        counts = listed_sizes(folder)  # {} when it has none, or none readable: the shards themselves are read later
        if counts and not any(isinstance(n, int) and n > 0 for n in counts.values()):
            raise LamraError(f"{empty}: its {SIZES_FILE} counts no sample; there is nothing to index")


def lists_no_id(path: str | Path) -> bool:
    """Whether a pool's ids.txt lists no id, only white space (read up to its first non-blank block: it can be
    big): the one test of an empty pool, for `index` and `retrieve`'s local setting alike."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


class ChunkWriter(BatchWriter):
    """Collects each chunk's batches and writes the chunk (in shard order) once all of them are embedded."""

    def __init__(self, chunks: list[Chunk], stores: list[ChunkStore]) -> None:
        super().__init__()
        self.chunks = chunks
        self.stores = stores
        self.pending: dict[int, list[tuple[torch.Tensor, torch.Tensor | None, list[dict[str, Any]]]]] = {}

    def write_batch(self, trainer: Trainer, prediction: Any, batch: dict[str, Any]) -> None:
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


def encode(
    module: ContrastiveSteps,
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
    chunks, then rank 0 assembles the indexes. `probe`: the model's `probe_embeddings()`, if already computed.
    """
    trainer = trainer or TrainerSpec().build()
    probe = module.probe_embeddings() if probe is None else probe
    collator = module.collator()
    unfinished = []
    for job in jobs:
        queries = job.kind == "queries"  # a pool's candidates carry no instruction
        seed, instructions = (instruction_seed, collator.instructions) if queries else (None, None)
        inputs = fingerprint(job.kind, job.sources, seed, instructions)
        if not finished(job.out, list(job.sources), inputs, probe):
            unfinished.append((job, inputs))
    jobs = [job for job, _ in unfinished]
    chunks = plan(jobs)
    stores = [ChunkStore(job.out) for job in jobs]
    if trainer.is_global_zero:
        for j, ((job, inputs), store) in enumerate(zip(unfinished, stores, strict=True)):
            manifest = {
                "kind": job.kind,
                "sources": list(job.sources),
                "chunks": sum(c.job == j for c in chunks),
                "instruction_seed": inputs["instruction_seed"],
                "model": {"path": model_path, "dim": module.dim, "full_dim": module.full_dim},
                "inputs": inputs,
            }
            store.start(manifest, probe)
    if not jobs:
        return trainer.is_global_zero

    def rank_chunks(rank: int, world: int) -> list[Chunk]:
        done = [store.done() for store in stores]
        return [c for c in chunks if c.number % world == rank and c.local not in done[c.job]]

    def rank_batches(rank: int, world: int) -> ChunkedItems:
        return ChunkedItems(rank_chunks(rank, world), collator, batch_size, bucket, instruction_seed)

    pools = all(job.kind == "pool" for job in jobs)
    tally = Tally(
        "index" if pools else "retrieve: encoding queries",
        "candidates" if pools else "queries",
        lambda batch: len(batch["records"]),
        lambda rank, world: chunk_items(rank_chunks(rank, world)),
    )
    if not predict(module, rank_batches, ChunkWriter(chunks, stores), trainer, num_workers, tally):
        return False
    for j, store in enumerate(stores):
        store.assemble(sum(c.job == j for c in chunks))
    return True


def chunk_items(chunks: list[Chunk]) -> int | None:
    """How many items `chunks` hold, as their folders' sizes.json list them (None if one does not: then progress
    shows no total)."""
    listed: dict[Path, dict[str, Any]] = {}
    total = 0
    for chunk in chunks:
        folder = Path(chunk.url).parent
        size = listed.setdefault(folder, listed_sizes(folder)).get(Path(chunk.url).name)
        if isinstance(size, bool) or not isinstance(size, int):
            return None
        total += size
    return total
