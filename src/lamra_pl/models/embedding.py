"""LamRA-Ret: an LMM embedding model trained with InfoNCE (spec lamra.md sections 1-3)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from torch.distributed.fsdp import FSDPModule
from transformers import BatchFeature

from lamra_pl.errors import LamraError
from lamra_pl.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    false_negative_mask,
    info_nce,
    rank_and_world,
)
from lamra_pl.models.backbone import EMB_TOKEN, DType, LoraSpec
from lamra_pl.models.base import BackboneModule, Rope
from lamra_pl.models.inputs import EmbeddingCollator
from lamra_pl.retrieval.evaluate import evaluate_embeddings

Pooling = Literal["before_emb", "last_token"]


def pooling_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, emb_token_id: int, pooling: Pooling
) -> torch.Tensor:
    """Per row, the position whose last-layer state is the embedding.

    "before_emb": the token just before the first `<emb>` (LamRA; the `\\n` ending `<|im_start|>assistant\\n`).
    "last_token": the last non-padding token. Both hold for left and right padding.
    """
    if pooling == "last_token":
        # argmax returns the first maximum of the running count, i.e. the last real token.
        return attention_mask.long().cumsum(-1).argmax(-1)
    hits = (input_ids == emb_token_id) & attention_mask.bool()
    missing = (~hits.any(-1)).nonzero().flatten().tolist()
    if missing:
        raise LamraError(f"rows {missing} of the batch have no {EMB_TOKEN} token to pool before")
    return hits.int().argmax(-1) - 1


class EmbeddingModule(BackboneModule):
    """Queries and candidates (text, image or both; an optional instruction on the query) -> unit vectors.

    Args (besides those of `BackboneModule`: backbone, lora, rope, min/max_pixels, padding_side, freezing, dtype,
    attn_implementation, gradient_checkpointing, trust_remote_code, optimizer, warmup_ratio, lr_schedule):
        pooling: "before_emb" (LamRA) or "last_token".
        temperature: InfoNCE temperature (LamRA: 0.05); `learnable_temperature` trains it, CLIP-style.
        max_text_tokens: texts are cut to this many tokens before the prompt is built (LamRA: 480).
        min_pixels, max_pixels: LamRA: 4*28*28, 300*28*28.
        gradcache_chunk_size: switches GradCache on (`gradcache_step`): the batch is encoded in chunks of this
            many inputs, so activation memory is that of one chunk while the loss still sees every in-batch
            negative. The gradients are exact. Trainer-side gradient clipping and accumulation are unavailable
            (manual optimisation); use `gradcache_clip_norm` for clipping.
        gradcache_clip_norm: max total gradient norm under GradCache (None: no clipping).
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
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_logit_scale = torch.nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)
        self._retrieval: list[tuple[str, str, list[str], np.ndarray]] = []  # validation embeddings, per batch

    def collator(self) -> EmbeddingCollator:
        h = self.hparams
        return EmbeddingCollator(self.processor, max_text_tokens=h.max_text_tokens, chunk_size=h.gradcache_chunk_size)

    def embed(self, inputs: BatchFeature | list[BatchFeature]) -> torch.Tensor:
        """L2-normalised float32 embeddings, one per row of a processor batch (or of a list of chunks, in order)."""
        if isinstance(inputs, list):
            return torch.cat([self.embed(chunk) for chunk in inputs])
        states = self.hidden_states(inputs)
        index = pooling_index(inputs["input_ids"], inputs["attention_mask"], self.emb_token_id, self.hparams.pooling)
        pooled = states[torch.arange(index.numel(), device=index.device), index]
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, inputs: BatchFeature) -> torch.Tensor:
        return self.embed(inputs)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    # ------------------------------------------------------------------------------------------ steps
    def contrastive_loss(
        self,
        batch: dict[str, Any],
        gather: bool,
        queries: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of local queries against (gathered) candidates; returns (loss, in-batch top-1 accuracy).

        The embeddings are computed from the batch unless given (GradCache passes its cached ones).
        """
        queries = self.embed(batch["query"]) if queries is None else queries
        candidates = self.embed(batch["candidates"]) if candidates is None else candidates
        candidate_ids = batch["candidate_ids"]
        rank = 0
        if gather:
            rank, _ = rank_and_world()
            candidates = all_gather_with_grad(candidates)
            candidate_ids = all_gather_no_grad(candidate_ids)
        local = batch["candidate_ids"].numel()
        labels = rank * local + torch.arange(queries.shape[0], device=queries.device)
        mask = false_negative_mask(batch["positive_ids"], candidate_ids, labels)
        loss = info_nce(queries, candidates, labels, self.logit_scale, mask)
        with torch.no_grad():
            scores = (queries @ candidates.T).masked_fill(mask, float("-inf"))
            accuracy = (scores.argmax(-1) == labels).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            loss, accuracy = self.contrastive_loss(batch, gather=True)
        else:
            loss, accuracy = self.gradcache_step(batch)
        n = len(batch["query_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/inbatch_acc", accuracy, batch_size=n, sync_dist=True)
        if self.hparams.learnable_temperature:
            self.log("train/temperature", 1.0 / self.logit_scale.detach(), batch_size=n)
        self._count_skips(batch)
        return loss

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

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if "kind" in batch:  # a retrieval task's queries or pool: embed now, search and score at epoch end
            if batch["items"] is not None:
                ids = [r["id"] for r in batch["records"]]
                embeddings = self.embed(batch["items"]).float().cpu().numpy()
                self._retrieval.append((batch["source"], batch["kind"], ids, embeddings))
            return
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        collected, self._retrieval = self._retrieval, []
        if self.trainer.sanity_checking:  # a few batches only: pools would be partial, so the numbers meaningless
            return
        _, world = rank_and_world()
        if world > 1:  # once per epoch, on every rank (uneven batch counts make per-step collectives hang)
            every: list[Any] = [None] * world
            torch.distributed.all_gather_object(every, collected)
            collected = [part for rank_parts in every for part in rank_parts]
        ids: dict[tuple[str, str], list[str]] = defaultdict(list)
        embeddings: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
        for source, kind, batch_ids, batch_embeddings in collected:
            ids[source, kind] += batch_ids
            embeddings[source, kind].append(batch_embeddings)
        groups: dict[str, dict[str, tuple[list[str], np.ndarray]]] = defaultdict(dict)
        for (source, kind), group_ids in ids.items():
            groups[source][kind] = (group_ids, np.concatenate(embeddings[source, kind]))
        if not groups:
            return
        results = evaluate_embeddings(groups)
        metrics = {f"val/{task}/{m}": v for task, r in results["tasks"].items() for m, v in r.items() if m[:2] == "R@"}
        metrics.update({f"val/average/{m}": v for m, v in results["average"].items()})
        self.log_dict(metrics, batch_size=1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        # Ranks may see different numbers of eval batches, so nothing here may be a per-step collective:
        # negatives are the local batch only, and metrics reduce once at epoch end.
        loss, accuracy = self.contrastive_loss(batch, gather=False)
        n = len(batch["query_ids"])
        self.log(f"{stage}/loss", loss, batch_size=n, sync_dist=True)
        self.log(f"{stage}/inbatch_acc", accuracy, batch_size=n, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """Embeddings of an encoding batch (`lamra_pl.retrieval.encode`); None for an empty shard."""
        return None if batch["items"] is None else self.embed(batch["items"])
