"""`LossSpec`: the retriever's InfoNCE options beyond LamRA's (`model.loss` in a config), each off by default.

The formulas are in `lamra_pl.models.losses` (`info_nce_with_options`, `matryoshka_loss`); `ContrastiveSteps`
(`lamra_pl.models.contrastive`) applies them, for the plain step and GradCache alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lamra_pl.errors import LamraError


@dataclass
class LossSpec:
    """Options of the retriever's InfoNCE (`model.loss`; null or `{}`: LamRA's plain InfoNCE, bit for bit).

    With scores s(a, b) the cosine of two unit vectors and 1/tau the logit scale, query i's loss is
    -log(exp(s(q_i, d_i+)/tau) / Z_i), its denominator Z_i summing exp(logit) over every column not masked; the
    options add columns, masks and weights to Z_i (Qwen3-Embedding's improved InfoNCE, Zhang et al. 2025).

    Args:
        false_negative_margin: drop from Z_i every column whose score exceeds the positive's plus this margin,
            s > s(q_i, d_i+) + margin (Qwen3-Embedding / Qwen3-VL-Embedding: 0.1; NV-Retriever's positive-aware
            false-negative removal), on top of the in-batch copies of a query's positives (always masked). It is
            decided on each step's scores, without gradient, over every rank's candidates, and applies to the
            query-query and candidate-candidate columns too (compared with the same s(q_i, d_i+)). null: off.
        query_query: add the other in-batch queries (every rank's) as negatives of each query: columns
            s(q_i, q_j) in Z_i (GTE's improved contrastive loss, Li et al. 2023; Qwen3-Embedding). A query whose
            labelled positive is one of query i's positives (query i itself included) is not a negative.
        candidate_candidate: add the other in-batch candidates (every rank's positives and hard negatives) as
            negatives of query i's positive: columns s(d_i+, d_j) in Z_i (GTE; Qwen3-Embedding's
            document-document term), except d_i+ itself and copies of query i's positives.
        hardness_beta: weight each negative column j of Z_i by w_ij = exp(beta * sg(s_ij)), sg = no gradient, so
            harder negatives count more (RzenEmbed's hardness-weighted InfoNCE, after LLaVE, Lan et al. 2025,
            eq. 5): the logit becomes s_ij/tau + beta * sg(s_ij); the positive's stays s/tau. null: off.
        task_temperatures: N > 0: one learnable temperature per task id 0..N-1 (M-BEIR: 9), each starting at
            `temperature`: query i's logits use its task's scale. Queries without a task id (records with
            `task_id: null`) use the model's `temperature` (learnable only with `learnable_temperature`). A task id
            >= N is refused. A task never seen in training keeps its starting temperature, which only scales that
            task's validation loss: embeddings, indexes and retrieval never depend on a temperature. DDP and
            GradCache train them exactly; FSDP2 refuses them (trainable tensors outside the trunk). null: off.
        matryoshka_dims: Matryoshka representation learning (Kusupati et al. 2022): the loss becomes
            L(full) + sum_k w_k * L(dims[k]), L(d) being the whole loss above on the embeddings cut to their first
            d dimensions and L2-normalised again (each option applies at each size; scores, masks and weights
            from that size's vectors). The full embedding always counts, with weight 1, so every d must be
            smaller than the embedding size. null: off.
        matryoshka_weights: w_k for `matryoshka_dims`, one each (default: all 1).
    """

    false_negative_margin: float | None = None
    query_query: bool = False
    candidate_candidate: bool = False
    hardness_beta: float | None = None
    task_temperatures: int | None = None
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.task_temperatures is not None and self.task_temperatures <= 0:
            raise LamraError(f"model.loss.task_temperatures must be positive, got {self.task_temperatures}")
        dims = self.matryoshka_dims
        if dims is not None and (not dims or any(d <= 0 for d in dims) or len(set(dims)) != len(dims)):
            raise LamraError(f"model.loss.matryoshka_dims must be distinct positive sizes, got {dims}")
        if self.matryoshka_weights is not None and (dims is None or len(self.matryoshka_weights) != len(dims)):
            raise LamraError(
                f"model.loss.matryoshka_weights needs one weight per matryoshka_dims entry, got "
                f"{self.matryoshka_weights} for {dims}"
            )

    @classmethod
    def of(cls, value: LossSpec | dict[str, Any] | None) -> LossSpec:
        if value is None:
            return cls()
        return value if isinstance(value, LossSpec) else cls(**value)

    @property
    def weights(self) -> list[float]:
        """One weight per Matryoshka size (empty without them)."""
        if self.matryoshka_weights is not None:
            return list(self.matryoshka_weights)
        return [1.0] * len(self.matryoshka_dims or [])

    def check_dim(self, dim: int) -> None:
        """Refuse a Matryoshka size not below the embedding size `dim`."""
        too_big = [d for d in self.matryoshka_dims or [] if d >= dim]
        if too_big:
            raise LamraError(
                f"model.loss.matryoshka_dims {too_big} are not below the embedding size {dim} (the full embedding "
                "always counts: list smaller sizes only)"
            )
