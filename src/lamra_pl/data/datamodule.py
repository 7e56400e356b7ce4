"""ShardDataModule: WebDataset shards in, collated batches out, split by node and worker."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from lamra_pl.data.collate import Collator
from lamra_pl.data.evaluation import eval_pipeline
from lamra_pl.data.items import ChunkedItems, Job, plan
from lamra_pl.data.stream import SampleIndex, TrainStream
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats import shard_fingerprint, spec_root
from lamra_pl.formats.shards import expand_shards
from lamra_pl.formats.task import POOL, QUERIES, task_dirs

# What validation on task folders encodes: each task's queries and its local pool.
RETRIEVAL_PARTS = (("queries", QUERIES), ("pool", POOL))
SHOWN_CHANGES = 3  # shard changes a refused resume names


def shard_files(specs: list[str]) -> dict[str, list[Any]]:
    """Shard path -> [name, size in bytes, digest of its ends]: its `lamra_pl.formats.shard_fingerprint`, as an
    index's inputs are fingerprinted, the name below its spec's root, prefixed with the root when there are several
    specs (a MixDataModule's sources); [name, None, None] for a shard that cannot be read (gone, a dangling link)."""
    files: dict[str, list[Any]] = {}
    for spec in specs:
        root = spec_root(spec)
        for url in expand_shards(spec):
            try:
                name, size, ends = shard_fingerprint(url, root)
            except LamraError:
                name, size, ends = os.path.relpath(url, root), None, None
            files[url] = [name if len(specs) == 1 else f"{root}/{name}", size, ends]
    return files


def shard_changes(saved: Any, files: dict[str, list[Any]], samples: dict[str, int] | None = None) -> list[str]:
    """How the training shards (`files`, from `shard_files`) differ from a fingerprint (`ShardDataModule.state_dict`'s
    "shards": {"files": {name: [bytes, ends digest, samples]}}; checkpoints of an unreleased version hold [bytes,
    samples]): by name, size in bytes, the digest of their ends and, given `samples` (name -> samples indexed),
    samples. A fingerprint that is not one is a LamraError."""
    then = saved.get("files") if isinstance(saved, dict) else None
    if not isinstance(then, dict) or not all(isinstance(v, list) and len(v) in (2, 3) for v in then.values()):
        raise LamraError(
            "the checkpoint's fingerprint of the training shards is not readable (a damaged or foreign checkpoint); "
            "start a new run"
        )
    now = {name: (size, ends) for name, size, ends in files.values()}
    changes = [f"shard {name} is gone" for name in sorted(then.keys() - now.keys())]
    changes += [f"new shard {name}" for name in sorted(now.keys() - then.keys())]
    for name in sorted(then.keys() & now.keys()):
        size, *ends, count = then[name]
        if size != now[name][0]:
            changes.append(f"shard {name} was {size} bytes, is now {now[name][0]}")
        elif ends and ends[0] != now[name][1]:
            changes.append(f"shard {name} was rewritten: the same size, other bytes")
        elif samples is not None and count != samples[name]:
            changes.append(f"shard {name} held {count} samples, now {samples[name]}")
    return changes


class ShardDataModule(LightningDataModule):
    """Training, validation and test shards of the sample layout (`lamra_pl.formats.sample`).

    Training is the stream of `lamra_pl.data.stream`: seeded passes over every sample of the shards, dealt to
    ranks, in equal full batches (DDP needs them); a batch is a function of its number only, so the state this
    DataModule saves in checkpoints (the batches consumed) makes `--ckpt_path last` resume with exactly the data
    the uninterrupted run would have seen, whatever the number of workers; the state also holds the training shards'
    fingerprint (names, bytes, digests of their ends and samples per shard, `lamra_pl.formats.shard_fingerprint` as
    an index's inputs), and a resume over changed shards is refused with a one-line error naming them. Unusable
    samples are replaced and counted. Evaluation reads each sample once, deterministically.
    The DataModule is handed the module's collator (`connect(module.collator())`; `lamra-pl fit|validate|test` do
    this), a `collate.Collator`: it knows how a record becomes an example (the retriever's positive/instruction/
    negatives, or a reranker sample's chats) and the prompts.

    Args:
        train_shards: the training shards: a shard folder or a brace pattern of .tar files.
        val_shards: the validation shards (a folder or a pattern, as train_shards); validation on them is the
            in-batch loss and accuracy.
        test_shards: the shards `lamra-pl test` scores, as validation scores val_shards (a folder or a pattern).
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
        self.fingerprint: dict[str, Any] | None = None  # the training shards' fingerprint: `state_dict`
        self._resumed_shards: dict[str, Any] | None = None  # the checkpoint's fingerprint, until checked

    def connect(self, collator: Collator) -> None:
        """Hand this DataModule the collator of the module it feeds (before the Trainer runs)."""
        self.collate = collator

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world = self.trainer.global_rank, self.trainer.world_size
            if stage == "fit" and self.hparams.val_shards is None and self.hparams.val_tasks is None:
                # Nothing to validate: no validation loop, rather than a loop over an empty list, which Lightning
                # warns about in every fit ("Total length of `list` across ranks is zero").
                self.trainer.limit_val_batches = 0

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

    def train_specs(self) -> list[str]:
        """The shard specs training reads."""
        if self.hparams.train_shards is None:
            raise LamraError("data.train_shards is not set")
        return [self.hparams.train_shards]

    def build_index(self) -> SampleIndex:
        return SampleIndex.build(self._urls("train_shards"))

    def _check_shards(self, files: dict[str, list[Any]] | None = None, index: SampleIndex | None = None) -> None:
        """Refuse to resume over other training shards than the checkpoint's run read (`files`: theirs now, from
        `shard_files`): same names, sizes, digests of their ends and (given the index) samples per shard. A
        checkpoint without a fingerprint (written before there was one) resumes."""
        if self._resumed_shards is None:
            return
        files = shard_files(self.train_specs()) if files is None else files
        samples = None
        if index is not None:
            per_shard = dict(zip(index.urls, index.samples_per_shard(), strict=True))
            samples = {name: per_shard.get(url, 0) for url, (name, *_) in files.items()}
        changes = shard_changes(self._resumed_shards, files, samples)
        if changes:
            more = f" and {len(changes) - SHOWN_CHANGES} more changes" if len(changes) > SHOWN_CHANGES else ""
            raise LamraError(
                f"the training shards changed since the checkpoint was written: {'; '.join(changes[:SHOWN_CHANGES])}"
                f"{more}; resuming would not continue with the data the run was on: restore the shards, or start "
                "a new run"
            )

    def _fingerprint(self, files: dict[str, list[Any]], index: SampleIndex) -> dict[str, Any]:
        """The training shards' fingerprint for `state_dict`: {"files": {name: [bytes, ends digest, samples]},
        "samples": N}."""
        per_shard = dict(zip(index.urls, index.samples_per_shard(), strict=True))
        named = {url: files.get(url, [url, None, None]) for url in index.urls}
        shards = {name: [size, ends, per_shard[url]] for url, (name, size, ends) in named.items()}
        return {"files": dict(sorted(shards.items())), "samples": len(index)}

    def new_stream(self, index: SampleIndex, **settings: Any) -> TrainStream:
        return TrainStream(index, **settings)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        if self.index is None:
            files = shard_files(self.train_specs())
            self._check_shards(files)  # before the index is built: names, sizes and digests
            self.index = self.build_index()
            self._check_shards(files, self.index)  # and samples per shard
            self._resumed_shards = None
            self.fingerprint = self._fingerprint(files, self.index)
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
    # "shards" is the fingerprint of the training shards (names, bytes, digests of their ends and samples per shard):
    # a resume over changed shards is refused. Lightning loads the state after `setup` and before `train_dataloader`
    # builds the index, so names, sizes and digests are compared at once when fitting, samples once the index is
    # built.
    def state_dict(self) -> dict[str, Any]:
        entry = self._stream.entry_of(self.consumed) if self._stream is not None else self.entry
        state = {"consumed": self.consumed, "entry": entry, "seed": self.hparams.seed}
        if self.fingerprint is not None:
            state["shards"] = self.fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.hparams.seed) != self.hparams.seed:
            raise LamraError(
                f"the checkpoint's data stream was seeded with data.seed={state['seed']}, this run has "
                f"{self.hparams.seed}: resume with the same seed, or start a new run"
            )
        self.consumed, self.entry = int(state["consumed"]), int(state["entry"])
        self._resumed_shards = state.get("shards")
        if self.trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self._check_shards()  # fail before the model is set up, not only when training starts

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        # Neither shards nor tasks: no validation (an empty list; `setup` turns validation off during fit).
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
