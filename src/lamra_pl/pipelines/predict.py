"""The prediction scaffold of the jobs that run a model over data (`index`, `retrieve`, `rerank`).

A job supplies a dataset of batches for a rank (built once the Trainer knows its rank and world size, so each rank
reads its own share) and a prediction writer (a `BasePredictionWriter` that puts each batch's predictions where
they belong); `predict` runs `Trainer.predict` over them on every rank and waits for all. `TrainerSpec` is the
Trainer such a job runs in, set from the command line as `fit`'s is (`--trainer.devices 4`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader


@dataclass
class TrainerSpec:
    """The Trainer a tool runs its model in (names as `lamra-pl fit`'s `--trainer.*`).

    Args:
        accelerator: cpu, gpu or auto.
        devices: devices to run on; more than one runs DDP, each rank taking its share of the data.
        precision: Lightning precision, e.g. bf16-mixed (default 32-true).
    """

    accelerator: str = "auto"
    devices: int = 1
    precision: str | None = None

    def build(self, progress: bool = False) -> Trainer:
        """A Trainer for prediction: no logger or checkpoints; DDP when more than one device."""
        many = self.devices == -1 or self.devices > 1
        return Trainer(
            accelerator=self.accelerator,
            devices=self.devices,
            strategy="ddp" if many else "auto",
            precision=self.precision,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )


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
