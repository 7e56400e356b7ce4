"""Exact top-k search throughput over a float16 memmap pool, faiss vs torch, against memory and compute floors.

    python experiments/benchmarks/search_throughput.py [--queries 10000] [--candidates 1000000] [--dim 1536]

The pool is written once to `--pool` (unit-normalised random float16 rows, `.npy`) and reused when its shape
matches. The floors are lower bounds for the backend's scoring pass only (rescoring and merging come on top):
- memory: the float16 pool read once, plus the float32 block streamed once per query batch
  (torch: `query_batch` queries at a time; faiss: its BLAS query block), over the measured read bandwidth;
- compute: 2*Q*N*D FLOP over the measured float32 matmul rate (torch).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lamra_pl.ranking.search import faiss_module, search


def make_pool(path: Path, n: int, dim: int, seed: int = 0, rows_per_step: int = 65536) -> np.ndarray:
    """Unit-normalised random float16 rows in an `.npy` memmap at `path` (reused if the shape matches)."""
    if path.is_file():
        pool = np.load(path, mmap_mode="r")
        if pool.shape == (n, dim) and pool.dtype == np.float16:
            return pool
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, rows_per_step):
        rows = rng.standard_normal((min(rows_per_step, n - start), dim), dtype=np.float32)
        pool[start : start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    pool.flush()
    return np.load(path, mmap_mode="r")


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes/s of summing an in-memory float32 array (best of `repeats`)."""
    x = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def matmul_flops(m: int = 1024, k: int = 1536, n: int = 16384, repeats: int = 3) -> float:
    """FLOP/s of a float32 [m,k] x [k,n] torch matmul, the shape of one query batch against a block (best of)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--query-batch", type=int, default=1024)
    parser.add_argument("--block-rows", type=int, default=131072)
    parser.add_argument("--backends", nargs="+", default=["faiss", "torch"], choices=["faiss", "torch"])
    parser.add_argument("--pool", type=Path, default=Path(tempfile.gettempdir()) / "lamra_bench" / "pool.npy")
    args = parser.parse_args()

    start = time.perf_counter()
    pool = make_pool(args.pool, args.candidates, args.dim)
    print(f"pool {pool.shape} float16 at {args.pool} ready in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    np.asarray(pool).sum(dtype=np.float32)  # pull the pool into the page cache, so every backend reads from RAM

    bandwidth = read_bandwidth()
    flops = matmul_flops(k=args.dim)
    f16_bytes, f32_bytes = pool.nbytes, args.candidates * args.dim * 4
    compute_floor = 2 * args.queries * args.candidates * args.dim / flops
    faiss = faiss_module()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, float32 matmul {flops / 1e9:.1f} GFLOP/s")

    rows = [
        "| backend | queries | candidates | dim | k | seconds | queries/s | memory floor (s) | compute floor (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend in args.backends:
        batch = faiss.cvar.distance_compute_blas_query_bs if backend == "faiss" and faiss else args.query_batch
        memory_floor = (f16_bytes + f32_bytes * math.ceil(args.queries / batch)) / bandwidth
        start = time.perf_counter()
        top = search(pool, queries, args.k, backend=backend, block_rows=args.block_rows, query_batch=args.query_batch)
        seconds = time.perf_counter() - start
        assert top.rows.shape == (args.queries, args.k) and (top.rows >= 0).all()
        rows.append(
            f"| {backend} | {args.queries:,} | {args.candidates:,} | {args.dim} | {args.k} | {seconds:.1f} "
            f"| {args.queries / seconds:,.0f} | {memory_floor:.2f} | {compute_floor:.1f} |"
        )
        print(f"{backend}: {seconds:.1f} s", flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
