"""`lamra-pl rerank-data`: a retriever's rankings of the training queries -> reranker training shards.

Per training query (spec lamra.md section 4, LamRA's draws in LamRA's order, from a generator seeded by
(seed, qid), so the result depends on neither file order nor process):

1. n = randint(1, 4) listwise negatives;
2. one positive, one instruction;
3. the pointwise negative: one of the top-K minus *every* positive of the query;
4. the listwise negatives: n of the same set;
5. the answer slot: the positive is inserted at a random position of the list (2 to 5 candidates).

LamRA falls back to the whole top-K when too few non-positives remain, which can label a positive as a
negative. Here a positive is never a negative. When the top-K holds fewer than n non-positives the list is
shorter (counted as `short_list`); when it holds none, the query keeps its pointwise positive only (counted as
`no_negative`). A training query the run files do not rank is skipped (counted as `no_ranking`).

Output: OUT/<task>/shard-*.tar (one sample per query, the sample layout plus a "rerank" field, see
`rerank_inputs.rerank_example`, and "positive_ids", every positive of the query), OUT/report.json.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamra_pl.data.candidates import CandidateStore
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_manifest, read_run_file
from lamra_pl.formats.sample import query_samples, rewritten_record
from lamra_pl.formats.shards import write_shards
from lamra_pl.progress import counted, progress

MAX_LIST_NEGATIVES = 4  # LamRA: 1 to 4 negatives, so lists of 2 to 5 candidates


@dataclass
class Draw:
    """One query's reranker sample, by id: `listwise` holds the positive at position `answer` (1-based)."""

    positive: str
    instruction: str | None
    pointwise_negative: str | None
    listwise: list[str]
    answer: int | None


def draw(
    qid: str, positives: list[str], instructions: list[str], ranked: list[str], seed: int, counts: Counter[str]
) -> Draw:
    """The seeded choices for one query; `ranked` is its top-K. No positive is ever drawn as a negative."""
    rng = random.Random(f"{seed}:{qid}")
    n = rng.randint(1, MAX_LIST_NEGATIVES)
    positive = rng.choice(positives)
    instruction = rng.choice(instructions) if instructions else None
    excluded = set(positives)
    negatives = [d for d in dict.fromkeys(ranked) if d not in excluded]
    if not negatives:
        counts["no_negative"] += 1
        return Draw(positive, instruction, None, [], None)
    pointwise = rng.choice(negatives)
    if len(negatives) < n:
        counts["short_list"] += 1
    listed = rng.sample(negatives, min(n, len(negatives)))
    answer = rng.randint(1, len(listed) + 1)
    listed.insert(answer - 1, positive)
    return Draw(positive, instruction, pointwise, listed, answer)


def retrieved_training_runs(runs: str, out: str) -> tuple[Path, dict[str, Any]]:
    """The folder and manifest of a `lamra-pl retrieve` run folder, after checking that `out` is new or empty."""
    if Path(out).exists() and any(Path(out).iterdir()):
        # Training reads every .tar below it: shards of an earlier run would silently join the new ones.
        raise LamraError(f"{out} is not empty: give a new folder, or delete it first")
    return Path(runs), read_manifest(runs)


def rerank_data(runs: str, out: str, top_k: int = 100, seed: int = 0, maxcount: int = 1000) -> dict[str, Any]:
    """Reranker training shards from a retriever's run files on the training queries (LamRA-Rank's data).

    Per query: the pointwise positive, one pointwise negative from the top K minus every positive, and a listwise
    sample of 2-5 candidates with the positive at a random position. Counts of what was short are in the report,
    which is printed and written to OUT/report.json.

    Args:
        runs: a `lamra-pl retrieve` run folder of training tasks (e.g. runs/train_retrieval/local, retrieved
            with --queries 'DATA/train/*_task*' --k 100).
        out: the output shard folder (OUT/<task>/shard-*.tar, OUT/report.json): `data.train_shards` of a reranker.
        top_k: negatives are drawn from each query's top K.
        seed: seed of the draws (per query, so independent of order).
        maxcount: samples per shard.
    """
    if top_k < 1:
        raise LamraError(f"top_k must be >= 1, got {top_k}")
    runs_dir, manifest = retrieved_training_runs(runs, out)
    rankings = {name: read_run_file(entry["run_file"]) for name, entry in manifest["tasks"].items()}
    wanted = {d for run in rankings.values() for ranked in run.ranked for d in ranked[:top_k]}
    index = EmbeddingIndex(manifest["index"])
    store = CandidateStore(index.meta["sources"], wanted)
    for name, run in rankings.items():
        unknown = sorted({d for ranked in run.ranked for d in ranked[:top_k] if d not in store})
        if unknown:
            raise LamraError(
                f"{manifest['tasks'][name]['run_file']} ranks {len(unknown)} ids that are not in the pool "
                f"{index.meta['sources']}, e.g. {unknown[:3]}"
            )
    report: dict[str, Any] = {"runs": str(runs_dir), "top_k": top_k, "seed": seed, "tasks": {}}
    bar = progress(total=sum(len(run.qids) for run in rankings.values()), desc="rerank-data", unit="queries")
    for name, entry in manifest["tasks"].items():
        run = rankings[name]
        top = {qid: ranked[:top_k] for qid, ranked in zip(run.qids, run.ranked, strict=True)}
        counts: Counter[str] = Counter()
        seen: set[str] = set()
        samples = counted(_samples(Path(entry["queries"]), top, store, seed, counts, seen), bar)
        sizes = write_shards(samples, Path(out) / name, maxcount=maxcount)
        unknown_queries = sorted(set(top) - seen)
        if unknown_queries:
            shutil.rmtree(Path(out) / name)  # no partial output: the run file does not belong to these queries
            raise LamraError(
                f"{entry['run_file']} ranks {len(unknown_queries)} queries that are not in {entry['queries']}, "
                f"e.g. {unknown_queries[:3]}"
            )
        counts["samples"] = sum(sizes.values())
        counts["fewer_than_top_k"] = sum(len(r) < top_k for r in top.values())
        report["tasks"][name] = dict(sorted(counts.items()))
    bar.close()
    atomic_write(Path(out) / "report.json", json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def _samples(
    queries: Path, top: dict[str, list[str]], store: CandidateStore, seed: int, counts: Counter[str], seen: set[str]
) -> Iterator[dict[str, Any]]:
    for sample, record, positives in query_samples(queries):
        qid = str(record["qid"])
        counts["queries"] += 1
        seen.add(qid)
        if qid not in top:
            counts["no_ranking"] += 1
            continue
        by_id = {p["id"]: p for p in positives}
        d = draw(qid, list(by_id), record.get("instructions") or [], top[qid], seed, counts)
        negatives = list(dict.fromkeys(([d.pointwise_negative] if d.pointwise_negative else []) + d.listwise))
        negatives = [i for i in negatives if i != d.positive]
        number = {d.positive: 0, **{i: n for n, i in enumerate(negatives, start=1)}}
        pointwise = [[0, True]] + ([[number[d.pointwise_negative], False]] if d.pointwise_negative else [])
        yield rewritten_record(
            sample,
            record,
            instructions=[d.instruction] if d.instruction else [],
            positives=[by_id[d.positive]],
            negatives=[store.record_item(i) for i in negatives],
            extra={
                "positive_ids": list(by_id),
                "rerank": {"pointwise": pointwise, "listwise": [number[i] for i in d.listwise], "answer": d.answer},
            },
        )
