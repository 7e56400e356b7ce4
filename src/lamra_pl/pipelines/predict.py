"""The prediction scaffold of the jobs that run a model over data (`index`, `retrieve`, `rerank`).

A job supplies a dataset of batches for a rank (built once the Trainer knows its rank and world size, so each rank
reads its own share) and a prediction writer (a `BasePredictionWriter` that puts each batch's predictions where
they belong); `predict` runs `Trainer.predict` over them on every rank and waits for all. The Trainer such a job
runs in is `lamra_pl.pipelines.trainer.TrainerSpec`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader


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
    writer: BasePredictionWriter,
    trainer: Trainer,
    num_workers: int = 1,
) -> bool:
    """Run `module` over `dataset(rank, world_size)` on every rank of `trainer`, each batch's predictions handed to
    `writer`; True on rank 0 once every rank is done (False elsewhere)."""
    trainer.callbacks.append(writer)
    trainer.predict(module, datamodule=_RankData(dataset, num_workers), return_predictions=False)
    trainer.strategy.barrier()
    return trainer.is_global_zero
