"""Recall@K speed on random rankings: `pad_positives` and `recall_at_k`, best of `--repeats`.

    python experiments/benchmarks/metric_speed.py [--queries 200000] [--pool 1000000] [--depth 50]

Each query gets a random top-`depth` ranking over `pool` candidates and 1 to `max-positives` random positives.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lamra_pl.ranking.metrics import pad_positives, recall_at_k


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of `repeats` timed calls of `fn`, and its result."""
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--pool", type=int, default=1_000_000)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--max-positives", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    ranked = rng.integers(0, args.pool, size=(args.queries, args.depth), dtype=np.int64)
    counts = rng.integers(1, args.max_positives + 1, size=args.queries)
    # Half of the queries get their first positive from their own ranking, so the recalls are not all ~0.
    positives = [list(map(int, rng.integers(0, args.pool, size=c))) for c in counts]
    for q in range(0, args.queries, 2):
        positives[q][0] = int(ranked[q, rng.integers(0, args.depth)])
    ks = tuple(args.ks)

    pad_s, padded = best_of(args.repeats, lambda: pad_positives(positives))
    recall_s, recall = best_of(args.repeats, lambda: recall_at_k(ranked, padded, ks))
    print(f"recalls: {recall}")
    print()
    print(f"| step | queries | depth | positives/query | seconds (best of {args.repeats}) |")
    print("|---|---:|---:|---:|---:|")
    shape = f"{args.queries:,} | {args.depth} | 1-{args.max_positives}"
    print(f"| pad_positives | {shape} | {pad_s:.3f} |")
    print(f"| recall_at_k{ks} | {shape} | {recall_s:.3f} |")
    print(f"| both | {shape} | {pad_s + recall_s:.3f} |")


if __name__ == "__main__":
    main()
