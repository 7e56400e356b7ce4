"""ShardDataModule: WebDataset shards in, collated batches out, split by node and worker."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lamra_pl.data.collate import Collator
from lamra_pl.data.evaluation import eval_pipeline
from lamra_pl.data.items import ChunkedItems, Job, plan
from lamra_pl.data.stream import SampleIndex, TrainStream
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.shards import expand_shards
from lamra_pl.formats.task import POOL, QUERIES, task_dirs

# What validation on task folders encodes: each task's queries and its local pool.
RETRIEVAL_PARTS = (("queries", QUERIES), ("pool", POOL))


class ShardDataModule(LightningDataModule):
    """Training, validation and test shards of the sample layout (`lamra_pl.formats.sample`).

    Training is the stream of `lamra_pl.data.stream`: seeded passes over every sample of the shards, dealt to
    ranks, in equal full batches (DDP needs them); a batch is a function of its number only, so the state this
    DataModule saves in checkpoints (the batches consumed) makes `--ckpt_path last` resume with exactly the data
    the uninterrupted run would have seen, whatever the number of workers. Unusable samples are replaced and
    counted. Evaluation reads each sample once, deterministically.
    The DataModule is handed the module's collator (`connect(module.collator())`; `lamra-pl fit|validate|test` do
    this), a `collate.Collator`: it knows how a record becomes an example (the retriever's positive/instruction/
    negatives, or a reranker sample's chats) and the prompts.

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
        seed: seed of the passes' order and of the per-sample choices.
        batches_per_epoch: batches per rank per epoch; default: one pass over the samples.
        max_image_pixels: training images with more pixels are skipped (counted) before being decoded.
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
        seed: int = 0,
        batches_per_epoch: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or num_negatives < 0 or num_workers < 0:
            raise LamraError("data.batch_size must be >= 1, num_negatives and num_workers >= 0")
        self.save_hyperparameters()
        self.collate: Collator | None = None  # the module's collator: `connect`
        self.rank, self.world = 0, 1
        self.index: SampleIndex | None = None
        # Where the training stream stands: batch `consumed` starts at global entry `entry`.
        self.consumed, self.entry = 0, 0
        self._stream: TrainStream | None = None

    def connect(self, collator: Collator) -> None:
        """Hand this DataModule the collator of the module it feeds (before the Trainer runs)."""
        self.collate = collator

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size

    def _loader(self, pipeline: Any) -> DataLoader:
        workers = self.hparams.num_workers
        # Its own generator: creating an iterator then never draws from the global RNG (which dropout uses and
        # a resumed run restores), so when epochs start does not change the model's random draws.
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def build_index(self) -> SampleIndex:
        return SampleIndex.build(self._urls("train_shards"))

    def new_stream(self, index: SampleIndex, **settings: Any) -> TrainStream:
        return TrainStream(index, **settings)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if self.index is None:
            self.index = self.build_index()
        per_rank = h.batches_per_epoch or max(1, len(self.index) // (h.batch_size * self.world))
        self._stream = self.new_stream(
            self.index,
            collate=self._collate(),
            batch_size=h.batch_size,
            num_negatives=h.num_negatives,
            seed=h.seed,
            rank=self.rank,
            world=self.world,
            batches_per_epoch=per_rank,
            start_batch=self.consumed,
            start_entry=self.entry,
            max_image_pixels=h.max_image_pixels,
        )
        return self._loader(self._stream)

    # Lightning saves these in checkpoints and restores them before asking for the dataloaders.
    def state_dict(self) -> dict[str, Any]:
        entry = self._stream.entry_of(self.consumed) if self._stream is not None else self.entry
        return {"consumed": self.consumed, "entry": entry, "seed": self.hparams.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.hparams.seed) != self.hparams.seed:
            raise LamraError(
                f"the checkpoint's data stream was seeded with data.seed={state['seed']}, this run has "
                f"{self.hparams.seed}: resume with the same seed, or start a new run"
            )
        self.consumed, self.entry = int(state["consumed"]), int(state["entry"])

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
        jobs = [Job(str(t), (str(t / folder),), kind) for t in task_dirs(spec) for kind, folder in RETRIEVAL_PARTS]
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
            raise LamraError(
                "ShardDataModule has no collator: call datamodule.connect(module.collator()) before the Trainer runs "
                "(`lamra-pl fit` does)"
            )
        return self.collate

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if "error" in batch:
            raise BadSampleError(batch["error"])
        if "stream_batch" in batch:  # a training batch, about to be used
            self.consumed = batch.pop("stream_batch") + 1
        return batch
