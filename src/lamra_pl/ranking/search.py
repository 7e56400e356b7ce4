"""Exact top-k inner-product search: faiss (`faiss.knn`, the brute-force kernel of `IndexFlatIP`, or an
`IndexFlatIP` sharded over the GPUs when faiss-gpu sees some) or torch.

Contract, the same for both backends. The score of a candidate row c for a query q is the float64 score

    f(q, c) = fl( dot(c, qh) / |c| ),   qh = q / |q|   (float64, from the stored values),

each norm sqrt(sum_i x_i^2) taken by numpy's reduction along a contiguous float64 row (`row_norms`; a zero row
scores 0) and dot(c, qh) by numpy's `vecdot` of the two contiguous float64 rows (`_exact_scores`: one BLAS ddot
per pair, whatever its summation order and fused multiply-adds, the same for every pair in a process), so equal
vectors get bit-equal scores wherever and in whatever batch they are scored. The result is the first k rows of
the whole pool sorted by (f descending, tie key ascending), where the tie key is the rank of the candidate's id
(`lamra_pl.formats.index.id_ranks`): a full float64 ranking with id tie-breaks. It does not depend on the search
backend (faiss or torch), its BLAS, its batching or its order for equal scores; the float64 scores are those of
the process's numpy.

How it is reached without scoring every candidate in float64. The backend (faiss or torch) scores every
candidate in float32, from the float64 unit rows ch = c / |c| and qh rounded to float32, and returns each
query's `k + margin` best rows by those scores s. Then:

1. Error bound: |s - f| <= eps = gamma_{D+3} for every pair (`score_error_bound`), where D is the dimension,
   u = 2^-24 is float32's unit roundoff and gamma_n = nu/(1-nu). The terms:
   - rounding the float64 unit rows ch and qh to float32 changes each component by a relative u at most, so
     it moves their inner product by at most (2u + u^2)*sum_i |ch_i qh_i|;
   - a float32 inner product of length D, summed in any order, with or without fused multiply-adds (any BLAS,
     any blocking, split or not, CPU or GPU), is within gamma_D*sum_i |x_i y_i| of the exact one (Higham,
     Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1);
   - f, in float64, is within gamma'_{2D+8}*|qh| of the exact ch . qh (gamma' with 2^-53 for u: its own sum,
     in any order and with or without fused multiply-adds, the norm and the division, and ch's rounding);
   - sum_i |ch_i qh_i| <= |ch| |qh| (Cauchy-Schwarz), and the float64 unit rows have norms within
     (D+4)*2^-53 of 1.
   Their sum, with float32 underflow (values or products below 2^-126, even flushed to zero) on top, stays
   below gamma_{D+3} for every D < 2^24 - 3: `tests/test_search_metrics.py` checks it in exact arithmetic. At
   D = 2048, eps ~ 1.2e-4. The argument needs IEEE float32 arithmetic: the torch backend runs its matmul with
   TF32 and bf16 reductions switched off (`_ieee_float32_matmul`), and faiss-gpu creates its cuBLAS handles
   with reduced-precision reductions disallowed.
2. Which rows can be in the top k. Let b be the k-th best float32 score. The k rows with s >= b have
   f >= b - eps, so the k-th best f is >= b - eps, and a row with s < b - 2*eps has f < b - eps: at least k
   rows beat it strictly, and it is in no top k, whatever the ties. So the top k by (f, tie) lies in
   A = {rows with s >= b - 2*eps}.
3. A is complete when the backend's last returned score is < b - 2*eps (every row not returned scores no
   more than that), or when the whole pool was returned. Otherwise the query is searched again with the
   width doubled (margin 0 always takes a second search), until it is complete.
4. Only the rows of A are scored in float64 (about k per query, plus the few within 2*eps of the k-th score:
   eps ~ 1.2e-4 at D = 2048), sorted by (f desc, tie key), and the first k returned with their f.

Candidates are float16 rows (an index's `embeddings.npy`, memory-mapped is fine); float32 or float64 rows are
exact too. They are scored block by block (`block_rows` rows normalised at a time), so memory stays bounded
for pools of millions, and each block is read from disk once for all queries. The float64 rescoring works on
cache-sized chunks of rows on `torch.get_num_threads()` threads (numpy releases the GIL); it always runs on
the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lamra_pl.errors import LamraError

Backend = Literal["auto", "faiss", "torch"]
UNIT_ROUNDOFF = 2.0**-24  # float32
RESCORE_BYTES = 2**22  # bytes of float64 values per rescoring chunk and thread: kept in cache between passes
TINY = np.finfo(np.float64).tiny


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


def score_error_bound(dim: int) -> float:
    """eps: |float32 backend score - float64 score| <= eps for unit rows of dimension `dim` (module docstring)."""
    n = (dim + 3) * UNIT_ROUNDOFF
    if n >= 1:
        raise LamraError(f"exact search needs a dimension below {int(1 / UNIT_ROUNDOFF) - 3}, got {dim}")
    return n / (1 - n)


def row_norms(x: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows of a C-contiguous float array: one reduction along each row (as numpy's
    `linalg.norm(x, axis=-1)` computes it), so a row's norm does not depend on the rows around it."""
    return np.sqrt(np.add.reduce(x * x, axis=-1))


def unit_rows(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows divided by their norms (zero rows stay zero), computed in `dtype`."""
    x = np.ascontiguousarray(x, dtype=dtype)
    return x / np.maximum(row_norms(x), np.finfo(dtype).tiny)[..., None]


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

    Exact means: equal to sorting the whole pool by (float64 score desc, tie key asc); see the module
    docstring for the score and the argument.

    Args:
        candidates: [N, D] candidate embeddings.
        queries: [Q, D] query embeddings.
        k: results per query.
        tie_key: [N] int64 order among equal scores (an index's id ranks); default: row number.
        subset: sorted row numbers the search is restricted to (a local pool inside a global index).
        backend: "faiss", "torch" or "auto" (faiss when installed).
        margin: extra rows a backend returns beyond k; a query whose float32 scores leave the top k
            undecided within them is searched again with twice the width.
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
    if margin < 0:
        raise LamraError(f"margin must be >= 0, got {margin}")
    rows = np.arange(candidates.shape[0]) if subset is None else np.asarray(subset, dtype=np.int64)
    tie = np.arange(candidates.shape[0]) if tie_key is None else np.asarray(tie_key)
    n = rows.size
    if n == 0:
        raise LamraError("the candidate pool to search is empty")
    q64, q32 = np.empty(queries.shape), np.empty(queries.shape, dtype=np.float32)
    if (bad := _first_non_finite(_normalise(queries, q64, q32))) is not None:
        raise LamraError(f"query {bad} has a NaN, infinite or overflowing value: it cannot be searched")
    slack = 2 * score_error_bound(candidates.shape[1])
    engine = _Backend(resolve_backend(backend), device)
    norms = np.zeros(candidates.shape[0])  # float64 norm of each candidate row searched, filled by the backend
    out_rows = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf)
    todo = np.arange(len(queries))
    width = min(k + margin, n)
    while todo.size:
        found = engine.topk(
            candidates, rows, q32 if todo.size == len(q32) else q32[todo], width, block_rows, query_batch, norms
        )
        done = _complete(found.scores, k, width, n, slack)
        if done.all():  # (no copies of the queries or of what was found)
            top = _rescore(candidates, q64, todo, found.rows, found.scores, norms, tie, k, slack)
            out_rows[todo], out_scores[todo] = top.rows, top.scores
        elif done.any():
            top = _rescore(candidates, q64, todo[done], found.rows[done], found.scores[done], norms, tie, k, slack)
            out_rows[todo[done]], out_scores[todo[done]] = top.rows, top.scores
        todo = todo[~done]
        width = min(2 * width, n)
    return TopK(out_rows, out_scores)


@dataclass
class _Found:
    rows: np.ndarray  # [Q, w] candidate rows, -1 = none
    scores: np.ndarray  # [Q, w] float32, descending, -inf where rows is -1


def _complete(scores: np.ndarray, k: int, width: int, n: int, slack: float) -> np.ndarray:
    """Per query: do the returned rows hold every row within `slack` of the k-th float32 score?"""
    if width >= n:
        return np.ones(len(scores), dtype=bool)
    return scores[:, width - 1] < scores[:, k - 1] - slack


def leave_out(found: TopK, qids: list[str], excluded: dict[str, np.ndarray], k: int) -> TopK:
    """The top k of each query's ranking without its excluded rows (qid -> rows; a task's excluded.jsonl, VIST's
    seen images): `found` holds k plus the most any query excludes, so k remain wherever the pool has them; padded
    with -1 / -inf."""
    if not excluded:
        return TopK(found.rows[:, :k], found.scores[:, :k])
    rows = np.full((len(qids), k), -1, dtype=np.int64)
    scores = np.full((len(qids), k), -np.inf)
    for q, qid in enumerate(qids):
        keep = found.rows[q] >= 0
        if qid in excluded:
            keep &= ~np.isin(found.rows[q], excluded[qid])
        kept = np.flatnonzero(keep)[:k]
        rows[q, : len(kept)], scores[q, : len(kept)] = found.rows[q, kept], found.scores[q, kept]
    return TopK(rows, scores)


def _rescore(
    candidates: np.ndarray,
    q64: np.ndarray,
    which: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
    norms: np.ndarray,
    tie: np.ndarray,
    k: int,
    slack: float,
) -> TopK:
    """The top k of complete queries (`q64[which]`): their rows within `slack` of the k-th float32 score, sorted
    exactly."""
    kth = scores[:, min(k, scores.shape[1]) - 1]
    needed = (scores >= (kth - slack)[:, None]) & (rows >= 0)  # a prefix of each row: scores are sorted
    width = int(needed.sum(axis=1).max())
    rows = np.where(needed[:, :width], rows[:, :width], -1)
    exact = _exact_scores(candidates, q64, which, rows, norms)
    ties = np.where(rows >= 0, tie[np.maximum(rows, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((ties, -exact), axis=-1)[:, :k]
    out_rows = np.take_along_axis(rows, order, -1)
    out_scores = np.take_along_axis(exact, order, -1)
    if out_rows.shape[1] < k:  # a pool smaller than k
        pad = k - out_rows.shape[1]
        out_rows = np.pad(out_rows, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return TopK(out_rows.astype(np.int64), out_scores)


def _exact_scores(
    candidates: np.ndarray, q64: np.ndarray, which: np.ndarray, rows: np.ndarray, norms: np.ndarray
) -> np.ndarray:
    """f(q, c) for each query `q64[which[i]]` and its rows `rows[i]` ([Q, m], valid rows first, -1 = none: -inf),
    chunk by chunk on threads.

    Per chunk of queries with about as many rows each (sorted by that count, so little is padding): gather the
    stored rows, convert them to float64 (`widen`), take each row's dot product with the unit query (`vecdot`)
    and divide it by the row's norm: one pass at a time over a buffer that stays in cache, and the same
    operations, in the same order, for every (query, row) pair.
    """
    num_queries, dim = len(rows), candidates.shape[1]
    out = np.full(rows.shape, -np.inf)
    counts = (rows >= 0).sum(axis=1)
    order = np.argsort(counts, kind="stable")
    chunks: list[tuple[np.ndarray, int]] = []  # (queries, rows scored per query)
    start = 0
    while start < num_queries:
        stop = start + max(1, RESCORE_BYTES // (8 * dim * max(1, int(counts[order[start]]))))
        stop = min(stop, num_queries)
        width = int(counts[order[stop - 1]])  # the largest count of the chunk: counts are sorted
        stop = min(stop, start + max(1, RESCORE_BYTES // (8 * dim * max(1, width))))
        chunks.append((order[start:stop], int(counts[order[stop - 1]])))
        start = stop
    size = max(len(queries) * width for queries, width in chunks)

    def run(part: list[tuple[np.ndarray, int]]) -> None:
        stored = np.empty((size, dim), dtype=candidates.dtype)
        buffer = np.empty((size, dim))
        for queries, width in part:
            if width == 0:
                continue
            block = rows[queries, :width]
            valid = block >= 0
            idx = np.where(valid, block, block[:, :1]).ravel()  # padding repeats a row of its query
            np.take(candidates, idx, axis=0, out=stored[: idx.size])
            x = buffer[: idx.size]
            widen(x, stored[: idx.size])
            x3 = x.reshape(len(queries), width, dim)
            # One ddot per (query, row) pair, then one division per pair: ch itself is not needed.
            dots = np.vecdot(x3, q64[which[queries]][:, None, :])
            dots /= np.maximum(norms[idx], TINY).reshape(dots.shape)
            out[queries, :width] = np.where(valid, dots, -np.inf)

    _on_threads(run, chunks, single_torch_thread=True)
    return out


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Float32 matmuls with float32 products and sums (no TF32 or bf16 reduction), as the error bound needs;
    the process's own settings come back afterwards."""
    settings = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [s.fp32_precision for s in settings]
    try:
        for s in settings:
            s.fp32_precision = "ieee"
        yield
    finally:
        for s, value in zip(settings, saved, strict=True):
            s.fp32_precision = value


class _Backend:
    def __init__(self, name: Literal["faiss", "torch"], device: str | None) -> None:
        self.name = name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.kept: tuple[np.ndarray, np.ndarray] | None = None  # a one-block pool's unit rows, for the next round

    def topk(
        self,
        candidates: np.ndarray,
        rows: np.ndarray,
        q32: np.ndarray,
        width: int,
        block_rows: int,
        query_batch: int,
        norms: np.ndarray,
    ) -> _Found:
        """Each query's `width` best rows by float32 score; records each row's float64 norm in `norms`."""
        best_scores = np.full((len(q32), 0), -np.inf, dtype=np.float32)
        best_rows = np.full((len(q32), 0), -1, dtype=np.int64)
        for start in range(0, rows.size, block_rows):
            block_ids = rows[start : start + block_rows]
            if self.kept is not None and rows.size <= block_rows:
                block, norms[block_ids] = self.kept
            else:
                block = np.empty((len(block_ids), candidates.shape[1]), dtype=np.float32)
                norms[block_ids] = block_norms = _normalise(_take(candidates, block_ids), block)
                if (bad := _first_non_finite(block_norms)) is not None:
                    raise LamraError(
                        f"candidate row {block_ids[bad]} has a NaN, infinite or overflowing value: "
                        "the pool cannot be searched"
                    )
                if rows.size <= block_rows:  # a query searched again need not normalise the pool again
                    self.kept = block, block_norms
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
        if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
            # IndexFlatIP.search's own kernel, without copying the block into an index first
            return faiss.knn(q32, block, w, metric=faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # split the candidates over the GPUs (as UniIR does), not the queries
        return faiss.index_cpu_to_all_gpus(index, options).search(q32, w)

    def _torch(self, block: np.ndarray, q32: np.ndarray, w: int, query_batch: int) -> tuple[np.ndarray, np.ndarray]:
        cand = torch.from_numpy(block).to(self.device)
        out_scores, out_rows = [], []
        with _ieee_float32_matmul():
            for start in range(0, len(q32), query_batch):
                q = torch.from_numpy(q32[start : start + query_batch]).to(self.device)
                top = (q @ cand.T).topk(w, dim=-1)
                out_scores.append(top.values.cpu().numpy())
                out_rows.append(top.indices.cpu().numpy())
        return np.concatenate(out_scores), np.concatenate(out_rows).astype(np.int64)


def _normalise(x: np.ndarray, *outs: np.ndarray) -> np.ndarray:
    """Each of `outs` = `unit_rows(x, float64)` rounded once to its dtype; returns the float64 row norms. In
    cache-sized chunks that reuse two buffers per thread (a whole float64 copy would cost more in page faults
    than in maths)."""
    dim = x.shape[1]
    norms = np.empty(len(x))
    step = max(1, RESCORE_BYTES // (8 * max(dim, 1)))

    def run(starts: list[int]) -> None:
        rows, squares = np.empty((min(step, len(x)), dim)), np.empty((min(step, len(x)), dim))
        stage = np.empty(
            (min(step, len(x)), dim), dtype=x.dtype
        )  # a writable copy for torch (x may be a read-only map)
        with np.errstate(over="ignore", invalid="ignore"):  # a non-finite norm is the caller's error
            for start in starts:
                size = min(step, len(x) - start)
                part, square = rows[:size], squares[:size]
                np.copyto(stage[:size], x[start : start + size])
                widen(part, stage[:size])
                np.multiply(part, part, out=square)
                norms[start : start + size] = norm = np.sqrt(np.add.reduce(square, axis=-1))  # = row_norms(part)
                np.divide(part, np.maximum(norm, TINY)[:, None], out=part)
                for out in outs:
                    out[start : start + size] = part

    _on_threads(run, list(range(0, len(x), step)), single_torch_thread=True)
    return norms


def widen(out: np.ndarray, x: np.ndarray) -> None:
    """out[...] = x (writable, C-contiguous) in float64: exact, float16 and float32 values being float64 values, so
    whoever converts gives the same bits. torch's cast runs in SIMD (F16C), numpy's float16 one does not: 2.5x faster
    on the benchmark machine (experiments/benchmarks/RESULTS.md, section b2). Other dtypes (another byte order, an
    index folder's unusual dtype) take numpy's cast, which torch would refuse."""
    if x.dtype.isnative and x.dtype in (np.float16, np.float32, np.float64):
        torch.from_numpy(out).copy_(torch.from_numpy(x))
    else:
        np.copyto(out, x)


def _on_threads(run: Callable[[list[Any]], None], items: list[Any], single_torch_thread: bool = False) -> None:
    """run(part) for `torch.get_num_threads()` interleaved parts of `items`, on as many threads: the numpy (and
    torch) work inside releases the GIL. `single_torch_thread`: torch's own intra-op threads are set to one while
    they run (its casts inside `run` would otherwise start a team of threads per worker, one more than the cores)."""
    workers = max(1, min(torch.get_num_threads(), len(items)))
    if workers == 1:
        run(items)
        return
    saved = torch.get_num_threads()
    try:
        if single_torch_thread:
            torch.set_num_threads(1)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, [items[i::workers] for i in range(workers)]))
    finally:
        if single_torch_thread:
            torch.set_num_threads(saved)


def _first_non_finite(norms: np.ndarray) -> int | None:
    """The first row whose norm is NaN or infinite (a NaN or infinite value in the row), if any."""
    bad = np.flatnonzero(~np.isfinite(norms))
    return int(bad[0]) if bad.size else None


def _take(candidates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """candidates[rows], read as one slice when the rows are contiguous (the common, unrestricted case)."""
    if rows[-1] - rows[0] + 1 == rows.size:
        return candidates[rows[0] : rows[-1] + 1]
    return candidates[rows]


def _merge(
    scores_a: np.ndarray, rows_a: np.ndarray, scores_b: np.ndarray, rows_b: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best `width` of two lists sorted by descending score (a backend's lists are), -inf where no row."""
    if rows_a.shape[1] == 0:  # the first block: already sorted
        return np.where(rows_b >= 0, scores_b, -np.inf).astype(np.float32, copy=False), rows_b
    scores = np.concatenate([scores_a, scores_b], axis=1)
    rows = np.concatenate([rows_a, rows_b], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
