"""Reranker -> embedder distillation (U-MARVEL; Qwen3-VL-Embedding's distillation stage): the retriever trained on a
list of candidates per query against a reranker's scores of them.

`DistillSpec` switches it on (`model.distill` of an `EmbeddingModule`; null: off). Each training record then carries
its list (`candidates`, with a teacher score each: `lamra-pl distill-data` writes them from a retrieval's top K and
`lamra-pl rerank`'s scores, `lamra_pl.formats.sample`); the collator puts the list's candidates after the positives
and hard negatives (`lamra_pl.models.embedding_inputs.EmbeddingCollator`) and the scores in `teacher_scores` [B, K].
The step's loss (`distill_objective`) is

    weight * KL(teacher || student over each query's list) + infonce_weight * InfoNCE

where the KL is `losses.distillation_loss` (the student at the model's temperature, `model.temperature`, learnable or
not; the teacher at `teacher_temperature`) and InfoNCE is the retriever's usual loss over the gathered in-batch
candidates: the positives, the hard negatives and every list (a query's own positives in them are masked, as every
in-batch copy of a positive is). The loss is computed from the batch's embeddings, so GradCache
(`model.gradcache`) stays exact with it, and under DDP it gives the gradient of one process on the concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lamra_pl.errors import LamraError
from lamra_pl.models.losses import distillation_loss


@dataclass
class DistillSpec:
    """Distillation from a reranker's scores (`model.distill` in a config; null: off).

    Args:
        teacher_temperature: the teacher's softmax over a list is softmax(score / teacher_temperature). For P(yes)
            in [0, 1], 0.1 spreads the logits over 10 units. U-MARVEL divides its teacher's scores by 2 and by the
            student's temperature, 0.05: a teacher temperature of 0.1.
        weight: the weight of the KL term.
        infonce_weight: the weight of the retriever's InfoNCE added to it (0: distillation alone, as U-MARVEL's
            distillation stage).
        candidates: how many of each list's candidates the loss sees, the best-ranked first (null: the whole list,
            which must then have one length in a batch: `distill-data --k` writes them so). A shorter list is a
            skipped sample (`bad_sample`).
    """

    teacher_temperature: float = 0.1
    weight: float = 1.0
    infonce_weight: float = 0.0
    candidates: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise LamraError(f"model.distill.teacher_temperature must be positive, got {self.teacher_temperature}")
        if not all(math.isfinite(w) and w >= 0 for w in (self.weight, self.infonce_weight)):
            raise LamraError(
                f"model.distill.weight and infonce_weight must be >= 0, got {self.weight} and {self.infonce_weight}"
            )
        if self.weight == 0 and self.infonce_weight == 0:
            raise LamraError("model.distill: weight and infonce_weight are both 0, so nothing would train")
        if self.candidates is not None and self.candidates < 1:
            raise LamraError(f"model.distill.candidates must be >= 1 (or null: the whole list), got {self.candidates}")

    @classmethod
    def of(cls, value: DistillSpec | dict[str, Any] | None) -> DistillSpec | None:
        return cls(**value) if isinstance(value, dict) else value


def distill_objective(
    spec: DistillSpec,
    infonce: torch.Tensor,
    queries: torch.Tensor,
    candidates: torch.Tensor,
    teacher_scores: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss from this rank's embeddings: `queries` [B, D], `candidates` [C, D] laid out as the collator
    lays them out (the B * K list candidates last, query-major), `teacher_scores` [B, K], and `infonce`, the InfoNCE
    already computed over them. Returns (loss, detached statistics: `distill_kl`, `infonce`, and `distill_agree`, the
    share of queries whose list the student and the teacher head with the same candidate)."""
    b, k = teacher_scores.shape
    if queries.shape[0] != b or candidates.shape[0] < b * (k + 1):
        raise LamraError(
            f"a distillation batch of {queries.shape[0]} queries and {candidates.shape[0]} candidates cannot hold "
            f"{b} lists of {k} after the positives"
        )
    lists = candidates[-b * k :].reshape(b, k, -1)
    kl = distillation_loss(queries, lists, teacher_scores, logit_scale, spec.teacher_temperature)
    loss = spec.weight * kl
    if spec.infonce_weight:
        loss = loss + spec.infonce_weight * infonce
    with torch.no_grad():
        student_top = torch.einsum("bd,bkd->bk", queries.float(), lists.float()).argmax(-1)
        agree = (student_top == teacher_scores.argmax(-1)).float().mean()
    return loss, {"distill_kl": kl.detach(), "infonce": infonce.detach(), "distill_agree": agree}
