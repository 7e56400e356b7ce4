"""Training policies that cut across every lamra-pl module, as Lightning callbacks.

    SkipCounts       the training samples the data stream replaced, per reason: logged, reported, resumed
    NonFiniteGuard   a step with non-finite gradients is skipped and counted; too many in a row stop the run
    RngResume        every rank's RNG states ride in checkpoints, so random draws continue exactly after a resume
    FinalMetrics     the final `val/*` metrics (`hp/*`) and the hyperparameters as a TensorBoard HParams session
    Progress         training progress that reads in a log: a plain line every few steps when stdout is no terminal

The shipped configs name them in `trainer.callbacks` (where their settings live); a lamra-pl module adds the first
three itself when a Trainer has none of that type (`missing_policies`), so a module trained from Python, or with a
callback list of its own, keeps them. Their state is saved under one checkpoint key, RESUME_KEY.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.distributed.tensor import DTensor

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import SKIP_REASONS
from lamra_pl.formats.tensorboard import FINAL, LIVE, flatten, read_hparams, write_session
from lamra_pl.progress import LogLines, is_terminal

RESUME_KEY = "lamra_pl_resume"  # {"rng": [per rank], "skipped": [reasons], "nonfinite_steps": n}


def _gather(trainer: Trainer, value: Any) -> list[Any]:
    """`value` of every rank, in rank order (a collective: every rank calls it)."""
    if trainer.world_size == 1 or not dist.is_initialized():
        return [value]
    every: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(every, value)
    return every


class SkipCounts(Callback):
    """Counts the training samples the data stream skipped and replaced (each batch carries its counts under
    "skipped", one per `SKIP_REASONS`), logs the running totals (summed over ranks) as `data/skipped_<reason>` from
    the first step a sample was skipped for that reason (a reason never met logs nothing: no flat zero curves), and
    reports them all when training ends. A resumed run goes on from the checkpoint's totals."""

    def __init__(self) -> None:
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.totals = [0] * len(SKIP_REASONS)  # over ranks, as of the last step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        skipped = batch.get("skipped") if isinstance(batch, dict) else None
        if skipped is not None:
            self.skipped += skipped.cpu()
        # One sum over ranks per step, which every rank calls; which counts are logged then follows from the sums,
        # the same on every rank (a rank logging with sync_dist while another does not would wait forever).
        # (A copy: the reduction is in place.)
        summed = trainer.strategy.reduce(self.skipped.to(pl_module.device, copy=True), reduce_op="sum")
        self.totals = [int(n) for n in summed.tolist()]
        for reason, count in zip(SKIP_REASONS, self.totals, strict=True):
            if count:
                pl_module.log(f"data/skipped_{reason}", float(count), batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"lamra-pl: training samples skipped: {dict(zip(SKIP_REASONS, self.totals, strict=True))}")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        total = torch.stack(_gather(trainer, self.skipped.clone())).sum(0)
        checkpoint.setdefault(RESUME_KEY, {})["skipped"] = total

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RESUME_KEY, {}).get("skipped")
        if saved is not None:  # the totals so far, once (on rank 0): the logged counts are sums over ranks
            # Reasons are only ever appended to SKIP_REASONS: an older checkpoint's counts are its first entries.
            saved = torch.cat([saved, saved.new_zeros(len(SKIP_REASONS) - len(saved))])
            self.skipped = saved.clone() if trainer.global_rank == 0 else torch.zeros_like(saved)


class NonFiniteGuard(Callback):
    """A step whose gradients are not finite (a NaN/inf loss) is skipped: no update, no moment decay. It is counted
    (`train/nonfinite_steps`, logged from the first such step on), and more than `max_in_a_row` such steps in a row
    stop the run with an error.

    Args:
        max_in_a_row: non-finite steps in a row tolerated before the run stops.
    """

    def __init__(self, max_in_a_row: int = 5) -> None:
        if max_in_a_row < 0:
            raise LamraError(f"NonFiniteGuard.max_in_a_row must be >= 0, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.steps, self.in_a_row = 0, 0

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # The local shard of a sharded (FSDP2) gradient; the decision below combines the ranks'.
        grads = [_local(p.grad) for p in pl_module.parameters() if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        # Sharded (FSDP) gradients differ per rank: every rank must take the same decision.
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.in_a_row = 0
        else:
            for p in pl_module.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: no update, no moment decay
            self.steps += 1
            self.in_a_row += 1
            rank_zero_warn(f"lamra-pl: step {trainer.global_step} has non-finite gradients (NaN/inf loss): skipped")
            if self.in_a_row > self.max_in_a_row:
                raise LamraError(
                    f"{self.in_a_row} steps in a row had non-finite gradients (NaN/inf loss), more than the "
                    f"NonFiniteGuard callback's max_in_a_row={self.max_in_a_row}: lower the learning rate, check the "
                    "data and the precision, or resume from an earlier checkpoint"
                )
        if self.steps:  # from the first skipped step on (the count and the decision are the same on every rank)
            pl_module.log("train/nonfinite_steps", float(self.steps), batch_size=1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info(f"lamra-pl: non-finite steps skipped: {self.steps}")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(RESUME_KEY, {})["nonfinite_steps"] = self.steps

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.steps = int(checkpoint.get(RESUME_KEY, {}).get("nonfinite_steps", 0))


class RngResume(Callback):
    """Every rank's RNG states (torch, CUDA, numpy, Python) are saved with each checkpoint and restored before the
    first training batch after a resume, so random draws (LoRA dropout) continue as in the uninterrupted run."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(RESUME_KEY, {})["rng"] = _gather(trainer, _safe_rng_states())

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RESUME_KEY, {}).get("rng")
        if states is None:
            return
        if len(states) == trainer.world_size:
            self.pending = _unsafe_rng_states(states[trainer.global_rank])
        else:
            rank_zero_warn(
                f"lamra-pl: the checkpoint was written by {len(states)} processes, this run has "
                f"{trainer.world_size}: random draws (dropout) do not continue exactly"
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Restored here, not when loading: creating the dataloader iterator after loading draws from the global RNG,
        # which the uninterrupted run did not do at this point.
        if self.pending is not None:
            _set_rng_states(self.pending)
            self.pending = None


class FinalMetrics(Callback):
    """At the end of a successful fit: the final `val/*` metrics once as `hp/*`, at the last training step, and the
    fit's hyperparameters as its TensorBoard HParams session (`fit_hparams`), for every fit, validated or not, so
    the HParams tab compares fits by their hyperparameters and the last values of their scalars (`train/loss`,
    `hp/*`, ...). Use `TensorBoardLogger(default_hp_metric=False)`, as every shipped config does: otherwise Lightning
    writes a session of its own at fit start (with a placeholder `hp_metric` and an experiment summary), and
    TensorBoard reads that first one instead."""

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted or not isinstance(trainer.logger, TensorBoardLogger):
            return
        metrics = {
            FINAL + name[len(LIVE) :]: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(LIVE)
        }
        if metrics:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        write_session(trainer.logger, fit_hparams(trainer, pl_module), trainer.global_step)


def fit_hparams(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """A fit's hyperparameters, flat with dotted keys as `lamra-pl report` reads them (`model.temperature`,
    `model.backbone.path`, `data.batch_size`): the run's config.yaml when LightningCLI wrote one (it also holds
    the optimizer and the trainer's settings), else the module's and the data module's init arguments."""
    folder = Path(trainer.logger.log_dir) if trainer.logger is not None and trainer.logger.log_dir else None
    if folder is not None and (folder / "config.yaml").is_file():
        return read_hparams(folder)
    tree = {"model": _init_args(pl_module)}
    if trainer.datamodule is not None:
        tree["data"] = _init_args(trainer.datamodule)
    return flatten(tree)


def _init_args(component: LightningModule | LightningDataModule) -> dict[str, Any]:
    """A module's class and saved init arguments (without Lightning's own `_class_path`, `_instantiator`)."""
    kind = type(component)
    args = {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v for k, v in component.hparams.items()}
    return {"class": f"{kind.__module__}.{kind.__qualname__}", **{k: v for k, v in args.items() if k[:1] != "_"}}


class Progress(Callback):
    """Training progress that reads in a log. On a terminal this does nothing: Lightning's own progress bar runs
    live. When stdout (where that bar draws) is not a terminal, as in `make demo > demo.log` or a batch job, a bar
    could only leave its last frame there: it is turned off, and a plain line (`lamra_pl.progress.LogLines`) is
    printed every `every_n_steps` optimizer steps and at least every minute, with the step, the share of the steps
    to run, steps/s, the time elapsed and left, and the progress-bar metrics (train/loss); and one line when each
    validation ends, with its batches and the `val/average/*` metrics. `--trainer.enable_progress_bar=false` turns
    both off. Rank 0 only.

        fit: 120/500 steps (24%), 0.31 steps/s, 06:27 elapsed, 20:26 left, train/loss 0.355

    Args:
        every_n_steps: optimizer steps between lines; default: the Trainer's `log_every_n_steps`.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise LamraError(f"Progress.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.lines = False
        self.train: LogLines | None = None
        self.val: LogLines | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is None or is_terminal(sys.stdout):
            self.lines = False  # no bar asked for, or a terminal: Lightning's bar, live
            return
        bar.disable()
        self.lines = trainer.is_global_zero

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.lines:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        every = self.every_n_steps or trainer.log_every_n_steps
        total = int(total) if math.isfinite(total) else None
        initial = trainer.global_step  # a resumed run goes on from its step; its rate counts this run's steps
        self.train = LogLines(total=total, desc="fit", unit="steps", every=every, initial=initial, file=sys.stdout)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.train is not None and trainer.global_step > self.train.n:
            self.train.set_postfix({k: v for k, v in trainer.progress_bar_metrics.items() if k != "v_num"})
            self.train.update(trainer.global_step - self.train.n)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.train is not None:
            self.train.close()
            self.train = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.lines:
            return
        batches = sum(trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches)
        total = int(batches) if math.isfinite(batches) else None
        desc = "sanity check" if trainer.sanity_checking else f"validation at step {trainer.global_step}"
        # A line at the end (and every minute of a long one), not at each tenth: it interrupts the training lines.
        self.val = LogLines(total=total, desc=desc, unit="batches", every=total or None, file=sys.stdout)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.val is not None:
            self.val.update(1)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.val is None:
            return
        averages = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(f"{LIVE}average/")}
        self.val.set_postfix(averages)
        self.val.close()
        self.val = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        for report in (self.val, self.train):
            if report is not None:
                report.close()  # the count reached, in the log above the error
        self.train = self.val = None


POLICIES = (SkipCounts, NonFiniteGuard, RngResume)


def missing_policies(callbacks: list[Callback]) -> list[Callback]:
    """Default instances of the POLICIES that `callbacks` lacks (for `LightningModule.configure_callbacks`)."""
    return [policy() for policy in POLICIES if not any(isinstance(c, policy) for c in callbacks)]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _safe_rng_states() -> dict[str, Any]:
    """Lightning's RNG states in types `torch.load(weights_only=True)` accepts (numpy's array as a tensor)."""
    states = _collect_rng_states()
    name, keys, pos, has_gauss, gauss = states["numpy"]
    states["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return states


def _unsafe_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = states["numpy"]
    return {**states, "numpy": (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)}
