"""M-BEIR's Recall@K, vectorised: a hit rate, 1 for a query if any of its positives is in its top K.

This is UniIR's `compute_recall_at_k` (specs/mmembed_mbeir.md 5.7), not |relevant in top K| / |relevant|
(torchmetrics' RetrievalRecall); torchmetrics' RetrievalHitRate is the same metric, but per query in Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RANK_PAD = -1  # in `ranked`: fewer results than K
POSITIVE_PAD = -2  # in `positives`: fewer positives than the widest query; never equal to a rank or its pad


def first_hit(ranked: np.ndarray, positives: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Per query, the 0-based rank of its first positive in `ranked`, or K if none is there.

    Args:
        ranked: [Q, K] int64 candidate numbers, best first (RANK_PAD for missing results).
        positives: [Q, P] int64 candidate numbers of each query's positives (POSITIVE_PAD for padding).
    """
    q, k = ranked.shape
    out = np.empty(q, dtype=np.int64)
    for start in range(0, q, chunk):  # bounds the [chunk, K, P] comparison
        part = slice(start, start + chunk)
        relevant = (ranked[part, :, None] == positives[part, None, :]).any(-1)
        out[part] = np.where(relevant.any(1), relevant.argmax(1), k)
    return out


def recall_at_k(ranked: np.ndarray, positives: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """{"R@k": hit rate} for each k (no k may exceed the ranking depth K)."""
    too_deep = [k for k in ks if k > ranked.shape[1]]
    if too_deep:
        raise ValueError(f"R@{too_deep[0]} needs the top {too_deep[0]}, but the rankings hold {ranked.shape[1]}")
    hit = first_hit(ranked, positives)
    return {f"R@{k}": float((hit < k).mean()) for k in ks}


def pad_positives(positives: list[list[int]]) -> np.ndarray:
    width = max((len(p) for p in positives), default=0) or 1
    out = np.full((len(positives), width), POSITIVE_PAD, dtype=np.int64)
    for row, p in enumerate(positives):
        out[row, : len(p)] = p
    return out


def chance(pool_size: int, positives_per_query: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """Expected hit rate of a random ranking: 1 - C(N - P, k) / C(N, k), averaged over queries."""

    def one(p: int, k: int) -> float:
        return 1.0 - math.comb(pool_size - p, k) / math.comb(pool_size, k) if p else 0.0

    n = len(positives_per_query)
    return {f"R@{k}": sum(one(p, k) for p in positives_per_query) / n for k in ks}


def wrong_modality(
    ranked: Sequence[Sequence[str]], targets: Sequence[str | None], modality_of: Mapping[str, str], k: int
) -> float:
    """MM-Embed's modality bias: the share of each query's top k whose modality is not its target modality, averaged
    over the queries with a target and a result (1 minus the paper's "retrieval modality accuracy")."""
    shares = []
    for ids, target in zip(ranked, targets, strict=True):
        top = ids[:k]
        if target is not None and top:
            shares.append(sum(modality_of[d] != target for d in top) / len(top))
    return float(np.mean(shares)) if shares else float("nan")
