"""LamRA-Ret: an LMM embedding model trained with InfoNCE (spec lamra.md sections 1-3)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from torch.distributed.fsdp import FSDPModule
from transformers import BatchFeature

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import EMB_TOKEN, DType, LoraSpec, hf_model
from lamra_pl.models.base import BackboneModule, Rope
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.inputs import EmbeddingCollator
from lamra_pl.models.pooling import LatentAttentionPooling

Pooling = Literal["before_emb", "last_token", "latent_attention"]


def pooling_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, emb_token_id: int, pooling: Pooling
) -> torch.Tensor:
    """Per row, the position whose last-layer state is the embedding.

    "before_emb": the token just before the first `<emb>` (LamRA; the `\\n` ending `<|im_start|>assistant\\n`).
    "last_token": the last non-padding token. Both hold for left and right padding. ("latent_attention" pools
    every real token: `pooling.LatentAttentionPooling`.)
    """
    if pooling == "last_token":
        # argmax returns the first maximum of the running count, i.e. the last real token.
        return attention_mask.long().cumsum(-1).argmax(-1)
    hits = (input_ids == emb_token_id) & attention_mask.bool()
    missing = (~hits.any(-1)).nonzero().flatten().tolist()
    if missing:
        raise LamraError(f"rows {missing} of the batch have no {EMB_TOKEN} token to pool before")
    return hits.int().argmax(-1) - 1


class EmbeddingModule(ContrastiveSteps, BackboneModule):
    """Queries and candidates (text, image or both; an optional instruction on the query) -> unit vectors.

    Args (besides those of `BackboneModule`: backbone, lora, rope, min/max_pixels, padding_side, freezing, dtype,
    attn_implementation, gradient_checkpointing, trust_remote_code, optimizer, warmup_ratio, lr_schedule):
        pooling: "before_emb" (LamRA), "last_token", or "latent_attention" (NV-Embed's, MM-Embed's pooling: trainable
            latent cross-attention + MLP + mean over the real tokens, `latents` latents and `latent_heads` heads;
            its weights train with the adapter and `merge` saves them).
        temperature: InfoNCE temperature (LamRA: 0.05); `learnable_temperature` trains it, CLIP-style.
        max_text_tokens: texts are cut to this many tokens before the prompt is built (LamRA: 480).
        min_pixels, max_pixels: LamRA: 4*28*28, 300*28*28.
        gradcache_chunk_size: switches GradCache on (`gradcache_step`): the batch is encoded in chunks of this
            many inputs, so activation memory is that of one chunk while the loss still sees every in-batch
            negative. The gradients are exact. Trainer-side gradient clipping and accumulation are unavailable
            (manual optimisation); use `gradcache_clip_norm` for clipping.
        gradcache_clip_norm: max total gradient norm under GradCache (None: no clipping).
        instructions: prepend each query's task instruction (LamRA); false is the "no instruction" ablation, in
            training and in every evaluation of this model.
    """

    def __init__(
        self,
        backbone: str,
        lora: LoraSpec | None = None,
        pooling: Pooling = "before_emb",
        rope: Rope = "model",
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        max_text_tokens: int | None = 480,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        padding_side: Literal["left", "right"] | None = None,
        train_vision_tower: bool = False,
        train_projector: bool = False,
        dtype: DType = "auto",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = True,
        trust_remote_code: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.03,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        max_nonfinite_steps: int = 5,
        gradcache_chunk_size: int | None = None,
        gradcache_clip_norm: float | None = None,
        instructions: bool = True,
        latents: int = 512,
        latent_heads: int = 8,
    ) -> None:
        if temperature <= 0:
            raise LamraError(f"model.temperature must be positive, got {temperature}")
        if gradcache_clip_norm is not None and gradcache_chunk_size is None:
            raise LamraError(
                "model.gradcache_clip_norm applies with model.gradcache_chunk_size only; without GradCache use "
                "trainer.gradient_clip_val"
            )
        super().__init__(lora=lora, optimizer=optimizer, add_emb_token=True)
        # GradCache needs several backward passes per optimizer step, which only manual optimisation allows.
        self.automatic_optimization = gradcache_chunk_size is None
        self.emb_token_id = self.processor.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        self.init_temperature(temperature, learnable_temperature)
        self.latent_pool: LatentAttentionPooling | None = None

    def configure_model(self) -> None:
        super().configure_model()
        h = self.hparams
        if h.pooling == "latent_attention" and self.latent_pool is None:
            hidden = hf_model(self.model).config.get_text_config().hidden_size
            self.latent_pool = LatentAttentionPooling(hidden, h.latents, h.latent_heads)
            self.latent_pool.load_if_saved(h.backbone)  # a merged folder's trained pooling

    def collator(self) -> EmbeddingCollator:
        h = self.hparams
        return EmbeddingCollator(
            self.processor,
            max_text_tokens=h.max_text_tokens,
            chunk_size=h.gradcache_chunk_size,
            instructions=h.get("instructions", True),  # absent from checkpoints written before it existed
        )

    def embed(self, inputs: BatchFeature | list[BatchFeature]) -> torch.Tensor:
        """L2-normalised float32 embeddings, one per row of a processor batch (or of a list of chunks, in order)."""
        if isinstance(inputs, list):
            return torch.cat([self.embed(chunk) for chunk in inputs])
        states = self.hidden_states(inputs)
        if self.latent_pool is not None:
            return F.normalize(self.latent_pool(states, inputs["attention_mask"]).float(), dim=-1)
        index = pooling_index(inputs["input_ids"], inputs["attention_mask"], self.emb_token_id, self.hparams.pooling)
        pooled = states[torch.arange(index.numel(), device=index.device), index]
        return F.normalize(pooled.float(), dim=-1)

    # ------------------------------------------------------------------------------------------ steps
    def gradcache_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step with GradCache (Gao et al. 2021); returns (loss, in-batch accuracy), detached.

        1. Embed every chunk without a graph, recording the RNG state before each (dropout masks).
        2. Compute the loss on the cached embeddings, gathered across ranks with gradient, and its gradient with
           respect to them (and to a learnable temperature).
        3. Re-embed each chunk with a graph under its recorded RNG state and backpropagate <embedding, gradient>:
           the parameter gradients sum to exactly those of the full-batch loss.
        """
        optimizer = self.optimizers()
        optimizer.zero_grad()
        chunks = [*batch["query"], *batch["candidates"]]
        device_rng = [self.device] if self.device.type == "cuda" else []
        states = []
        with torch.no_grad():
            cached = []
            for chunk in chunks:
                states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in device_rng]))
                cached.append(self.embed(chunk))
        n_query = len(batch["query"])
        queries = torch.cat(cached[:n_query]).requires_grad_()
        candidates = torch.cat(cached[n_query:]).requires_grad_()
        loss, accuracy = self.contrastive_loss(batch, gather=True, queries=queries, candidates=candidates)
        # Only leaves (and the gather's collective) are on this graph, no parameter of the backbone: no DDP hook.
        leaves = [queries, candidates]
        if self.hparams.learnable_temperature:
            leaves.append(self.log_logit_scale)
        grads = torch.autograd.grad(loss, leaves)
        chunk_grads = [*grads[0].split([len(c["input_ids"]) for c in batch["query"]])]
        chunk_grads += grads[1].split([len(c["input_ids"]) for c in batch["candidates"]])
        for k, (chunk, grad, (cpu_state, device_states)) in enumerate(zip(chunks, chunk_grads, states, strict=True)):
            last = k == len(chunks) - 1
            with self._gradient_sync(enabled=last), torch.random.fork_rng(devices=device_rng):
                torch.set_rng_state(cpu_state)
                for d, state in zip(device_rng, device_states, strict=True):
                    torch.cuda.set_rng_state(state, d)
                surrogate = (self.embed(chunk) * grad).sum()
                if last and self.hparams.learnable_temperature:  # its gradient joins the last (synced) backward
                    surrogate = surrogate + (self.log_logit_scale * grads[2]).sum()
                self.manual_backward(surrogate)
        if self.hparams.gradcache_clip_norm is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.gradcache_clip_norm, gradient_clip_algorithm="norm"
            )
        optimizer.step()  # runs on_before_optimizer_step (the non-finite check) first
        self.lr_schedulers().step()
        return loss.detach(), accuracy

    @contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients across ranks in this backward only if `enabled` (the last GradCache chunk): DDP
        through `no_sync`, FSDP2 through `set_requires_gradient_sync`; without either it changes nothing."""
        strategy, trunk = self.trainer.strategy, self.trunk
        if enabled:
            yield
        elif isinstance(trunk, FSDPModule):
            trunk.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                trunk.set_requires_gradient_sync(True)
        elif isinstance(strategy, ParallelStrategy):
            with strategy.block_backward_sync():
                yield
        else:
            yield
