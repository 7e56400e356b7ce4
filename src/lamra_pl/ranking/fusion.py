"""Score fusion: final = retrieval score + w * rerank score over the reranked head of a ranking (LamRA).

Only the top N of a run are reranked; they are re-sorted by the fused score (ties keep the retrieval order, so
w = 0 gives back the retrieval ranking exactly) and the rest of the run follows in its retrieval order. w is per
task: a weights file maps task names to w, with "default" for the others, e.g. LamRA's
`experiments/lamra_rank/fusion.yaml`. `tune_fusion` picks w per task on a validation split. w = inf ("inf")
sorts the head by the rerank score alone, ties in retrieval order (MM-Embed's zero-shot reranking).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from lamra_pl.errors import LamraError

DEFAULT = "default"
GRID = tuple(round(0.05 * i, 2) for i in range(41))  # 0, 0.05, ..., 2


def fuse(retrieval: np.ndarray, rerank: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """(order, fused scores) of one query's head: `retrieval` and `rerank` scores in retrieval order, [N] each.

    The order sorts by fused score, descending, ties broken by retrieval rank (a stable sort); w = 0 keeps the
    retrieval order whatever the scores (even a run whose scores are not sorted, or NaN rerank scores).
    """
    if weight == 0:
        return np.arange(len(retrieval)), np.asarray(retrieval, dtype=np.float64).copy()
    if np.isinf(weight):  # the rerank score alone (inf * a score would make ties NaN)
        order = np.argsort(-np.asarray(rerank, dtype=np.float64), kind="stable")
        return order, np.asarray(rerank, dtype=np.float64)[order]
    fused = np.asarray(retrieval, dtype=np.float64) + weight * np.asarray(rerank, dtype=np.float64)
    order = np.argsort(-fused, kind="stable")
    return order, fused[order]


def load_weights(spec: str | float | None) -> dict[str, float]:
    """Weights from a YAML/JSON file ({task: w, "default": w}) or one number for every task (None: LamRA's 1)."""
    if spec is None:
        return {DEFAULT: 1.0}
    if isinstance(spec, int | float):
        return _checked({DEFAULT: float(spec)}, "--fusion")
    path = Path(spec)
    if not path.is_file():
        try:
            return _checked({DEFAULT: float(spec)}, "--fusion")
        except ValueError:
            raise LamraError(f"fusion weights {spec!r}: neither a number nor a file") from None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, int | float) or v == "inf" for v in data.values()):
        raise LamraError(f"{path}: expected a mapping of task name (or 'default') to a number (or inf)")
    return _checked({str(k): float(v) for k, v in data.items()}, str(path))


def _checked(weights: dict[str, float], where: str) -> dict[str, float]:
    negative = {k: v for k, v in weights.items() if not v >= 0}  # NaN too
    if negative:
        raise LamraError(f"fusion weights must be >= 0 (a reranker's score adds evidence), {where} has {negative}")
    return weights


def weight_for(weights: dict[str, float], task: str) -> float:
    if task in weights:
        return weights[task]
    if DEFAULT in weights:
        return weights[DEFAULT]
    raise LamraError(f"the fusion weights name no weight for task {task!r} and no 'default'")


def fused_ranking(ranked: list[str], retrieval: np.ndarray, rerank: np.ndarray, weight: float) -> list[str]:
    """A query's ranking after fusing its first len(rerank) candidates."""
    n = len(rerank)
    order, _ = fuse(retrieval[:n], rerank, weight)
    return [ranked[i] for i in order] + ranked[n:]


def tune_fusion(
    queries: list[tuple[list[str], np.ndarray, np.ndarray, set[str]]], k: int, grid: tuple[float, ...] = GRID
) -> tuple[float, dict[float, float]]:
    """The w of `grid` with the best Recall@k over `queries` (ranked ids, retrieval scores, rerank scores of the
    head, positive ids); ties go to the smaller w (the closer to retrieval alone). Returns (w, {w: recall})."""
    if not queries:
        raise LamraError("no reranked query to tune the fusion weight on")
    recall: dict[float, float] = {}
    for w in grid:
        hits = 0
        for ranked, retrieval, rerank, positives in queries:
            hits += any(d in positives for d in fused_ranking(ranked, retrieval, rerank, w)[:k])
        recall[w] = hits / len(queries)
    best = max(recall.values())
    return min(w for w, r in recall.items() if r == best), recall
