"""`lamra-pl mine`: MM-Embed's modality-aware hard negatives (spec mmembed_mbeir.md section 2) -> training shards.

Input: a `lamra-pl retrieve --pools [global] --k 50` folder of the training queries against an index of the union
of the training candidates (all modalities; `make mine` builds both, the index once). For each training query,
with m* the modality of its first positive and `ranked` its top k:

- C1, wrong modality: candidates ranked above the first positive (anywhere in the top k if the positive is not
  in it) whose modality is not m*; they teach the model to follow the instruction's modality;
- C2, right modality, less relevant: candidates of modality m* at ranks `window` (1-based, inclusive; default
  46-50), hard but rarely false negatives.

A query's negatives are its best-ranked `c1` of C1, then its best-ranked `c2` of C2; a positive of the query is
never one. Short lists are filled up to c1 + c2 with random pool candidates of modality m* not ranked above the
window (a generator seeded by (seed, qid)), so every sample carries the same number and `data.num_negatives`
can use them all; the fill is counted. Other strategies, for the ablations: "topk" (UniIR's mining,
modality-blind: the best-ranked non-positives) and "random" (random non-positive pool candidates, any modality).

Output: OUT/<task>/shard-*.tar (the training records with `negatives` replaced, everything else kept) and
OUT/report.json (per task: queries, negatives from C1, C2, top k and random, queries whose positive is not in
the top k).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lamra_pl.data.candidates import CandidateStore
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import query_samples, rewritten_record, sample_location
from lamra_pl.formats.shards import write_shards
from lamra_pl.pipelines.rerank_data import retrieved_training_runs
from lamra_pl.progress import counted, progress

Strategy = Literal["modality", "topk", "random"]


@dataclass(frozen=True)
class MiningSpec:
    """How many negatives of each kind per query, and where C2 comes from."""

    strategy: Strategy = "modality"
    c1: int = 1  # wrong-modality negatives ranked above the positive (or top-k negatives for "topk")
    c2: int = 1  # right-modality negatives from the rank window
    window: tuple[int, int] = (46, 50)  # 1-based ranks, inclusive
    seed: int = 0

    @property
    def per_query(self) -> int:
        return self.c1 + self.c2


def mine_query(
    qid: str,
    ranked: list[str],
    positives: list[str],
    modality: Callable[[str], str],
    pool_by_modality: dict[str, list[str]],
    spec: MiningSpec,
    counts: Counter[str],
) -> list[str]:
    """The negative ids of one query, best first, never a positive; `counts` gets where each came from.

    `modality(id)` is a candidate's modality; `pool_by_modality` lists the pool's ids per modality (the fill)."""
    excluded = set(positives)
    ranked = list(dict.fromkeys(ranked))
    target = modality(positives[0])
    chosen: list[str] = []
    if spec.strategy == "modality":
        first_positive = next((r for r, d in enumerate(ranked) if d in excluded), None)
        if first_positive is None:
            counts["positive_not_in_top_k"] += 1
        above = ranked if first_positive is None else ranked[:first_positive]
        c1 = [d for d in above if d not in excluded and modality(d) != target][: spec.c1]
        lo, hi = spec.window
        c2 = [d for d in ranked[lo - 1 : hi] if d not in excluded and modality(d) == target][: spec.c2]
        chosen = c1 + c2
        counts["c1"] += len(c1)
        counts["c2"] += len(c2)
    elif spec.strategy == "topk":
        chosen = [d for d in ranked if d not in excluded][: spec.per_query]
        counts["top_k"] += len(chosen)
    # Fill (or, for "random", choose) from the pool: right modality, or any for "random".
    missing = spec.per_query - len(chosen)
    if missing > 0:
        kinds = sorted(pool_by_modality) if spec.strategy == "random" else [target]
        candidates = [d for kind in kinds for d in pool_by_modality.get(kind, [])]
        taken = excluded | set(chosen)
        if spec.strategy == "modality":  # never the right-modality candidates ranked above the window: likely positives
            taken |= set(ranked[: spec.window[0] - 1])
        rng = random.Random(f"{spec.seed}:{qid}")
        extra: list[str] = []
        # Rejection sampling: a real pool is far larger than a few negatives plus a query's positives and top ranks.
        for _ in range(20 * missing):
            d = rng.choice(candidates) if candidates else None
            if d is not None and d not in taken:
                taken.add(d)
                extra.append(d)
                if len(extra) == missing:
                    break
        if len(extra) < missing:  # a small or nearly used-up pool: draw from what is left
            left = [d for d in candidates if d not in taken]
            extra += rng.sample(left, min(missing - len(extra), len(left)))
        if len(extra) < missing:
            counts["short"] += 1
        counts["random"] += len(extra)
        chosen += extra
    return chosen


def mine(
    runs: str,
    out: str,
    strategy: Strategy = "modality",
    c1: int = 1,
    c2: int = 1,
    window: tuple[int, int] = (46, 50),
    seed: int = 0,
    maxcount: int = 1000,
) -> dict[str, Any]:
    """MM-Embed's modality-aware hard negatives: training shards whose queries carry c1 + c2 mined negatives.

    The report (printed, and in OUT/report.json) counts where each negative came from.

    Args:
        runs: a `lamra-pl retrieve --pools [global] --k 50` folder of the training queries (DATA/train/*_task*)
            against an index of the union training pool (DATA/train_pool), e.g. runs/train_mining/global.
        out: the output shard folder (OUT/<task>/shard-*.tar, OUT/report.json): `data.train_shards` of a retriever
            with `data.num_negatives` <= c1 + c2.
        strategy: "modality" (C1: wrong modality ranked above the positive; C2: right modality in the rank
            window), "topk" (the best-ranked non-positives, modality-blind) or "random" (random pool candidates).
        c1: negatives per query from C1 (for "topk" and "random": c1 + c2 negatives in all).
        c2: negatives per query from C2.
        window: C2's ranks, 1-based and inclusive (MM-Embed: 46-50).
        seed: seed of the random fill of short lists (per query).
        maxcount: samples per shard.
    """
    report = mine_negatives(runs, out, MiningSpec(strategy, c1, c2, tuple(window), seed), maxcount)
    print(json.dumps(report, indent=1))
    return report


def mine_negatives(runs: str, out: str, spec: MiningSpec, maxcount: int = 1000) -> dict[str, Any]:
    """Write hard-negative training shards from a `lamra-pl retrieve` folder (global pool); returns the report."""
    lo, hi = spec.window
    if min(spec.c1, spec.c2) < 0 or spec.per_query == 0 or not 1 <= lo <= hi:
        raise LamraError(f"mine: c1, c2 >= 0 with c1 + c2 > 0 and a window 1 <= lo <= hi, got {spec}")
    runs_dir, manifest = retrieved_training_runs(runs, out)
    if manifest.get("pool") != "global":
        raise LamraError(
            f"{runs_dir} ranks each task's local pool; mining needs the mixed-modality union pool: "
            "`lamra-pl retrieve --pools [global]` against an index of the training pool"
        )
    rankings = {name: read_run_file(entry["run_file"]) for name, entry in manifest["tasks"].items()}
    depth = max((len(r) for run in rankings.values() for r in run.ranked), default=0)
    if spec.strategy == "modality" and spec.c2 > 0 and depth < hi:
        raise LamraError(f"{runs_dir} ranks {depth} candidates per query; the C2 window {lo}-{hi} needs --k >= {hi}")
    store = CandidateStore(EmbeddingIndex(manifest["index"]).meta["sources"])
    pool_by_modality: dict[str, list[str]] = {}
    for did in store.locations:
        pool_by_modality.setdefault(store.modality(did), []).append(did)
    report: dict[str, Any] = {"runs": str(runs_dir), "spec": {**spec.__dict__, "window": list(spec.window)}}
    report["tasks"] = {}
    bar = progress(total=sum(len(run.qids) for run in rankings.values()), desc="mine", unit="queries")
    for name, entry in manifest["tasks"].items():
        run = rankings[name]
        top = dict(zip(run.qids, run.ranked, strict=True))
        counts: Counter[str] = Counter()
        samples = counted(_samples(Path(entry["queries"]), top, store, pool_by_modality, spec, counts), bar)
        counts["samples"] = sum(write_shards(samples, Path(out) / name, maxcount=maxcount).values())
        report["tasks"][name] = dict(sorted(counts.items()))
    bar.close()
    atomic_write(Path(out) / "report.json", json.dumps(report, indent=1))
    return report


def _samples(
    queries: Path,
    top: dict[str, list[str]],
    store: CandidateStore,
    pool_by_modality: dict[str, list[str]],
    spec: MiningSpec,
    counts: Counter[str],
) -> Iterator[dict[str, Any]]:
    for sample, record, positives in query_samples(queries):
        where, qid = sample_location(sample), str(record["qid"])
        counts["queries"] += 1
        ranked = top.get(qid)
        if ranked is None:
            # Every training query must keep its place in the mined set: a silent drop would shrink the data.
            raise LamraError(f"{where}: query {qid!r} is not ranked in the run files; retrieve every training task")
        ids = [p["id"] for p in positives]
        if any(i not in store for i in ids):
            raise LamraError(f"{where}: a positive of query {qid!r} is not in the mined pool {store.sources}")
        negatives = mine_query(qid, ranked, ids, store.modality, pool_by_modality, spec, counts)
        yield rewritten_record(sample, record, positives=positives, negatives=[store.record_item(i) for i in negatives])
