"""Exact search (faiss == torch, ties broken by id), M-BEIR hit-rate Recall@K, run and qrels files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lamra_pl.errors import LamraError
from lamra_pl.formats.index import id_ranks
from lamra_pl.formats.runs import read_run_file, write_run
from lamra_pl.formats.task import read_qrels
from lamra_pl.ranking.metrics import chance, pad_positives, recall_at_k
from lamra_pl.ranking.search import TOLERANCE, search, unit_rows


def reference_top_k(candidates: np.ndarray, queries: np.ndarray, k: int, ids: list[str]) -> list[list[int]]:
    """Brute force in float64: sort every candidate by (score desc, id asc)."""
    c, q = unit_rows(candidates, np.float64), unit_rows(queries, np.float64)
    out = []
    for row in q:
        scores = [float((c[j] * row).sum()) for j in range(len(c))]
        out.append(sorted(range(len(c)), key=lambda j: (-scores[j], ids[j]))[:k])
    return out


@pytest.fixture
def pool_with_ties() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 32)).astype(np.float16)
    # Exact duplicates: 40 rows that equal row 0 and 20 that equal row 1, under ids that sort in another order
    # than their rows, so a backend's own order among equal scores would show.
    candidates = np.concatenate([base, np.repeat(base[:1], 40, 0), np.repeat(base[1:2], 20, 0)])
    ids = [f"d{(7919 * i) % len(candidates):05d}" for i in range(len(candidates))]
    queries = np.concatenate([base[:2], rng.standard_normal((30, 32)).astype(np.float16)])
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


def test_ties_wider_than_the_margin_are_resolved(pool_with_ties):
    candidates, queries, ids = pool_with_ties
    top = search(candidates, queries[:1], 30, tie_key=id_ranks(ids), backend="torch", margin=2)
    assert top.rows.tolist() == reference_top_k(candidates, queries[:1], 30, ids)


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


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(LamraError, match="dimensions differ"):
        search(np.zeros((4, 8), np.float16), np.zeros((1, 16), np.float32), 2)


def test_tolerance_is_small_against_score_gaps():
    assert TOLERANCE < 1e-4


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
