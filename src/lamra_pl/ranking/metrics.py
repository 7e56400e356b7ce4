"""M-BEIR's metrics: Recall@K per task and averaged, chance level, and MM-Embed's modality bias.

Recall@K is a hit rate, 1 for a query if any of its positives is in its top K, vectorised: UniIR's
`compute_recall_at_k` (specs/mmembed_mbeir.md 5.7), not |relevant in top K| / |relevant| (torchmetrics'
RetrievalRecall); torchmetrics' RetrievalHitRate is the same metric, but per query in Python. `score_task` is the one
scoring of a task's rankings: `lamra-pl evaluate` applies it to run files, validation during `fit` to rankings it
searched in memory (`evaluate_embeddings`), so the two give the same numbers.

Beyond the hit rate, a task folder may ask for (task.json "metrics", `lamra_pl.formats.task`):

* `mAP@k`, CIRCO's mean average precision at k (Baldrati et al., ICCV 2023; its evaluation code, as LamRA's
  `eval_circo.py` computes it): per query, AP@k = sum over ranks i <= k of precision@i at the ranks holding a
  positive, divided by min(k, number of positives); averaged over queries. Every positive of the qrels counts in
  that number, found in the pool or not.
* GeneCIS's R@1/2/3 is the hit rate R@k with k = 1, 2, 3 of rankings of each query's own gallery (the task's
  galleries.jsonl: `lamra-pl retrieve` ranks the gallery only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.formats.index import id_ranks
from lamra_pl.formats.task import (
    GALLERIES_FILE,
    QRELS_FILE,
    read_excluded,
    read_qrels,
    reported_metric,
    task_info,
    task_metrics,
)
from lamra_pl.ranking.search import leave_out, search

KS = (1, 5, 10)
BIAS_K = 10  # wrong_modality@BIAS_K
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


def map_at_k(ranked: np.ndarray, positives: np.ndarray, counts: np.ndarray, k: int) -> float:
    """CIRCO's mAP@k of [Q, K] rankings: mean over queries of sum_{i<=k} precision@i * rel_i / min(k, counts).

    Args:
        ranked: [Q, K] int64 candidate numbers, best first (RANK_PAD for missing results), K >= k.
        positives: [Q, P] int64 candidate numbers of each query's positives (POSITIVE_PAD for padding).
        counts: [Q] each query's number of positives (those outside the pool included), at least 1.
    """
    if k > ranked.shape[1]:
        raise ValueError(f"mAP@{k} needs the top {k}, but the rankings hold {ranked.shape[1]}")
    relevant = (ranked[:, :k, None] == positives[:, None, :]).any(-1)  # [Q, k]
    precision = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
    ap = (precision * relevant).sum(1) / np.minimum(k, counts)
    return float(ap.mean()) if len(ap) else float("nan")


def metric_depth(names: Sequence[str]) -> int:
    """The ranking depth the metrics need: their largest k."""
    return max(int(name.split("@")[1]) for name in names)


def pad_positives(positives: list[list[int]]) -> np.ndarray:
    width = max((len(p) for p in positives), default=0) or 1
    out = np.full((len(positives), width), POSITIVE_PAD, dtype=np.int64)
    for row, p in enumerate(positives):
        out[row, : len(p)] = p
    return out


def chance(pool_size: int, positives_per_query: list[int], ks: tuple[int, ...]) -> dict[str, float]:
    """Expected hit rate of a random ranking: 1 - C(N - P, k) / C(N, k), averaged over queries (1 for a query with
    a positive when k >= N: the top k is the whole pool)."""

    def one(p: int, k: int) -> float:
        if not p:
            return 0.0
        return 1.0 - math.comb(pool_size - p, k) / math.comb(pool_size, k) if k < pool_size else 1.0

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


def score_task(
    qids: list[str],
    ranked: np.ndarray,
    row_of: dict[str, int],
    qrels: dict[str, set[str]],
    ks: tuple[int, ...] = KS,
    qrels_file: str = "qrels",
    metrics: Sequence[str] = (),
) -> dict[str, float]:
    """Recall@K of rankings given as [Q, K] pool row numbers (RANK_PAD for missing results); `row_of` maps each
    pool id to its row; and each of `metrics` (`R@k`, `mAP@k`: the module's docstring) not among them.

    Every query needs at least one qrels line. Positives absent from the pool count (they cannot be found).
    """
    no_qrels = [q for q in qids if not qrels.get(q)]
    if no_qrels:
        raise LamraError(f"{len(no_qrels)} queries have no positive in {qrels_file}, e.g. {no_qrels[:3]}")
    positives = pad_positives([[row_of[d] for d in qrels[q] if d in row_of] for q in qids])
    extra_ks = tuple(int(m[2:]) for m in metrics if m.startswith("R@") and int(m[2:]) not in ks)
    scores = recall_at_k(ranked, positives, (*ks, *extra_ks))
    counts = np.array([len(qrels[q]) for q in qids], dtype=np.int64)
    for name in metrics:
        if name.startswith("mAP@"):
            scores[name] = map_at_k(ranked, positives, counts, int(name[4:]))
    return scores


def summarise(tasks: dict[str, dict[str, Any]], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """The average over tasks: each Recall@K, M-BEIR's headline ("reported": the mean of the tasks' reported
    metrics) and, when every task has it, the modality bias."""
    if not tasks:
        return {}
    average = {f"R@{k}": float(np.mean([t[f"R@{k}"] for t in tasks.values()])) for k in ks}
    # A metric beyond R@K (mAP@k, R@2) is averaged over the tasks that have it, when all of them have it.
    extra = [m for m in dict.fromkeys(m for t in tasks.values() for m in t if m.startswith(("R@", "mAP@")))]
    for name in extra:
        if name not in average and all(name in t for t in tasks.values()):
            average[name] = float(np.mean([t[name] for t in tasks.values()]))
    average["reported"] = float(np.mean([t[t["reported"]] for t in tasks.values()]))
    bias = f"wrong_modality@{BIAS_K}"
    if all(bias in t for t in tasks.values()):
        average[bias] = float(np.mean([t[bias] for t in tasks.values()]))
    return average


def evaluate_embeddings(
    groups: dict[str, dict[str, tuple[list[str], np.ndarray]]], ks: tuple[int, ...] = KS
) -> dict[str, Any]:
    """Evaluate tasks from in-memory embeddings: {task_dir: {"queries": (ids, emb), "pool": (ids, emb)}}.

    Embeddings are rounded to float16 first, as an index stores them, so the numbers equal `index`+`retrieve`
    (a task's excluded.jsonl left out as `retrieve` leaves it out; a task of per-query galleries is refused: its
    rankings are `retrieve`'s, one gallery at a time).
    """
    tasks: dict[str, dict[str, Any]] = {}
    for task_dir, parts in sorted(groups.items()):
        info = task_info(task_dir)
        metrics = task_metrics(info)
        if (Path(task_dir) / GALLERIES_FILE).is_file():
            raise LamraError(
                f"{task_dir} ranks each query in its own gallery ({GALLERIES_FILE}), which validation does not: "
                "leave it out of data.val_tasks and score it with `lamra-pl retrieve` + `evaluate`"
            )
        (qids, queries), (pool_ids, pool) = parts["queries"], parts["pool"]
        row_of = {i: row for row, i in enumerate(pool_ids)}
        excluded = {
            qid: np.fromiter((row_of[i] for i in dict.fromkeys(ids) if i in row_of), dtype=np.int64)
            for qid, ids in (read_excluded(task_dir) or {}).items()
        }
        depth = max(max(ks), metric_depth(metrics))
        found = search(
            pool.astype(np.float16),
            queries.astype(np.float16),
            depth + max((len(rows) for rows in excluded.values()), default=0),
            tie_key=id_ranks(pool_ids),
            backend="torch",
        )
        found = leave_out(found, qids, excluded, depth)
        qrels_path = Path(task_dir) / QRELS_FILE
        scores = score_task(qids, found.rows, row_of, read_qrels(qrels_path), ks, str(qrels_path), metrics)
        tasks[Path(task_dir).name] = {**scores, "reported": reported_metric(info), "num_queries": len(qids)}
    return {"tasks": tasks, "average": summarise(tasks, ks)}
