"""The retriever's science, whatever encodes the inputs: InfoNCE steps, validation Recall, prediction, the probe.

`ContrastiveSteps` is mixed into a `TrainingModule` that defines `embed(batch) -> unit vectors` and
`collator()`: the LMM retriever (`EmbeddingModule`) and the CLIP dual encoder (`CLIPModule`) train, validate
and encode through this same code, so their numbers are comparable by construction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from lamra_pl.errors import LamraError
from lamra_pl.formats.index import PROBE_TEXTS
from lamra_pl.formats.sample import Item
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.models.losses import (
    all_gather_no_grad,
    all_gather_with_grad,
    false_negative_mask,
    info_nce_with_options,
    matryoshka_loss,
    query_query_mask,
    rank_and_world,
)
from lamra_pl.ranking.metrics import evaluate_embeddings


class ContrastiveSteps(LightningModule):
    """Training, validation, test and predict steps of a retriever (mixed in before a `TrainingModule`).

    The subclass calls `init_temperature`, then `init_loss`, in its `__init__` and defines `embed` and `collator`.
    """

    def init_temperature(self, temperature: float, learnable: bool) -> None:
        log_scale = torch.tensor(math.log(1.0 / temperature))
        self.learnable_temperature = learnable
        if learnable:
            self.log_logit_scale = torch.nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale, persistent=False)
        self._retrieval: list[tuple[str, str, list[str], np.ndarray]] = []  # validation embeddings, per batch
        self.loss_spec = LossSpec()
        self.task_log_logit_scale: torch.nn.Parameter | None = None

    def init_loss(self, loss: LossSpec | dict[str, Any] | None) -> None:
        """The InfoNCE's options (`LossSpec`); per-task temperatures start at the model's temperature."""
        self.loss_spec = LossSpec.of(loss)
        n = self.loss_spec.task_temperatures
        if n is not None:
            self.task_log_logit_scale = torch.nn.Parameter(self.log_logit_scale.detach().clone().repeat(n))

    def loss_parameters(self) -> list[torch.Tensor]:
        """The trainable tensors the loss uses directly (not through the embeddings): GradCache takes their
        gradients from the cached-embedding loss."""
        own = [self.log_logit_scale] if self.learnable_temperature else []
        return own + ([] if self.task_log_logit_scale is None else [self.task_log_logit_scale])

    def query_logit_scale(self, batch: dict[str, Any]) -> torch.Tensor:
        """The logit scale: one for the batch, or with per-task temperatures one per query ([Q]): its task's, or the
        model's for a query without a task id (-1 in the batch's `task_ids`)."""
        if self.task_log_logit_scale is None:
            return self.logit_scale
        tasks = batch.get("task_ids")
        if tasks is None:
            raise LamraError("model.loss.task_temperatures needs batches that carry each query's task id")
        n = self.task_log_logit_scale.numel()
        unknown = tasks[(tasks >= n) | (tasks < -1)]
        if unknown.numel():
            raise LamraError(
                f"a query has task_id {int(unknown[0])}, but model.loss.task_temperatures is {n} (task ids 0..{n - 1})"
            )
        per_task = self.task_log_logit_scale.exp().clamp(max=100.0)
        return torch.where(tasks >= 0, per_task[tasks.clamp(min=0)], self.logit_scale)

    # Defined by the subclass (declared here for the steps below): L2-normalised float32 embeddings, one per row
    # of a collated batch; and the collator that builds those batches.
    embed: Callable[[Any], torch.Tensor]
    collator: Callable[[], Any]
    # Also the subclass's: the Matryoshka dimension `embed` cuts to (None: none) and the width before any cut
    # (`lamra_pl.models.matryoshka`); an index records both.
    dim: int | None
    full_dim: int
    # Defined by a subclass that turns automatic optimisation off (EmbeddingModule's GradCache): one optimizer step
    # on a batch, returning (loss, in-batch accuracy).
    optimised_step: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.embed(inputs)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    @torch.no_grad()
    def probe_embeddings(self) -> np.ndarray:
        """[len(PROBE_TEXTS), D] embeddings of fixed texts: the fingerprint of what this model computes, which an
        index records (`lamra_pl.formats.index`)."""
        batch = self.collator().encode([Item(f"probe{i}", t) for i, t in enumerate(PROBE_TEXTS)])
        was_training = self.training
        self.eval()
        out = self.embed(batch.to(self.device)).float().cpu().numpy()
        self.train(was_training)
        return out

    def contrastive_loss(
        self,
        batch: dict[str, Any],
        gather: bool,
        queries: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE of local queries against (gathered) candidates, with `loss_spec`'s options; returns (loss, in-batch
        top-1 accuracy, at full size, over the candidates).

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
        spec = self.loss_spec
        spec.check_dim(queries.shape[-1])
        all_queries = query_mask = None
        if spec.query_query:
            all_queries = all_gather_with_grad(queries) if gather else queries
            all_labels = all_gather_no_grad(labels) if gather else labels
            query_mask = query_query_mask(batch["positive_ids"], candidate_ids[all_labels])
        scale = self.query_logit_scale(batch)

        def loss_at(q: torch.Tensor, c: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
            return info_nce_with_options(
                q,
                c,
                labels,
                scale,
                mask,
                all_queries=a,
                query_mask=query_mask,
                candidate_candidate=spec.candidate_candidate,
                margin=spec.false_negative_margin,
                hardness_beta=spec.hardness_beta,
            )

        loss = matryoshka_loss(loss_at, [queries, candidates, all_queries], spec.matryoshka_dims, spec.weights)
        with torch.no_grad():
            scores = (queries @ candidates.T).masked_fill(mask, float("-inf"))
            accuracy = (scores.argmax(-1) == labels).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.automatic_optimization:
            loss, accuracy = self.contrastive_loss(batch, gather=True)
        else:  # EmbeddingModule's GradCache
            loss, accuracy = self.optimised_step(batch)
        n = len(batch["query_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/inbatch_acc", accuracy, batch_size=n, sync_dist=True)
        if self.learnable_temperature:
            self.log("train/temperature", 1.0 / self.logit_scale.detach(), batch_size=n)
        if self.task_log_logit_scale is not None:
            temperatures = 1.0 / self.task_log_logit_scale.detach().exp().clamp(max=100.0)
            self.log_dict({f"train/temperature_task{t}": v for t, v in enumerate(temperatures)}, batch_size=n)
        return loss

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
        """Embeddings of an encoding batch (`lamra_pl.data.items`); None for an empty shard."""
        return None if batch["items"] is None else self.embed(batch["items"])
