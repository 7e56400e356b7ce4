"""Exact search (faiss == torch == a float64 brute force, ties broken by id), M-BEIR hit-rate Recall@K, run and
qrels files."""

from __future__ import annotations

import math
from fractions import Fraction

import faiss
import numpy as np
import pytest
import torch

from lamra_pl.errors import LamraError
from lamra_pl.formats.index import id_ranks
from lamra_pl.formats.runs import read_run_file, write_run
from lamra_pl.formats.task import read_qrels
from lamra_pl.ranking.metrics import chance, pad_positives, recall_at_k
from lamra_pl.ranking.search import score_error_bound, search, unit_rows

BACKENDS = ["faiss", "torch"]


def exact_score(c: np.ndarray, q: np.ndarray) -> float:
    """The contract's float64 score of one pair, on its own: (c . q/|q|) / |c|, 1-D rows, the norms by numpy's
    reduction and the dot product by numpy's vecdot."""
    c, q = np.asarray(c, np.float64), np.asarray(q, np.float64)
    tiny = np.finfo(np.float64).tiny
    q = q / max(float(np.sqrt(np.add.reduce(q * q))), tiny)
    return float(np.vecdot(c, q)) / max(float(np.sqrt(np.add.reduce(c * c))), tiny)


def brute_force(
    candidates: np.ndarray, queries: np.ndarray, k: int, ids: list[str]
) -> tuple[list[list[int]], list[list[float]]]:
    """Every candidate scored in float64, the whole pool sorted by (score desc, id asc): rows and scores."""
    rows, scores = [], []
    for q in queries:
        s = [exact_score(c, q) for c in candidates]
        ranked = sorted(range(len(candidates)), key=lambda j: (-s[j], ids[j]))[:k]
        rows.append(ranked)
        scores.append([s[j] for j in ranked])
    return rows, scores


def reference_top_k(candidates: np.ndarray, queries: np.ndarray, k: int, ids: list[str]) -> list[list[int]]:
    return brute_force(candidates, queries, k, ids)[0]


def scrambled_ids(n: int) -> list[str]:
    """Ids whose order differs from the row order, so a backend's own order among equal scores would show."""
    return [f"d{(7919 * i) % n:05d}" for i in range(n)]


def assert_exact(candidates, queries, k, ids, **kwargs) -> None:
    """search() with each backend returns the brute force's rows and, bit for bit, its scores."""
    rows, scores = brute_force(candidates, queries, k, ids)
    width = min(k, len(candidates))
    for backend in BACKENDS:
        top = search(candidates, queries, k, tie_key=id_ranks(ids), backend=backend, **kwargs)
        assert top.rows[:, :width].tolist() == rows, backend
        assert top.scores[:, :width].tolist() == scores, backend
        assert (top.rows[:, width:] == -1).all() and (top.scores[:, width:] == -np.inf).all()


@pytest.fixture
def pool_with_ties() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 32)).astype(np.float16)
    # Exact duplicates: 40 rows that equal row 0 and 20 that equal row 1, under ids that sort in another order
    # than their rows, so a backend's own order among equal scores would show.
    candidates = np.concatenate([base, np.repeat(base[:1], 40, 0), np.repeat(base[1:2], 20, 0)])
    ids = scrambled_ids(len(candidates))
    queries = np.concatenate([base[:2], rng.standard_normal((30, 32)).astype(np.float16)])
    return candidates, queries, ids


@pytest.fixture
def near_ties() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores closer than float32 can tell apart, at the top of the ranking and around the k-th.

    Variants of one row that differ only in a component that is 0 in the row: m*2^-24 (float16 subnormals),
    m = -30..30, each twice (exact duplicates). The query weighs that component 0.3, so their float64 scores
    step by ~2e-8 (float32 rounds scores near 0.9 to ~6e-8) and their norms do not move in float64.
    Then 200 random rows, and copies of a random row at ~the score of those variants.
    """
    rng = np.random.default_rng(1)
    dim = 64
    base = rng.standard_normal(dim).astype(np.float16)
    base[0] = 0
    steps = np.arange(-30, 31)
    variants = np.repeat(base[None], 2 * len(steps), 0)
    variants[:, 0] = np.repeat(steps, 2).astype(np.float64) * 2.0**-24
    assert len(np.unique(variants[:, 0])) == len(steps)  # exactly representable subnormals
    query = base.astype(np.float32)
    query[0] = 0.3 * np.linalg.norm(query)
    others = rng.standard_normal((200, dim)).astype(np.float16)
    candidates = np.concatenate([variants, others, np.repeat(others[:1], 5, 0)])
    ids = scrambled_ids(len(candidates))
    queries = np.stack([query, -query, others[0].astype(np.float32), np.zeros(dim, np.float32)])
    return candidates, queries, ids


@pytest.mark.parametrize("k", [1, 10, 50])
def test_faiss_and_torch_give_the_exact_top_k_with_ties_broken_by_id(pool_with_ties, k):
    candidates, queries, ids = pool_with_ties
    expected = reference_top_k(candidates, queries, k, ids)
    tie = id_ranks(ids)
    faiss_top = search(candidates, queries, k, tie_key=tie, backend="faiss", block_rows=97)
    torch_top = search(candidates, queries, k, tie_key=tie, backend="torch", block_rows=97, query_batch=7)
    assert faiss_top.rows.tolist() == expected
    assert torch_top.rows.tolist() == expected
    np.testing.assert_array_equal(faiss_top.scores, torch_top.scores)
    # Query 0 equals 41 candidates: its top k are those with the smallest ids, whatever the margin.
    assert len({float(s) for s in faiss_top.scores[0, : min(k, 41)]}) == 1


@pytest.mark.parametrize("k", [1, 2, 30, 61, 122, 130])
@pytest.mark.parametrize("margin", [0, 1, 16, 1000])
def test_near_ties_below_float32_resolution_are_ranked_as_float64_does(near_ties, k, margin):
    candidates, queries, ids = near_ties
    scores = brute_force(candidates, queries[:1], 122, ids)[1][0]
    assert len(set(scores)) == 61 and max(scores) - min(scores) < 2e-6  # 61 distinct float64 scores, ...
    assert len({np.float32(s) for s in scores}) < 61  # ... that float32 cannot all tell apart
    assert_exact(candidates, queries, k, ids, margin=margin, block_rows=50)


@pytest.mark.parametrize("k", [1, 7, 8, 9, 20])
def test_pools_no_larger_than_k_or_the_margin(pool_with_ties, k):
    candidates, queries, ids = pool_with_ties
    # 8 rows, 3 of them equal: k below, at and above the pool size, margins past the pool.
    small = np.concatenate([candidates[:5], np.repeat(candidates[:1], 3, 0)])
    small_ids = ids[:8]
    for margin in (0, 3, 100):
        assert_exact(small, queries[:6], k, small_ids, margin=margin)
    assert_exact(small[:1], queries[:3], k, small_ids[:1])


def test_ties_wider_than_the_margin_are_resolved(pool_with_ties):
    candidates, queries, ids = pool_with_ties
    top = search(candidates, queries[:1], 30, tie_key=id_ranks(ids), backend="torch", margin=2)
    assert top.rows.tolist() == reference_top_k(candidates, queries[:1], 30, ids)
    assert_exact(candidates, queries[:2], 50, ids, margin=0, block_rows=64)


def test_a_zero_query_ties_every_candidate(near_ties):
    candidates, queries, ids = near_ties
    for backend in BACKENDS:
        top = search(candidates, queries[3:], 12, tie_key=id_ranks(ids), backend=backend, margin=4)
        assert top.rows[0].tolist() == sorted(range(len(ids)), key=ids.__getitem__)[:12]
        assert (top.scores == 0).all()


def test_realistic_shapes_agree_with_the_brute_force():
    """2048-d unit float16 rows, clustered queries (many scores near the k-th), several blocks."""
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((4, 2048))
    candidates = unit_rows(centres[rng.integers(0, 4, 600)] + 0.6 * rng.standard_normal((600, 2048))).astype(np.float16)
    queries = (centres[rng.integers(0, 4, 24)] + 0.8 * rng.standard_normal((24, 2048))).astype(np.float32)
    ids = scrambled_ids(len(candidates))
    c = candidates.astype(np.float64)
    norms = np.sqrt(np.add.reduce(c * c, axis=-1))
    rows, scores = [], []
    for q in unit_rows(queries, np.float64):
        s = np.vecdot(c, q) / norms
        ranked = sorted(range(len(c)), key=lambda j: (-s[j], ids[j]))[:25]
        rows.append(ranked)
        scores.append(s[ranked].tolist())
    for backend in BACKENDS:
        top = search(candidates, queries, 25, tie_key=id_ranks(ids), backend=backend, block_rows=256)
        assert top.rows.tolist() == rows and top.scores.tolist() == scores


def test_subset_restricts_the_search_and_small_pools_pad(pool_with_ties):
    candidates, queries, ids = pool_with_ties
    subset = np.arange(5, 305, 3)
    top = search(candidates, queries, 10, tie_key=id_ranks(ids), subset=subset)
    allowed = set(subset.tolist())
    assert all(r in allowed for r in top.rows.ravel())
    sub_ids = [ids[j] for j in subset]
    expected = reference_top_k(candidates[subset], queries, 10, sub_ids)
    assert top.rows.tolist() == [[int(subset[j]) for j in row] for row in expected]
    small = search(candidates[:3], queries[:2], 5)
    assert (small.rows[:, 3:] == -1).all() and sorted(small.rows[0, :3]) == [0, 1, 2]


def test_dimension_mismatch_and_non_finite_values_are_clear_errors():
    with pytest.raises(LamraError, match="dimensions differ"):
        search(np.zeros((4, 8), np.float16), np.zeros((1, 16), np.float32), 2)
    pool = np.ones((4, 8), np.float16)
    with pytest.raises(LamraError, match="query 1 has a NaN"):
        search(pool, np.array([[1.0] * 8, [np.nan] * 8]), 2)
    pool[2, 3] = np.inf
    with pytest.raises(LamraError, match="candidate row 2 has a NaN, infinite or overflowing value"):
        search(pool, np.ones((1, 8)), 2)


def test_the_float32_error_bound_holds_for_aligned_and_random_pairs():
    """|faiss's float32 score - the float64 score| <= eps, including q = c, where sum |c_i q_i| is largest."""
    rng = np.random.default_rng(3)
    for dim in (32, 2048):
        candidates = rng.standard_normal((300, dim)).astype(np.float16)
        candidates[:, : dim // 2] *= 100  # uneven magnitudes
        queries = np.concatenate([candidates[:50].astype(np.float64), rng.standard_normal((50, dim))])
        c64, q64 = unit_rows(candidates, np.float64), unit_rows(queries, np.float64)
        index = faiss.IndexFlatIP(dim)
        index.add(c64.astype(np.float32))
        s32, rows = index.search(q64.astype(np.float32), 300)
        f = np.take_along_axis(q64 @ c64.T, rows, 1)
        assert np.abs(s32 - f).max() <= score_error_bound(dim)
    assert score_error_bound(2048) == pytest.approx(2051 * 2.0**-24, rel=1e-3)  # ~1.2e-4


def test_the_error_bound_covers_every_term_of_the_argument():
    """The sum of the terms in the module docstring's argument, in exact arithmetic, is below eps for any dim."""
    u, u64 = Fraction(1, 2**24), Fraction(1, 2**53)

    def gamma(n: int, unit: Fraction) -> Fraction:
        return n * unit / (1 - n * unit)

    for dim in (1, 2, 32, 768, 2048, 4096, 2**20, 2**23, 2**24 - 4):
        rounding = 2 * u + u * u  # float64 unit rows rounded to float32
        blas = gamma(dim, u) * (1 + u) ** 2  # a float32 inner product in any order
        float64_terms = gamma(2 * dim + 8, u64) * (1 + u) ** 2  # f against the exact inner product of ch and qh
        norms = (1 + (dim + 4) * u64) ** 2  # the float64 unit rows' norms, <= 1 + (dim + 4) u64 each
        underflow = 4 * dim * Fraction(1, 2**126)  # float32 values and products below 2^-126, even flushed
        assert (rounding + blas + float64_terms) * norms + underflow <= Fraction(score_error_bound(dim)), dim
    with pytest.raises(LamraError, match="dimension below"):
        score_error_bound(2**24)


def test_the_torch_backend_searches_in_ieee_float32_whatever_the_process_allows(near_ties):
    candidates, queries, ids = near_ties
    settings = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [s.fp32_precision for s in settings]
    try:
        for s in settings:
            s.fp32_precision = "tf32" if s is torch.backends.cuda.matmul else "bf16"
        rows, scores = brute_force(candidates, queries, 40, ids)
        top = search(candidates, queries, 40, tie_key=id_ranks(ids), backend="torch")
        assert top.rows.tolist() == rows and top.scores.tolist() == scores
        assert [s.fp32_precision for s in settings] == ["tf32", "bf16"]  # the process's settings came back
    finally:
        for s, value in zip(settings, saved, strict=True):
            s.fp32_precision = value


def test_recall_is_a_hit_rate_with_several_positives():
    # Candidates are numbers; rankings best first; -1 = fewer results than K.
    ranked = np.array(
        [
            [4, 2, 9, 7, 1],  # positives {9, 1}: first hit at rank 3
            [3, 8, 5, 6, 0],  # positives {3, 0, 5}: hit at rank 1 (recall would be 1/3 at K=1; hit rate is 1)
            [1, 2, 3, -1, -1],  # positive {7} never retrieved
            [6, 5, 4, 3, 2],  # positives {2, 11}: 11 not in the pool, 2 at rank 5
        ]
    )
    positives = pad_positives([[9, 1], [3, 0, 5], [7], [2, 11]])
    got = recall_at_k(ranked, positives, (1, 2, 3, 5))
    # By hand: R@1 = 1/4 (query 2), R@2 = 1/4, R@3 = 2/4 (+ query 1), R@5 = 3/4 (+ query 4).
    assert got == {"R@1": 0.25, "R@2": 0.25, "R@3": 0.5, "R@5": 0.75}
    with pytest.raises(ValueError, match="R@10 needs the top 10"):
        recall_at_k(ranked, positives, (10,))


def test_chance_level():
    assert chance(100, [1], (1, 10)) == pytest.approx({"R@1": 0.01, "R@10": 0.10})
    assert chance(4, [1, 0], (1, 5, 10)) == pytest.approx({"R@1": 0.125, "R@5": 0.5, "R@10": 0.5})  # K >= pool
    two = 1 - math.comb(98, 5) / math.comb(100, 5)  # two positives among 100, top 5
    assert chance(100, [2, 1], (5,))["R@5"] == pytest.approx((two + 0.05) / 2)


def test_run_file_round_trip_and_qrels(tmp_path):
    path = write_run(
        tmp_path / "t.run", ["9:1", "9:2"], [["9:4", "9:3"], ["9:3"]], np.array([[0.9, 0.5], [0.7, 0.0]]), "x"
    )
    assert path.read_text().splitlines()[0] == "9:1 Q0 9:4 1 0.900000 x"
    run = read_run_file(path)
    assert run.qids == ["9:1", "9:2"] and run.ranked == [["9:4", "9:3"], ["9:3"]]
    (tmp_path / "q.txt").write_text("9:1 0 9:4 1 0\n9:1 0 9:5 0 0\n9:2 0 9:3 1 3\n")
    assert read_qrels(tmp_path / "q.txt") == {"9:1": {"9:4"}, "9:2": {"9:3"}}
    (tmp_path / "bad.run").write_text("9:1 Q0 9:4 one 0.9 x\n")
    with pytest.raises(LamraError, match="bad.run:1: expected 'qid Q0 did rank score tag'"):
        read_run_file(tmp_path / "bad.run")
