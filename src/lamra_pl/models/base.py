"""What every lamra-pl LightningModule shares: the optimizer and its schedule, trainable-only checkpoints, and the
training policies it brings to any Trainer.

`TrainingModule` reads nothing it does not declare: its subclasses hand it their `optimizer` and `schedule`. The
modules on an LMM backbone compose a `backbone.Backbone` (the retriever `EmbeddingModule`, the reranker
`RerankModule`); `CLIPModule`, the dual-encoder baseline, an open_clip model. Skip counts, the non-finite step guard
and RNG resume are Lightning callbacks (`lamra_pl.callbacks`), added here when the Trainer has none of their kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lamra_pl.callbacks import missing_policies
from lamra_pl.errors import LamraError


@dataclass
class ScheduleSpec:
    """The learning-rate schedule (`model.schedule` in a config).

    Args:
        warmup_ratio: linear warmup over this fraction of `trainer.max_steps`.
        lr_schedule: after the warmup, "cosine" to 0 at `trainer.max_steps`, or "constant".
    """

    warmup_ratio: float = 0.03
    lr_schedule: Literal["cosine", "constant"] = "cosine"

    @classmethod
    def of(cls, value: ScheduleSpec | dict[str, Any] | None) -> ScheduleSpec:
        if value is None:
            return cls()
        return value if isinstance(value, ScheduleSpec) else cls(**value)


class TrainingModule(LightningModule):
    """Base of every lamra-pl training module: the optimizer, its schedule and trainable-only checkpoints.

    Subclasses call `super().__init__(optimizer=..., schedule=...)` first, which saves their `__init__` arguments as
    hyperparameters (typed groups as plain mappings, so checkpoints load with `torch.load(weights_only=True)`).

        optimizer: built in `configure_optimizers` from trainable parameters only.
        schedule: `ScheduleSpec`, stepped every optimizer step.

    Checkpoints hold the trainable weights only; loading one checks that none is missing or of another shape.
    """

    def __init__(self, *, optimizer: OptimizerCallable, schedule: ScheduleSpec | dict[str, Any] | None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        for key, value in list(self.hparams.items()):
            if is_dataclass(value) and not isinstance(value, type):
                self.hparams[key] = asdict(value)
        self.optimizer_factory = optimizer
        self.schedule = ScheduleSpec.of(schedule)
        # Checkpoints hold trainable weights only; `on_load_checkpoint` checks that none is missing.
        self.strict_loading = False

    def configure_callbacks(self) -> list[Callback]:
        """The training policies (skip counts, the non-finite step guard, RNG resume) this Trainer lacks."""
        return missing_policies(self.trainer.callbacks)

    # ------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise LamraError("nothing to train: LoRA is off and every part of the backbone is frozen")
        optimizer = self.optimizer_factory(params)
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise LamraError(
                "trainer.max_steps must be set: streamed shards have no length, and the LR schedule needs one"
            )
        warmup = math.ceil(self.schedule.warmup_ratio * total)
        if self.schedule.lr_schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ checkpoints
    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP2Strategy has loaded (and checked) the tensors already
            self.check_checkpoint_matches(checkpoint["state_dict"])

    def check_checkpoint_matches(self, saved: dict[str, torch.Tensor]) -> None:
        """Say what differs between a checkpoint's trainable tensors and this model's, before loading them."""
        own = {name: p for name, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(dict(self.named_parameters())))
        shapes = [
            f"{n}: {tuple(saved[n].shape)} vs {tuple(own[n].shape)}"
            for n in own
            if n in saved and saved[n].shape != own[n].shape
        ]
        problems = []
        if missing:
            problems.append(f"{len(missing)} trainable tensors are missing, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not in this model, e.g. {unexpected[:3]}")
        if shapes:
            problems.append(f"{len(shapes)} tensors have other shapes (checkpoint vs model), e.g. {shapes[:3]}")
        if problems:
            raise LamraError(
                "checkpoint does not match the model config: "
                + "; ".join(problems)
                + " (are the model, LoRA rank, target list and freezing the same as in training?)"
            )
