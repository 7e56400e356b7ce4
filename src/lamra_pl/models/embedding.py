"""LamRA-Ret: an LMM embedding model trained with InfoNCE (spec lamra.md sections 1-3)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.cli import OptimizerCallable
from transformers import BatchFeature

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import (
    EMB_TOKEN,
    Backbone,
    BackboneSpec,
    LoraSpec,
    hf_model,
    refuse_unsharded_trainables,
    trunk,
)
from lamra_pl.models.base import ScheduleSpec, TrainingModule
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.distill import DistillSpec, distill_objective
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.gradcache import GradCacheSpec, check_trainer, gradcache_step
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.models.matryoshka import check_dim, truncate
from lamra_pl.models.pooling import (
    MEANS,
    LatentAttentionPooling,
    Pooling,
    mean_pool,
    pooling_index,
    refuse_earlier_block,
    states_at,
)


class EmbeddingModule(ContrastiveSteps, TrainingModule):
    """Queries and candidates (text, image or both; an optional instruction on the query) -> unit vectors.

    Args:
        backbone: the LMM and how it loads and trains (`BackboneSpec`: path, rope, dtype, pixels, freezing, ...).
        lora: LoRA on the language model's linear layers (`LoraSpec`); null for full fine-tuning of the language
            model.
        pooling: "before_emb" (LamRA), "last_token", "latent_attention" (NV-Embed's block, MM-Embed's pooling:
            pre-norm cross-attention to `latents` trainable latents with `latent_heads` heads, a GEGLU feed-forward,
            residuals, then the mean over the real tokens; its weights train with the adapter and `merge` saves
            them; NV-Embed's own weights load from the folder's pooling file), or "mean" (the mean of the
            last-layer states over the real tokens: U-MARVEL's, with `backbone.attention: bidirectional`).
        latents: latent-attention pooling's latent array size.
        latent_heads: latent-attention pooling's heads.
        latent_head_dim: latent-attention pooling's width per head (default: the hidden size, as NV-Embed's).
        temperature: InfoNCE temperature (LamRA: 0.05).
        learnable_temperature: train the temperature, CLIP-style.
        max_text_tokens: texts are cut to this many tokens before the prompt is built (LamRA: 480).
        instructions: prepend each query's task instruction (LamRA); false is the "no instruction" ablation, in
            training and in every evaluation of this model.
        gradcache: GradCache's settings (`GradCacheSpec`: chunk_size, clip_norm); null: the plain step.
        optimizer: built from the trainable parameters.
        schedule: the learning-rate schedule (`ScheduleSpec`: warmup_ratio, lr_schedule).
        dim: embed at this Matryoshka dimension: each embedding cut to its first `dim` values and L2-normalised
            again (`lamra_pl.models.matryoshka`), in every use of the model; null: the full width (the hidden size).
        loss: the InfoNCE's options (`LossSpec`: false_negative_margin, query_query, candidate_candidate,
            hardness_beta, task_temperatures, matryoshka_dims, matryoshka_weights), each off by default; null:
            LamRA's InfoNCE.
        distill: reranker -> embedder distillation (`DistillSpec`: teacher_temperature, weight, infonce_weight,
            candidates; `lamra_pl.models.distill`): KL between the teacher's and this model's softmax over each
            query's candidate list (`lamra-pl distill-data` shards), optionally plus InfoNCE; null: InfoNCE alone.
        exclude_instruction: the means of "mean" and "latent_attention" pooling leave out the tokens of a query's
            task instruction (NV-Embed's and MM-Embed's instruction mask); they are still attended to. The chat
            template's own tokens stay in, as on candidates.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        lora: LoraSpec | None = None,
        pooling: Pooling = "before_emb",
        latents: int = 512,
        latent_heads: int = 8,
        latent_head_dim: int | None = None,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        max_text_tokens: int | None = 480,
        instructions: bool = True,
        gradcache: GradCacheSpec | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleSpec | None = None,
        dim: int | None = None,
        loss: LossSpec | None = None,
        distill: DistillSpec | None = None,
        exclude_instruction: bool = False,
    ) -> None:
        check_dim(dim)
        if temperature <= 0:
            raise LamraError(f"model.temperature must be positive, got {temperature}")
        if exclude_instruction and pooling not in MEANS:
            raise LamraError(
                f"model.exclude_instruction leaves the instruction out of a mean over tokens; pooling {pooling!r} "
                f"reads one token: use pooling {' or '.join(MEANS)}, or exclude_instruction: false"
            )
        super().__init__(optimizer=optimizer, schedule=schedule)
        self.backbone = Backbone(BackboneSpec.of(backbone), lora, add_emb_token=True)
        self.processor = self.backbone.processor
        self.model: torch.nn.Module | None = None
        self.pooling, self.latents, self.latent_heads = pooling, latents, latent_heads
        self.latent_head_dim = latent_head_dim
        self.max_text_tokens, self.instructions = max_text_tokens, instructions
        self.exclude_instruction = exclude_instruction
        self.gradcache = GradCacheSpec.of(gradcache)
        # GradCache needs several backward passes per optimizer step, which only manual optimisation allows.
        self.automatic_optimization = self.gradcache is None
        self.emb_token_id = self.processor.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        self.init_temperature(temperature, learnable_temperature)
        self.init_loss(loss)
        self.latent_pool: LatentAttentionPooling | None = None
        self.dim = dim
        self.distill = DistillSpec.of(distill)
        self._distill_stats: dict[str, torch.Tensor] = {}

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.backbone.build(self)
        if self.pooling == "latent_attention" and self.latent_pool is None:
            hidden = hf_model(self.model).config.get_text_config().hidden_size
            self.latent_pool = LatentAttentionPooling(hidden, self.latents, self.latent_heads, self.latent_head_dim)
            self.latent_pool.load_if_saved(self.backbone.spec.path)  # a merged folder's trained pooling
        check_dim(self.dim, self.full_dim)
        if self.device_mesh is not None:
            refuse_unsharded_trainables(self)

    @property
    def full_dim(self) -> int:
        """The width of the embeddings before any `dim` cut: the language model's hidden size."""
        if self.model is None:
            raise LamraError("the model is not built yet: call configure_model() first")
        return int(hf_model(self.model).config.get_text_config().hidden_size)

    def check_checkpoint_matches(self, saved: dict[str, torch.Tensor]) -> None:
        refuse_earlier_block(saved, "checkpoint", prefix="latent_pool.")
        super().check_checkpoint_matches(saved)

    def configure_callbacks(self) -> list[Callback]:
        if self.gradcache is not None:  # the first hook that sees the Trainer, before Lightning checks it
            check_trainer(self.trainer)
        return super().configure_callbacks()

    @property
    def trunk(self) -> torch.nn.Module:
        """The backbone without its LM head: last-layer hidden states."""
        if self.model is None:
            raise LamraError("the model is not built yet: call configure_model() first")
        return trunk(self.model)

    def collator(self) -> EmbeddingCollator:
        return EmbeddingCollator(
            self.processor,
            max_text_tokens=self.max_text_tokens,
            chunk_size=None if self.gradcache is None else self.gradcache.chunk_size,
            instructions=self.instructions,
            distill=self.distill,
            instruction_mask=self.exclude_instruction,
        )

    def embed(self, inputs: BatchFeature | list[BatchFeature]) -> torch.Tensor:
        """L2-normalised float32 embeddings, one per row of a processor batch (or of a list of chunks, in order), cut
        to `dim` values when it is set."""
        if isinstance(inputs, list):
            return torch.cat([self.embed(chunk) for chunk in inputs])
        states = self.backbone.hidden_states(self.model, inputs)
        if self.latent_pool is not None:
            return truncate(self.latent_pool(states, self._pooled_tokens(inputs)).float(), self.dim)
        if self.pooling == "mean":
            return truncate(mean_pool(states, self._pooled_tokens(inputs)), self.dim)
        index = pooling_index(inputs["input_ids"], inputs["attention_mask"], self.emb_token_id, self.pooling)
        return truncate(states_at(states, index).float(), self.dim)

    def _pooled_tokens(self, inputs: BatchFeature) -> torch.Tensor:
        """[B, L] the tokens a mean pools: the real ones, less the instruction's with `exclude_instruction`."""
        mask = inputs["attention_mask"].bool()
        if not self.exclude_instruction:
            return mask
        if "instruction_mask" not in inputs:
            raise LamraError(
                "exclude_instruction: this batch has no instruction_mask; encode it with this module's collator()"
            )
        return mask & ~inputs["instruction_mask"].bool()

    def optimised_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One GradCache optimizer step (`lamra_pl.models.gradcache`)."""
        assert self.gradcache is not None
        return gradcache_step(self, self.gradcache, batch)

    def contrastive_loss(
        self,
        batch: dict[str, Any],
        gather: bool,
        queries: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE, or with `distill` the distillation objective (`lamra_pl.models.distill`) over the same
        embeddings (GradCache passes its cached ones); returns (loss, in-batch top-1 accuracy)."""
        if self.distill is None:
            return super().contrastive_loss(batch, gather, queries, candidates)
        if "teacher_scores" not in batch:
            raise LamraError("model.distill is set but the batch carries no teacher scores (a collator without it)")
        queries = self.embed(batch["query"]) if queries is None else queries
        candidates = self.embed(batch["candidates"]) if candidates is None else candidates
        infonce, accuracy = super().contrastive_loss(batch, gather, queries, candidates)
        loss, self._distill_stats = distill_objective(
            self.distill, infonce, queries, candidates, batch["teacher_scores"], self.logit_scale
        )
        return loss, accuracy

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.distill is not None:  # the terms of the loss apart: train/distill_kl, train/infonce, ...
            stats = {f"train/{name}": value for name, value in self._distill_stats.items()}
            self.log_dict(stats, batch_size=len(batch["query_ids"]), sync_dist=True)
        return loss
