"""`TrainerSpec`: the Trainer a model-running job (`index`, `retrieve`, `rerank`) runs in, set from the command line
as `fit`'s is (`--trainer.devices 4`).

A module of its own, apart from the prediction scaffold (`predict.py`), because it is a type of those jobs' command
lines: the command line is read without importing Lightning (`lamra-pl index --help` answers at once, see
`lamra_pl.cli`), so this module imports Lightning only in `build`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    def build(self, progress: bool = False) -> Any:
        """A `lightning.pytorch.Trainer` for prediction: no logger or checkpoints; DDP when more than one device.
        (Annotated Any: naming the Trainer's type here would import Lightning with the command line.)"""
        from lightning.pytorch import Trainer

        from lamra_pl.pipelines.predict import quiet_lightning

        many = self.devices == -1 or self.devices > 1
        with quiet_lightning():  # no device banner or tips from a tool's Trainer
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
