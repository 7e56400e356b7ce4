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

`LossSpec`'s options (`lamra_pl.models.loss_spec`) are `info_nce_with_options` and `matryoshka_loss`, under the
same contract (the query-query term's queries are gathered with gradient as the candidates are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor, all_gather_tensor_autograd

from lamra_pl.models.matryoshka import truncate


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


def query_query_mask(positive_ids: torch.Tensor, query_positives: torch.Tensor) -> torch.Tensor:
    """[Q, Qall] bool: query g is not a negative of query i, because g's labelled positive is one of i's positives
    (every query is masked against itself, its own labelled positive being one of its positives).

    `positive_ids` is [Q, P] (padded with -1) for the local queries; `query_positives` [Qall] the candidate id of
    the labelled positive of every query, gathered in rank order as the queries are.
    """
    return (query_positives[None, :, None] == positive_ids[:, None, :]).any(-1)


def info_nce_with_options(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    *,
    all_queries: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    candidate_candidate: bool = False,
    margin: float | None = None,
    hardness_beta: float | None = None,
) -> torch.Tensor:
    """InfoNCE with `LossSpec`'s options (`lamra_pl.models.loss_spec`), in float32; `info_nce` itself when every
    option is off and `logit_scale` is a scalar.

    Gather contract as `info_nce`'s: `queries` [Q, D] local, `candidates` [C, D] every rank's in rank order,
    `labels` [Q] indices into them, `mask` [Q, C] the columns that are no negatives (`false_negative_mask`).
    `logit_scale` is a scalar or one scale per query, [Q] (per-task temperatures). With s the dot product, query
    i's logits are the row

        [s(q_i, c_j) for j < C] + [s(q_i, a_g) for g < Qall if all_queries] + [s(c_{l_i}, c_j) for j < C if
        candidate_candidate]

    times its logit scale, and the loss is the mean over i of -log softmax(row)[l_i] over the columns kept:

    * `all_queries` [Qall, D]: every rank's queries, gathered with gradient (the query-query term); `query_mask`
      [Qall] columns dropped from each row (`query_query_mask`; it must drop query i itself);
    * `candidate_candidate`: the candidate-candidate term; its columns `mask` drops, and l_i (the positive itself);
    * `margin`: also dropped, every column (but l_i) with s > s(q_i, c_{l_i}) + margin, decided without gradient;
    * `hardness_beta`: every column but l_i gets beta * s (detached) added to its logit, i.e. its exp weighted by
      exp(beta * sg(s)).
    """
    per_query = isinstance(logit_scale, torch.Tensor) and logit_scale.dim() == 1
    if all_queries is None and not candidate_candidate and margin is None and hardness_beta is None:
        return info_nce(queries, candidates, labels, logit_scale[:, None] if per_query else logit_scale, mask)
    with torch.autocast(device_type=queries.device.type, enabled=False):
        q, c = queries.float(), candidates.float()
        no_negative = torch.zeros(q.shape[0], c.shape[0], dtype=torch.bool, device=q.device)
        no_negative = no_negative if mask is None else mask
        blocks, excluded = [q @ c.T], [no_negative]
        if all_queries is not None:
            if query_mask is None:
                raise ValueError("the query-query term needs its mask (each query's own column at least)")
            blocks.append(q @ all_queries.float().T)
            excluded.append(query_mask)
        if candidate_candidate:
            blocks.append(c[labels] @ c.T)
            excluded.append(no_negative | F.one_hot(labels, c.shape[0]).bool())
        scores = torch.cat(blocks, dim=1)
        dropped = torch.cat(excluded, dim=1)
        is_label = F.one_hot(labels, scores.shape[1]).bool()  # l_i indexes the first block
        if margin is not None:
            with torch.no_grad():
                positive = scores.gather(1, labels[:, None])
                dropped = dropped | ((scores > positive + margin) & ~is_label)
        scale = logit_scale[:, None].float() if per_query else logit_scale
        logits = scale * scores
        if hardness_beta is not None:
            logits = logits + torch.where(is_label, 0.0, hardness_beta * scores.detach())
        logits = logits.masked_fill(dropped, float("-inf"))
        return F.cross_entropy(logits, labels)


def matryoshka_loss(
    loss: Callable[..., torch.Tensor],
    embeddings: Sequence[torch.Tensor | None],
    dims: Sequence[int] | None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Matryoshka representation learning (Kusupati et al. 2022): `loss(*embeddings)` plus, for each size d of
    `dims` with weight w (default 1), w * `loss` of the embeddings cut to their first d dimensions and
    L2-normalised again (None entries passed as they are). `loss(*embeddings)` alone when `dims` is empty or
    None."""
    total = loss(*embeddings)
    for d, w in zip(dims or [], weights or [1.0] * len(dims or []), strict=True):
        cut = [None if e is None else truncate(e.float(), d) for e in embeddings]  # as `dim` cuts at inference
        total = total + w * loss(*cut)
    return total


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
