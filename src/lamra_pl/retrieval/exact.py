"""Exact in-memory retrieval evaluation over small pools: the demo's evaluation.

Reads an evaluation task folder written by `convert-mbeir` (queries/, pool/, qrels.txt, task.json), encodes
everything in memory, scores by inner product of unit vectors and reports M-BEIR's Recall@K, which is a hit
rate: 1 if any positive is in the top K. Queries get their task's first instruction (a fixed prompt, as
MM-Embed evaluates; UniIR samples one per query). The evaluation issue replaces this with sharded, resumable
indexing for M-BEIR-size pools.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
import webdataset as wds

from lamra_pl.data.schema import Item, decode_candidate, decode_record
from lamra_pl.data.shards import choose_example, expand_shards
from lamra_pl.models.embedding import EmbeddingModule


def _samples(folder: Path) -> wds.DataPipeline:
    return wds.DataPipeline(wds.SimpleShardList(expand_shards(str(folder))), wds.tarfile_to_samples())


def read_pool(folder: Path) -> list[Item]:
    return [decode_candidate(s) for s in _samples(folder)]


def read_queries(folder: Path) -> list[Item]:
    return [choose_example(decode_record(s), rng=None, num_negatives=0).query for s in _samples(folder)]


def read_qrels(path: Path) -> dict[str, set[str]]:
    qrels: dict[str, set[str]] = defaultdict(set)
    for line in path.read_text().splitlines():
        qid, _, did, rel, *_ = line.split()
        if int(rel) > 0:
            qrels[qid].add(did)
    return qrels


@torch.no_grad()
def encode(module: EmbeddingModule, items: list[Item], batch_size: int = 64) -> torch.Tensor:
    collator = module.collator()
    parts = [module.embed(collator.encode(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
    return torch.cat(parts)


def hit_rate(ranked: list[list[str]], positives: list[set[str]], ks: tuple[int, ...]) -> dict[str, float]:
    return {
        f"R@{k}": sum(bool(set(r[:k]) & p) for r, p in zip(ranked, positives, strict=True)) / len(ranked) for k in ks
    }


def chance(pool_size: int, positives: list[set[str]], ks: tuple[int, ...]) -> dict[str, float]:
    """Expected hit rate of a random ranking: 1 - C(N - P, k) / C(N, k), averaged over queries."""

    def one(p: int, k: int) -> float:
        return 1.0 - math.comb(pool_size - p, k) / math.comb(pool_size, k) if p else 0.0

    return {f"R@{k}": sum(one(len(p), k) for p in positives) / len(positives) for k in ks}


def evaluate(
    module: EmbeddingModule, task_dir: str | Path, ks: tuple[int, ...] = (1, 5, 10), batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """{"model": Recall@K of `module`, "chance": of a random ranking} on one evaluation task folder."""
    task_dir = Path(task_dir)
    module.eval()
    pool, queries = read_pool(task_dir / "pool"), read_queries(task_dir / "queries")
    qrels = read_qrels(task_dir / "qrels.txt")
    pool_ids = [c.id for c in pool]
    in_pool = set(pool_ids)
    positives = [qrels[q.id] & in_pool for q in queries]
    scores = encode(module, queries, batch_size) @ encode(module, pool, batch_size).T
    top = scores.topk(min(max(ks), len(pool)), dim=-1).indices.tolist()
    ranked = [[pool_ids[j] for j in row] for row in top]
    return {"model": hit_rate(ranked, positives, ks), "chance": chance(len(pool), positives, ks)}
