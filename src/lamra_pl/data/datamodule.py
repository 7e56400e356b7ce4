"""ShardDataModule: WebDataset shards in, collated batches out, split by node and worker."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lamra_pl.data.shards import Collator, count_samples, eval_pipeline, expand_shards, train_pipeline
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.retrieval.encode import ChunkedItems, Job, plan
from lamra_pl.retrieval.retrieve import task_dirs


class ShardDataModule(LightningDataModule):
    """Training, validation and test shards of the sample schema (`lamra_pl.data.schema`).

    Training resamples shards endlessly and cuts epochs with `with_epoch`, so every rank sees the same number
    of equal-size batches (DDP needs it). Evaluation reads each sample once, deterministically.
    The collator comes from the LightningModule (`collator()`, a `shards.Collator`): it knows how a record becomes
    an example (the retriever's positive/instruction/negatives, or a reranker sample's chats) and the prompts.

    Args:
        train_shards, val_shards, test_shards: a shard folder or a brace pattern of .tar files; validation on
            `val_shards` is the in-batch loss and accuracy.
        val_tasks: evaluation task folders (a glob such as "data/eval/val/*_task*", written by convert-mbeir):
            validation then also encodes their queries and local pools and logs M-BEIR Recall@K per task
            (`val/<task>/R@k`) and averaged, with the code of `lamra-pl index/retrieve/evaluate`.
        instruction_seed: the instruction of each `val_tasks` query: none = the task's first; an int = drawn
            per query with a generator seeded by (seed, qid).
        batch_size: queries per rank and step (each brings 1 + num_negatives candidates).
        eval_batch_size: queries per evaluation batch (default: batch_size).
        num_negatives: hard negatives per query, drawn from each sample's list.
        num_workers: data loader processes per rank.
        shuffle_buffer: samples in the training shuffle buffer.
        seed: seed of shard resampling, shuffling and the per-sample choices.
        batches_per_epoch: batches per rank per epoch; default from the shards' sizes.json.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        test_shards: str | None = None,
        val_tasks: str | None = None,
        instruction_seed: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_negatives: int = 0,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_negatives < 0 or num_workers < 0:
            raise LamraError("data.batch_size must be >= 1, num_negatives and num_workers >= 0")
        self.save_hyperparameters()
        self.collate: Collator | None = None
        self.rank, self.world = 0, 1

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size
            if self.collate is None:
                self.collate = self.trainer.lightning_module.collator()

    def _loader(self, pipeline: Any) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        urls = self._urls("train_shards")
        per_rank = h.batches_per_epoch
        if per_rank is None:
            total = count_samples(urls)
            if total is None:
                raise LamraError(f"{h.train_shards}: no sizes.json lists these shards; set data.batches_per_epoch")
            per_rank = max(1, total // (h.batch_size * self.world))
        per_worker = math.ceil(per_rank / max(1, h.num_workers))
        pipeline = train_pipeline(
            urls,
            batch_size=h.batch_size,
            collate=self._collate(),
            num_negatives=h.num_negatives,
            seed=h.seed,
            rank=self.rank,
            shuffle_buffer=h.shuffle_buffer,
        ).with_epoch(per_worker)
        return self._loader(pipeline)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # Neither shards nor tasks means no validation during fit (an empty list is Lightning's "none").
        loaders = [] if self.hparams.val_shards is None else [self._eval_loader("val_shards")]
        if self.hparams.val_tasks is not None:
            loaders.append(self._retrieval_loader(self.hparams.val_tasks))
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test_shards")

    def _retrieval_loader(self, spec: str) -> DataLoader:
        """Each task's queries and local pool, dealt to ranks by shard, batches tagged with task and kind."""
        jobs = [Job(str(t), (str(t / kind),), kind) for t in task_dirs(spec) for kind in ("queries", "pool")]
        chunks = [c for c in plan(jobs) if c.number % self.world == self.rank]
        h = self.hparams
        dataset = ChunkedItems(
            chunks,
            self._collate(),
            h.eval_batch_size or h.batch_size,
            instruction_seed=h.instruction_seed,
            sources=[job.out for job in jobs],
        )
        return DataLoader(dataset, batch_size=None, num_workers=min(h.num_workers, len(chunks)))

    def _eval_loader(self, key: str) -> DataLoader:
        h = self.hparams
        pipeline = eval_pipeline(
            self._urls(key),
            batch_size=h.eval_batch_size or h.batch_size,
            collate=self._collate(),
            num_negatives=h.num_negatives,
            rank=self.rank,
            world=self.world,
        )
        return self._loader(pipeline)

    def _urls(self, key: str) -> list[str]:
        spec = self.hparams[key]
        if spec is None:
            raise LamraError(f"data.{key} is not set")
        return expand_shards(spec)

    def _collate(self) -> Collator:
        if self.collate is None:
            raise LamraError("ShardDataModule has no collate function: attach it to a Trainer or set .collate")
        return self.collate

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "error" in batch:
            raise BadSampleError(batch["error"])
        return batch
