"""Exact top-k inner-product search: faiss `IndexFlatIP` (sharded over GPUs when faiss-gpu sees some) or torch.

Contract, the same for both backends: candidates are float16 rows (an index's `embeddings.npy`, memory-mapped
is fine) and are re-normalised in float32, as are the queries. A backend returns each query's `k + margin` best
rows by its float32 scores. Those rows are then rescored in float64 from the stored values, by one fixed
elementwise reduction, and sorted by (score descending, tie key ascending), where the tie key is the rank of the
candidate's id (`lamra_pl.formats.index.id_ranks`). So the ranking does not depend on the backend's BLAS or its
order for equal scores. If a query's last returned float32 score is within `TOLERANCE` of its k-th, a candidate
beyond the margin could belong in the top k: that query is searched again with the margin doubled, until it is
resolved or the whole pool is returned.

Candidates are scored block by block (`block_rows` rows converted to float32 at a time), so memory stays bounded
for pools of millions, and each block is read from disk once for all queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lamra_pl.errors import LamraError

Backend = Literal["auto", "faiss", "torch"]
RESCORE_BYTES = 2**27  # memory for the float64 rows of one rescoring pass
TOLERANCE = 1e-5  # far above float32's error on a dot product of unit vectors, far below real score gaps


@dataclass
class TopK:
    """Per query, the best rows (int64, -1 where the pool has fewer than k rows) and their float64 scores."""

    rows: np.ndarray
    scores: np.ndarray


def faiss_module():
    """faiss if installed (faiss-cpu or faiss-gpu, both install `faiss`), else None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def resolve_backend(backend: Backend) -> Literal["faiss", "torch"]:
    if backend == "torch":
        return "torch"
    if faiss_module() is None:
        if backend == "faiss":
            raise LamraError("backend 'faiss' was asked for but faiss is not installed (pip install faiss-cpu)")
        return "torch"
    return "faiss"


def unit_rows(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.finfo(dtype).tiny)


def search(
    candidates: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    tie_key: np.ndarray | None = None,
    subset: np.ndarray | None = None,
    backend: Backend = "auto",
    margin: int = 16,
    block_rows: int = 131072,
    query_batch: int = 1024,
    device: str | None = None,
) -> TopK:
    """The exact top `k` rows of `candidates` (or of its rows `subset`) for each query, by inner product.

    Args:
        candidates: [N, D] candidate embeddings.
        queries: [Q, D] query embeddings.
        k: results per query.
        tie_key: [N] int64 order among equal scores (an index's id ranks); default: row number.
        subset: sorted row numbers the search is restricted to (a local pool inside a global index).
        backend: "faiss", "torch" or "auto" (faiss when installed).
        margin: extra rows a backend returns beyond k before the exact rescoring.
        block_rows: candidate rows scored at a time.
        query_batch: queries scored at a time by the torch backend.
        device: torch device for the torch backend (default: cuda if available).
    """
    if candidates.ndim != 2 or queries.ndim != 2 or candidates.shape[1] != queries.shape[1]:
        raise LamraError(
            f"queries of shape {tuple(queries.shape)} cannot be searched in candidates of shape "
            f"{tuple(candidates.shape)}: the dimensions differ"
        )
    if k < 1:
        raise LamraError(f"k must be >= 1, got {k}")
    rows = np.arange(candidates.shape[0]) if subset is None else np.asarray(subset, dtype=np.int64)
    tie = np.arange(candidates.shape[0]) if tie_key is None else np.asarray(tie_key)
    n = rows.size
    if n == 0:
        raise LamraError("the candidate pool to search is empty")
    q32 = unit_rows(queries)
    engine = _Backend(resolve_backend(backend), device)
    width = min(k + margin, n)
    found = engine.topk(candidates, rows, q32, width, block_rows, query_batch)
    result = _rescore(candidates, queries, found, tie, k)
    # Queries whose k-th and last returned scores are within tolerance: widen until resolved.
    open_rows = _unresolved(found, k, width, n)
    while open_rows.size:
        width = min(2 * width, n)
        again = engine.topk(candidates, rows, q32[open_rows], width, block_rows, query_batch)
        fixed = _rescore(candidates, queries[open_rows], again, tie, k)
        result.rows[open_rows], result.scores[open_rows] = fixed.rows, fixed.scores
        open_rows = open_rows[_unresolved(again, k, width, n)]
    return result


@dataclass
class _Found:
    rows: np.ndarray  # [Q, w] candidate rows, -1 = none
    scores: np.ndarray  # [Q, w] float32, descending


def _unresolved(found: _Found, k: int, width: int, n: int) -> np.ndarray:
    if width >= n or k >= width:
        return np.empty(0, dtype=np.int64)
    kth, last = found.scores[:, k - 1], found.scores[:, width - 1]
    return np.flatnonzero(last >= kth - TOLERANCE)


def _rescore(candidates: np.ndarray, queries: np.ndarray, found: _Found, tie: np.ndarray, k: int) -> TopK:
    q64 = unit_rows(queries, np.float64)
    width = found.rows.shape[1]
    scores = np.full((len(q64), width), -np.inf)
    valid = found.rows >= 0
    step = max(1, RESCORE_BYTES // (max(width, 1) * q64.shape[1] * 8))  # float64 candidate rows per pass
    for start in range(0, len(q64), step):
        part = slice(start, start + step)
        rows = found.rows[part]
        c64 = unit_rows(candidates[np.where(rows >= 0, rows, 0).ravel()], np.float64).reshape(*rows.shape, -1)
        # One elementwise product and sum per (query, candidate): equal vectors get bit-equal scores.
        scores[part] = np.where(valid[part], (c64 * q64[part, None, :]).sum(-1), -np.inf)
    ties = np.where(valid, tie[np.where(valid, found.rows, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((ties, -scores), axis=-1)[:, :k]
    out_rows = np.take_along_axis(found.rows, order, -1)
    out_scores = np.take_along_axis(scores, order, -1)
    if out_rows.shape[1] < k:  # a pool smaller than k
        pad = k - out_rows.shape[1]
        out_rows = np.pad(out_rows, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return TopK(out_rows.astype(np.int64), out_scores)


class _Backend:
    def __init__(self, name: Literal["faiss", "torch"], device: str | None) -> None:
        self.name = name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def topk(
        self, candidates: np.ndarray, rows: np.ndarray, q32: np.ndarray, width: int, block_rows: int, query_batch: int
    ) -> _Found:
        best_scores = np.full((len(q32), 0), -np.inf, dtype=np.float32)
        best_rows = np.full((len(q32), 0), -1, dtype=np.int64)
        for start in range(0, rows.size, block_rows):
            block_ids = rows[start : start + block_rows]
            block = unit_rows(_take(candidates, block_ids))
            w = min(width, len(block_ids))
            if self.name == "faiss":
                scores, local = self._faiss(block, q32, w)
            else:
                scores, local = self._torch(block, q32, w, query_batch)
            best_scores, best_rows = _merge(
                best_scores, best_rows, scores, np.where(local >= 0, block_ids[local], -1), width
            )
        return _Found(best_rows, best_scores)

    @staticmethod
    def _faiss(block: np.ndarray, q32: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = faiss_module()
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True  # split the candidates over the GPUs (as UniIR does), not the queries
            index = faiss.index_cpu_to_all_gpus(index, options)
        scores, local = index.search(q32, w)
        return scores, local

    def _torch(self, block: np.ndarray, q32: np.ndarray, w: int, query_batch: int) -> tuple[np.ndarray, np.ndarray]:
        cand = torch.from_numpy(block).to(self.device)
        out_scores, out_rows = [], []
        for start in range(0, len(q32), query_batch):
            q = torch.from_numpy(q32[start : start + query_batch]).to(self.device)
            top = (q @ cand.T).topk(w, dim=-1)
            out_scores.append(top.values.cpu().numpy())
            out_rows.append(top.indices.cpu().numpy())
        return np.concatenate(out_scores), np.concatenate(out_rows).astype(np.int64)


def _take(candidates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """candidates[rows], read as one slice when the rows are contiguous (the common, unrestricted case)."""
    if rows[-1] - rows[0] + 1 == rows.size:
        return candidates[rows[0] : rows[-1] + 1]
    return candidates[rows]


def _merge(
    scores_a: np.ndarray, rows_a: np.ndarray, scores_b: np.ndarray, rows_b: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([scores_a, scores_b], axis=1)
    rows = np.concatenate([rows_a, rows_b], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
