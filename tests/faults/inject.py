"""Faults injected into a real `lamra-pl fit` (imported there through PYTHONPATH), and a recorder of what it did.

Callbacks here are given on the command line (`--trainer.callbacks+=inject.KillAt`), so the run under test is
the shipped CLI with the shipped configs; only the fault is added.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit, no flush: a pre-empted node


class Recorder(Callback):
    """Appends every finished step's loss and query ids (and the rank) to a JSON-lines file, flushed at once."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        row = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "loss": float(loss),
            "qids": list(batch["query_ids"]),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class KillAt(Callback):
    """SIGKILL in the middle of step `step` (after its forward and backward, before the optimizer step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if trainer.global_step == self.step:
            _die()


class KillDuringSave(Callback):
    """SIGKILL halfway through writing the checkpoint file named `name` at step `step`."""

    def __init__(self, step: int, name: str = "last.ckpt") -> None:
        self.step, self.name = step, name

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.global_step != self.step:
            return
        name = self.name
        real_save = torch.save

        def half_then_die(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if getattr(f, "name", "").rsplit("/", 1)[-1].startswith(f".{name}"):
                real_save(obj, f, *args, **kwargs)
                f.truncate(f.tell() // 2)
                f.flush()
                os.fsync(f.fileno())
                _die()
            real_save(obj, f, *args, **kwargs)

        torch.save = half_then_die


class NonFiniteAt(Callback):
    """Makes the gradients of the given steps NaN, as a NaN loss would."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step in self.steps:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
