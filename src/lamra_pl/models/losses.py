"""Every loss: the retriever's InfoNCE with its gathers and masks, the GradCache surrogate, and the reranker's
answer-token loss.

Gather contract (each rank): `queries` are this rank's local queries; `candidates` are the candidates of every rank,
concatenated in rank order by `all_gather_with_grad`; `labels[i]` indexes query i's positive in that
concatenation. The loss is the mean over local queries. Gathering with gradient makes the backward
reduce-scatter the candidate gradients, and DDP's averaging then yields the exact gradient of the global-mean
loss, the same as one process on the concatenated batch (lightning.md section 3).

GradCache (`gradcache_surrogate`): with embeddings computed without a graph and the loss's gradient `grad` with respect
to them, back-propagating <embeddings recomputed with a graph, grad> gives each parameter exactly the gradient of the
full-batch loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor, all_gather_tensor_autograd


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's own slice."""
    if not _distributed():
        return x
    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return x
    return all_gather_tensor(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def false_negative_mask(positive_ids: torch.Tensor, candidate_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[Q, C] bool: candidate j is one of query i's positives but not its labelled one (so not a negative).

    `positive_ids` is [Q, P], padded with -1; `candidate_ids` is [C] (non-negative).
    """
    is_positive = (candidate_ids[None, :, None] == positive_ids[:, None, :]).any(-1)
    labelled = F.one_hot(labels, candidate_ids.numel()).bool()
    return is_positive & ~labelled


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-directional InfoNCE, query -> candidate, on L2-normalised features, in float32.

    `logit_scale` is 1 / temperature. Masked columns are removed from query i's softmax.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = logit_scale * (queries.float() @ candidates.float().T)
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, labels)


def gradcache_surrogate(embeddings: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The scalar whose gradient with respect to the parameters behind `embeddings` is the loss's: <embeddings, grad>,
    where `grad` is d loss / d embeddings computed on cached copies."""
    return (embeddings * grad).sum()


Reduction = Literal["tokens", "kinds"]


def answer_token_loss(
    token_loss: torch.Tensor, token_kind: torch.Tensor, weights: tuple[float, float], reduction: Reduction
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reranker's loss from its answer tokens' cross-entropies, `token_kind` 0 (pointwise) or 1 (listwise).

    "tokens" (LamRA): one weighted mean over every answer token of the batch, so with equal weights it is the stock
    causal-LM loss over the assistant turns; "kinds": the paper's L = w_point * mean(pointwise tokens) + w_list *
    mean(listwise tokens). Returns (loss, the detached mean loss of each kind present as `loss_<kind>`).
    """
    stats: dict[str, torch.Tensor] = {}
    parts = []
    for kind, (name, weight) in enumerate(zip(("pointwise", "listwise"), weights, strict=True)):
        mine = token_kind == kind
        if mine.any():
            stats[f"loss_{name}"] = token_loss[mine].mean().detach()
            parts.append((weight, token_loss[mine]))
    if reduction == "tokens":
        per_token = torch.cat([torch.full_like(t, w) for w, t in parts])
        loss = (per_token * torch.cat([t for _, t in parts])).sum() / per_token.sum().clamp(min=1e-12)
    else:
        loss = sum(w * t.mean() for w, t in parts)
    return loss, stats


def distillation_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    teacher_scores: torch.Tensor,
    logit_scale: torch.Tensor | float,
    teacher_temperature: float,
) -> torch.Tensor:
    """Reranker -> embedder distillation over each query's own candidate list (U-MARVEL, Qwen3-VL-Embedding), float32.

    For query i and its list of K candidates, the student's distribution is softmax_j(logit_scale * <q_i, c_ij>)
    (the embedder's cosine similarities at its own temperature, 1 / logit_scale) and the teacher's is
    softmax_j(teacher_scores[i, j] / teacher_temperature). The loss is the forward KL divergence
    KL(teacher || student) = sum_j p_t(j) (log p_t(j) - log p_s(j)), averaged over queries: the teacher is the
    target, as in U-MARVEL's code (`F.kl_div(log q_student, p_teacher)`); its gradient with respect to the student's
    logits is (p_s - p_t) / B. It differs from the soft-label cross-entropy -sum_j p_t(j) log p_s(j) by the teacher's
    entropy, a constant, so both train alike. The teacher's scores carry no gradient.

    Shapes: `queries` [B, D] and `candidates` [B, K, D] are L2-normalised; `teacher_scores` [B, K] (e.g. the
    reranker's P(yes) per candidate).

    Gather contract: unlike `info_nce`, nothing crosses ranks. Each rank holds its own queries with their own lists,
    and the loss is the mean over its local queries. Ranks hold equal numbers of queries (the training stream deals
    equal batches), so DDP's gradient averaging gives exactly the gradient of the mean over the global queries: two
    processes give the gradient of one process on the concatenated batch (`tests/test_distill.py`).
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        student = logit_scale * torch.einsum("bd,bkd->bk", queries.float(), candidates.float())
        teacher = teacher_scores.detach().float() / teacher_temperature
        log_student = F.log_softmax(student, dim=-1)
        log_teacher = F.log_softmax(teacher, dim=-1)
        return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
