"""The demo's exact in-memory evaluation: M-BEIR hit-rate Recall@K, chance level, and a full task folder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_recipes.mbeir import convert
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.retrieval.exact import chance, encode, evaluate, hit_rate, read_pool, read_qrels, read_queries

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


def test_hit_rate_is_any_positive_in_top_k():
    ranked = [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]]
    positives = [{"a"}, {"a", "b"}, {"z"}]  # query 2 has two positives; query 3's is not retrieved
    assert hit_rate(ranked, positives, (1, 2, 3)) == {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 2 / 3}


def test_chance_level():
    assert chance(100, [{"a"}], (1, 10)) == pytest.approx({"R@1": 0.01, "R@10": 0.10})
    two = 1 - math.comb(98, 5) / math.comb(100, 5)  # two positives among 100, top 5
    assert chance(100, [{"a", "b"}, {"c"}], (5,))["R@5"] == pytest.approx((two + 0.05) / 2)


def test_evaluate_a_converted_task_against_a_hand_ranking(tiny_backbone, tmp_path):
    convert(str(FIXTURE), str(tmp_path / "data"))
    task = tmp_path / "data" / "eval" / "test" / "emoji_task0"
    module = EmbeddingModule(str(tiny_backbone), lora=None, gradient_checkpointing=False)
    module.configure_model()
    result = evaluate(module, task, ks=(1, 2))
    pool, queries, qrels = read_pool(task / "pool"), read_queries(task / "queries"), read_qrels(task / "qrels.txt")
    assert all(q.text.startswith(("Find the emoji image", "Show me the emoji")) for q in queries)  # instruction on
    scores = encode(module, queries) @ encode(module, pool).T
    hits = {1: 0, 2: 0}
    for row, query in enumerate(queries):
        order = sorted(range(len(pool)), key=lambda j: -scores[row, j].item())
        for k in hits:
            hits[k] += any(pool[j].id in qrels[query.id] for j in order[:k])
    assert result["model"] == pytest.approx({f"R@{k}": hits[k] / len(queries) for k in hits})
    assert result["chance"]["R@1"] == pytest.approx(sum(len(qrels[q.id]) for q in queries) / len(queries) / len(pool))
    assert torch.is_tensor(scores) and scores.shape == (len(queries), len(pool))
