"""What every lamra-pl LightningModule shares.

`TrainingModule`: skip counts, the non-finite step guard, the LR schedule, trainable-only checkpoints that resume
exactly (RNG states included). `BackboneModule` adds what the modules on an LMM backbone share: loading, LoRA,
freezing, positions. `EmbeddingModule` (the retriever) and `RerankModule` (the reranker) differ in their heads
and losses only; `CLIPModule` (the dual-encoder baseline) is a `TrainingModule` on open_clip.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor
from transformers import BatchFeature, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lamra_pl.data.schema import SKIP_REASONS
from lamra_pl.errors import LamraError
from lamra_pl.losses import rank_and_world
from lamra_pl.models.backbone import LoraSpec, fully_shard_backbone, hf_model, load_backbone, load_processor

Rope = Literal["model", "1d"]


class TrainingModule(LightningModule):
    """Base of every lamra-pl training module: the cross-cutting parts of a step and of a checkpoint.

    Subclasses call `super().__init__` (which saves their `__init__` arguments as hyperparameters, except
    `ignore`) and define `warmup_ratio`, `lr_schedule` and `max_nonfinite_steps` among them:

        optimizer: built in `configure_optimizers` from trainable parameters only.
        warmup_ratio, lr_schedule: linear warmup over this fraction of `trainer.max_steps`, then cosine to 0
            (or constant).
        max_nonfinite_steps: a step whose gradients are not finite (NaN/inf loss) is skipped and counted
            (`train/nonfinite_steps`); more than this many in a row stop the run with an error.

    Checkpoints hold the trainable weights only, every rank's RNG state (restored before the first step after a
    resume, so dropout draws continue exactly) and the skip counts, so a resumed run goes on as the uninterrupted
    one would.
    """

    def __init__(self, *, optimizer: OptimizerCallable, ignore: tuple[str, ...] = ()) -> None:
        super().__init__()
        # Collects the subclasses' __init__ arguments too. Plain values only, so checkpoints load with
        # torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "ignore", *ignore])
        self.optimizer_factory = optimizer
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        self.nonfinite_steps, self._nonfinite_in_a_row = 0, 0
        self._resume_rng: dict[str, Any] | None = None
        # Checkpoints hold trainable weights only; `on_load_checkpoint` checks that none is missing.
        self.strict_loading = False

    # ---------------------------------------------------------------------------------------- skips
    def _count_skips(self, batch: dict[str, Any]) -> None:
        skipped = batch.get("skipped")
        if skipped is not None:
            self.skipped += skipped.cpu()
        for reason, count in zip(SKIP_REASONS, self.skipped.tolist(), strict=True):
            # Cumulative per rank, summed over ranks: equal batch counts per rank make this safe per step.
            self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", sync_dist=True, batch_size=1)

    def on_train_end(self) -> None:
        totals = {
            reason: int(self.trainer.callback_metrics.get(f"data/skipped_{reason}", 0)) for reason in SKIP_REASONS
        }
        rank_zero_info(
            f"lamra-pl: training samples skipped: {totals}; non-finite steps skipped: {self.nonfinite_steps}"
        )

    # ------------------------------------------------------------------------------ non-finite steps
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The local shard of a sharded (FSDP2) gradient; the decision below combines the ranks'.
        grads = [_local(p.grad) for p in self.parameters() if p.grad is not None]
        finite = bool(torch.stack([g.isfinite().all() for g in grads]).all()) if grads else True
        # Sharded (FSDP) gradients differ per rank: every rank must take the same decision.
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            self._nonfinite_in_a_row = 0
        else:
            for p in self.parameters():
                p.grad = None  # the optimizer skips parameters without gradients: no update, no moment decay
            self.nonfinite_steps += 1
            self._nonfinite_in_a_row += 1
            rank_zero_warn(f"lamra-pl: step {self.global_step} has non-finite gradients (NaN/inf loss): skipped")
            if self._nonfinite_in_a_row > self.hparams.max_nonfinite_steps:
                raise LamraError(
                    f"{self._nonfinite_in_a_row} steps in a row had non-finite gradients (NaN/inf loss), more than "
                    f"model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}: lower the learning rate, check "
                    "the data and the precision, or resume from an earlier checkpoint"
                )
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not in on_load_checkpoint: creating the dataloader iterator after loading draws from
        # the global RNG, which the uninterrupted run did not do at this point.
        if self._resume_rng is not None:
            _set_rng_states(self._resume_rng)
            self._resume_rng = None

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
        warmup = math.ceil(self.hparams.warmup_ratio * total)
        if self.hparams.lr_schedule == "cosine":
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
        # Called on every rank: gather what each rank needs to go on exactly after a resume.
        mine = {"rng": _safe_rng_states(), "skipped": self.skipped.clone()}
        ranks: list[Any] = [mine]
        _, world = rank_and_world()
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        checkpoint[RESUME_KEY] = {
            "rng": [r["rng"] for r in ranks],
            "skipped": torch.stack([r["skipped"] for r in ranks]).sum(0),
            "nonfinite_steps": self.nonfinite_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP2Strategy has loaded (and checked) the tensors already
            self.check_checkpoint_matches(checkpoint["state_dict"])
        state = checkpoint.get(RESUME_KEY)
        if state is None or self._trainer is None:  # loading weights only (merge, predict)
            return
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if len(state["rng"]) == world:
            self._resume_rng = _unsafe_rng_states(state["rng"][rank])
        else:
            rank_zero_warn(
                f"lamra-pl: the checkpoint was written by {len(state['rng'])} processes, this run has {world}: "
                "random draws (dropout) do not continue exactly"
            )
        # The totals so far, once (on rank 0): the logged counts are sums over ranks.
        self.skipped = state["skipped"].clone() if rank == 0 else torch.zeros_like(state["skipped"])
        self.nonfinite_steps = int(state["nonfinite_steps"])

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


class BackboneModule(TrainingModule):
    """Base of the modules that train an image-text-to-text backbone (with LoRA or fully).

    Subclasses call `super().__init__` with their hyperparameters saved and implement the steps. Args common to
    all of them (see the subclasses' docstrings for their own):

        backbone: local directory of a Hugging Face checkpoint (Qwen2-VL, Qwen2.5-VL, LLaVA-Next, or any text-only
            causal LM), or a text-only causal LM's .gguf file; never downloaded.
        lora: LoRA on the language model's linear layers; null for full fine-tuning of the language model.
        rope: "model" uses the backbone's own positions (mRoPE for Qwen2-VL images, as `generate` does); "1d"
            reproduces the LamRA reference, which ran the decoder with plain sequential positions.
            Both count positions over non-padding tokens, so padding never moves them.
        min_pixels, max_pixels: image resizing bounds given to the processor.
        padding_side: override the tokenizer's padding side.
        train_vision_tower, train_projector: unfreeze these (frozen by default, as in LamRA).
        dtype: weight dtype of the base model ("auto": the checkpoint's). LoRA weights stay float32.
        gradient_checkpointing: non-reentrant activation checkpointing in the decoder.
        optimizer, warmup_ratio, lr_schedule, max_nonfinite_steps: see `TrainingModule`.
    """

    def __init__(
        self,
        *,
        lora: LoraSpec | dict | None,
        optimizer: OptimizerCallable,
        add_emb_token: bool,
    ) -> None:
        super().__init__(optimizer=optimizer, ignore=("lora", "add_emb_token"))
        if isinstance(lora, dict):  # from a checkpoint's hyper_parameters
            lora = LoraSpec(**lora)
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.lora = lora
        h = self.hparams
        self.processor = load_processor(
            h.backbone,
            min_pixels=h.min_pixels,
            max_pixels=h.max_pixels,
            padding_side=h.padding_side,
            trust_remote_code=h.trust_remote_code,
            add_emb_token=add_emb_token,
        )
        self.model: torch.nn.Module | None = None

    # ----------------------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        h = self.hparams
        self.model = load_backbone(
            h.backbone,
            vocab_size=len(self.processor.tokenizer),
            lora=self.lora,
            train_vision_tower=h.train_vision_tower,
            train_projector=h.train_projector,
            # Only the reranker reads the LM head; the retriever pools hidden states and has no such argument.
            train_lm_head=h.get("train_lm_head", False),
            dtype=h.dtype,
            attn_implementation=h.attn_implementation,
            gradient_checkpointing=h.gradient_checkpointing,
            trust_remote_code=h.trust_remote_code,
        )
        # from_pretrained returns eval mode and Lightning does not call train(): without this, LoRA dropout and
        # activation checkpointing (both active only in training mode) would silently stay off during fit.
        self.model.train(self.training)
        if self.device_mesh is not None:  # FSDP2Strategy (ModelParallelStrategy): shard before the optimizer
            bf16 = str(self.trainer.precision).startswith("bf16")
            fully_shard_backbone(self.model, self.trunk, self.device_mesh["data_parallel"], bf16=bf16)
            unsharded = [n for n, p in self.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
            if unsharded:
                # Their gradients would never be reduced across ranks: each rank would train its own copy.
                raise LamraError(
                    f"FSDP2 shards the backbone's trunk only, but {unsharded} are trainable outside it "
                    "(learnable_temperature, train_lm_head, latent_attention pooling): turn them off or use DDP"
                )

    @property
    def trunk(self) -> torch.nn.Module:
        """The backbone without its LM head: last-layer hidden states."""
        if self.model is None:
            raise LamraError("the model is not built yet: call configure_model() first")
        return hf_model(self.model).base_model

    def position_ids(self, inputs: BatchFeature) -> torch.Tensor:
        mask = inputs["attention_mask"]
        trunk = self.trunk
        if self.hparams.rope == "model" and "image_grid_thw" in inputs and hasattr(trunk, "get_rope_index"):
            positions, _ = trunk.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=mask,
            )
            return positions
        # Sequential positions over real tokens, as generate() builds them for left padding.
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, inputs: BatchFeature) -> torch.Tensor:
        """[B, L, H] last-layer states (after the final norm), with this module's positions."""
        return self.trunk(**inputs, position_ids=self.position_ids(inputs), use_cache=False).last_hidden_state


RESUME_KEY = "lamra_pl_resume"


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
