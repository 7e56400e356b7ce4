"""Exact top-k search throughput over a float16 memmap pool, faiss vs torch, against memory and compute floors;
or (`--raw-faiss`) `search()` against raw faiss `IndexFlatIP` on the same vectors.

    python experiments/benchmarks/search_throughput.py [--queries 10000] [--candidates 1000000] [--dim 1536]
    python experiments/benchmarks/search_throughput.py --raw-faiss --queries 5608 --candidates 20000 --dim 2048

With `--raw-faiss`, each repeat times, in turn on the same pool and queries:
- raw faiss: the pool converted to float32 unit rows and added to an `IndexFlatIP` ("prep"), then
  `index.search(queries, k)` ("search"): what a user of faiss alone would run, without exact ties or float64;
- `search(pool, queries, k, backend="faiss")`: the whole call (normalisation, faiss top-(k+margin), the float64
  rescoring near the k-th score, id tie-breaks).
The best of `--repeats` is reported for each, with the ratio of `search()` to raw faiss's search alone and to
its prep + search, the load average before and after (other processes share the CPU), and how many queries'
top k differ from raw faiss's (as a set; they may, where float32 misorders near-ties).

The pool is written once to `--pool` (unit-normalised random float16 rows, `.npy`; default
`$TMPDIR/lamra_bench/pool_<N>x<D>.npy`) and reused when its shape matches. The floors are lower bounds for the
backend's scoring pass only (rescoring and merging come on top):
- memory: the float16 pool read once, plus the float32 block streamed once per query batch
  (torch: `query_batch` queries at a time; faiss: its BLAS query block), over the measured read bandwidth;
- compute: 2*Q*N*D FLOP over the measured float32 matmul rate (torch).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lamra_pl.ranking.search import faiss_module, search, unit_rows


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


def compare_raw_faiss(pool: np.ndarray, queries: np.ndarray, k: int, repeats: int, block_rows: int) -> str:
    """Best-of-`repeats` seconds of raw faiss IndexFlatIP and of `search()` on the same vectors, as a table."""
    faiss = faiss_module()
    if faiss is None:
        raise SystemExit("--raw-faiss needs faiss (pip install faiss-cpu)")
    load_before = os.getloadavg()[0]
    prep, raw, ours = math.inf, math.inf, math.inf
    for repeat in range(repeats):
        start = time.perf_counter()
        index = faiss.IndexFlatIP(pool.shape[1])
        index.add(unit_rows(pool))
        q32 = unit_rows(queries)
        prep = min(prep, time.perf_counter() - start)
        start = time.perf_counter()
        _, raw_rows = index.search(q32, k)
        raw = min(raw, time.perf_counter() - start)
        del index
        start = time.perf_counter()
        top = search(pool, queries, k, backend="faiss", block_rows=block_rows)
        ours = min(ours, time.perf_counter() - start)
        print(f"repeat {repeat + 1}: raw faiss prep + search, search()", flush=True)
    load_after = os.getloadavg()[0]
    assert top.rows.shape == (len(queries), k) and (top.rows >= 0).all()
    differ = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(raw_rows, top.rows, strict=True))
    rows = [
        "| queries | candidates | dim | k | raw faiss prep (s) | raw faiss search (s) | search() (s) "
        "| search() / raw search | search() / raw prep + search | top k not raw faiss's | load avg before, after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {len(queries):,} | {len(pool):,} | {pool.shape[1]} | {k} | {prep:.3f} | {raw:.3f} | {ours:.3f} "
        f"| {ours / raw:.3f}x | {ours / (prep + raw):.3f}x | {differ} | {load_before:.2f}, {load_after:.2f} |",
    ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--query-batch", type=int, default=1024)
    parser.add_argument("--block-rows", type=int, default=131072)
    parser.add_argument("--backends", nargs="+", default=["faiss", "torch"], choices=["faiss", "torch"])
    parser.add_argument("--pool", type=Path, default=None, help="default: $TMPDIR/lamra_bench/pool_<N>x<D>.npy")
    parser.add_argument("--raw-faiss", action="store_true", help="time search() against raw faiss IndexFlatIP")
    parser.add_argument("--repeats", type=int, default=3, help="with --raw-faiss: best of this many runs")
    args = parser.parse_args()
    if args.pool is None:
        args.pool = Path(tempfile.gettempdir()) / "lamra_bench" / f"pool_{args.candidates}x{args.dim}.npy"

    start = time.perf_counter()
    pool = make_pool(args.pool, args.candidates, args.dim)
    print(f"pool {pool.shape} float16 at {args.pool} ready in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    np.asarray(pool).sum(dtype=np.float32)  # pull the pool into the page cache, so every backend reads from RAM
    if args.raw_faiss:
        print(compare_raw_faiss(pool, queries, args.k, args.repeats, args.block_rows))
        return

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
