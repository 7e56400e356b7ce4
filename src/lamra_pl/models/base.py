"""What every lamra-pl LightningModule on an LMM backbone shares: loading, positions, optimiser, checkpoints.

`EmbeddingModule` (the retriever) and `RerankModule` (the reranker) differ in their heads and losses only; the
backbone, LoRA, freezing, position ids, LR schedule and trainable-only checkpoints are the same code.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from transformers import BatchFeature, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lamra_pl.data.schema import SKIP_REASONS
from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import LoraSpec, hf_model, load_backbone, load_processor

Rope = Literal["model", "1d"]


class BackboneModule(LightningModule):
    """Base of the modules that train an image-text-to-text backbone (with LoRA or fully).

    Subclasses call `super().__init__` with their hyperparameters saved and implement the steps. Args common to
    all of them (see the subclasses' docstrings for their own):

        backbone: local directory of a Hugging Face checkpoint (Qwen2-VL, Qwen2.5-VL); never downloaded.
        lora: LoRA on the language model's linear layers; null for full fine-tuning of the language model.
        rope: "model" uses the backbone's own positions (mRoPE for Qwen2-VL images, as `generate` does); "1d"
            reproduces the LamRA reference, which ran the decoder with plain sequential positions.
            Both count positions over non-padding tokens, so padding never moves them.
        min_pixels, max_pixels: image resizing bounds given to the processor.
        padding_side: override the tokenizer's padding side.
        train_vision_tower, train_projector: unfreeze these (frozen by default, as in LamRA).
        dtype: weight dtype of the base model ("auto": the checkpoint's). LoRA weights stay float32.
        gradient_checkpointing: non-reentrant activation checkpointing in the decoder.
        optimizer: built in `configure_optimizers` from trainable parameters only.
        warmup_ratio, lr_schedule: linear warmup over this fraction of `trainer.max_steps`, then cosine to 0
            (or constant).
    """

    def __init__(
        self,
        *,
        lora: LoraSpec | dict | None,
        optimizer: OptimizerCallable,
        add_emb_token: bool,
    ) -> None:
        super().__init__()
        if isinstance(lora, dict):  # from a checkpoint's hyper_parameters
            lora = LoraSpec(**lora)
        # Collects the subclass's __init__ arguments too. Plain values only, so checkpoints load with
        # torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["optimizer", "lora", "add_emb_token"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.lora = lora
        self.optimizer_factory = optimizer
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
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        # Checkpoints hold trainable weights only; `on_load_checkpoint` checks that none is missing.
        self.strict_loading = False

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
        rank_zero_info(f"lamra-pl: training samples skipped: {totals}")

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self.trainable_names() - set(checkpoint["state_dict"]))
        if missing:
            raise LamraError(
                f"checkpoint does not match the model config: {len(missing)} trainable tensors are missing, "
                f"e.g. {missing[:3]} (is the LoRA rank, target list or freezing the same as in training?)"
            )
