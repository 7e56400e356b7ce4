"""The prediction scaffold of the jobs that run a model over data (`index`, `retrieve`, `rerank`).

A job supplies a dataset of batches for a rank (built once the Trainer knows its rank and world size, so each rank
reads its own share) and a prediction writer (a `BatchWriter` that puts each batch's predictions where they
belong); `predict` runs `Trainer.predict` over them on every rank and waits for all. The Trainer such a job runs in
is `lamra_pl.pipelines.trainer.TrainerSpec`'s.

A tool's Trainer is an implementation detail: it prints no banner (Lightning's info lines, "GPU available: ...",
its tips, are off while it is built and runs: `quiet_lightning`; its warnings still show), and its progress is the
job's own, counted in items (`Tally`, `lamra_pl.progress`), not Lightning's bar over batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch.utils.data import DataLoader

from lamra_pl.progress import progress


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines off for the duration: the device banner ("GPU available: False, used: False", "TPU
    available: ..."), its tips, "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES", DDP's "Initializing distributed". A tool
    says what it does itself; Lightning's warnings (the warnings module) are not affected."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class BatchWriter(Callback):
    """A job's writer: `write_batch` gets each batch with its predictions, on the rank that predicted it.

    Lightning's `BasePredictionWriter` would also have the loop look up each batch's sample indices, which batches
    made by an iterable dataset (ours: ready batches, `batch_size=None`) do not have, and warn so on every run; a
    batch here carries where its items go (positions in a chunk, query and candidate ids)."""

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.write_batch(trainer, outputs, batch)

    def write_batch(self, trainer: Trainer, prediction: Any, batch: dict[str, Any]) -> None:
        raise NotImplementedError


def _unknown(rank: int, world: int) -> int | None:
    return None


@dataclass(frozen=True)
class Tally:
    """How a job reports its progress (`lamra_pl.progress`, on rank 0): `desc`, what it does ("index"); the `unit`
    of its items ("candidates"); `count(batch)`, the items a batch holds; `total(rank, world)`, the items that rank
    has to do (None: unknown, then the count and rate only)."""

    desc: str
    unit: str
    count: Callable[[dict[str, Any]], int]
    total: Callable[[int, int], int | None] = _unknown


class _Progress(Callback):
    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.bar: Any = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            world = trainer.world_size
            desc = self.tally.desc if world == 1 else f"{self.tally.desc} (rank 0 of {world})"
            self.bar = progress(total=self.tally.total(0, world), desc=desc, unit=self.tally.unit)

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.bar is not None:
            self.bar.update(self.tally.count(batch))

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RankBatches(Protocol):
    """An iterable dataset of one rank's batches; `units` is how many independent pieces (shards) it reads, the
    most data workers that can help."""

    @property
    def units(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


class _RankData(LightningDataModule):
    def __init__(self, dataset: Callable[[int, int], RankBatches], num_workers: int) -> None:
        super().__init__()
        self.dataset, self.num_workers = dataset, num_workers

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = self.dataset(rank, world)
        return DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, dataset.units))  # type: ignore[arg-type]


def predict(
    module: LightningModule,
    dataset: Callable[[int, int], RankBatches],
    writer: BatchWriter,
    trainer: Trainer,
    num_workers: int = 1,
    tally: Tally | None = None,
) -> bool:
    """Run `module` over `dataset(rank, world_size)` on every rank of `trainer`, each batch's predictions handed to
    `writer`; True on rank 0 once every rank is done (False elsewhere). `tally`: how rank 0 reports its progress."""
    trainer.callbacks.append(writer)
    if tally is not None:
        trainer.callbacks.append(_Progress(tally))
    with quiet_lightning():
        trainer.predict(module, datamodule=_RankData(dataset, num_workers), return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero
