"""`lamra-pl distill-data`: a retrieval's top K and a reranker's scores of them -> distillation training shards.

Inputs: a `lamra-pl retrieve` run folder of the training queries (`--runs`, e.g. the top 100 `make rerank-data`
retrieves) and a `lamra-pl rerank` output folder that reranked it (`--scores`: its `scores/<task>.tsv` hold the
reranker's score of every (query, candidate) pair of each query's head, e.g. P(Yes) for pointwise reranking). Per
training query (the records of the run folder's query shards, everything in them kept), the record gains its
candidate list (`lamra_pl.formats.sample`, field `candidates`): the top K of its ranking, best first, each candidate
with the reranker's score. Positives stay in the list: the teacher's distribution is over everything the retriever
ranked. A `model.distill` retriever trains on the shards (`lamra_pl.models.distill`).

Every training query is read once and either written or skipped, counted per reason (per task in the report:
`queries` = `samples` + the sum of `skipped`):

* `no_ranking`: the run file does not rank the query;
* `short_list`: it ranks fewer than K distinct candidates (every list has K, so batches stack);
* `unscored`: a candidate of its top K has no score in the reranked folder (the reranker saw another ranking).

Refused with one line, before anything is written: an OUT that is not new or empty, a scores folder that is not a
`lamra-pl rerank` output or lacks a task of the runs, K above the reranker's top N, ids the pool does not hold,
queries the query shards do not hold, and a task of which not one candidate is scored.

Output, written whole or not at all (in a hidden folder beside OUT, renamed into place once report.json is in it;
each task folder carries the shards' INCOMPLETE marker while written, `lamra_pl.formats.shards`):
OUT/<task>/shard-*.tar and OUT/report.json.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lamra_pl.data.candidates import CandidateStore, ranked_candidates
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_folder, atomic_write
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_manifest, read_pair_scores, read_run_file, scores_file
from lamra_pl.formats.sample import member_item, query_samples, rewritten_record, sample_location
from lamra_pl.formats.shards import write_shards
from lamra_pl.pipelines.rerank_data import retrieved_training_runs
from lamra_pl.progress import counted, progress

REPORT = "report.json"
SKIP_REASONS = ("no_ranking", "short_list", "unscored")


def distill_data(runs: str, scores: str, out: str, k: int | None = None, maxcount: int = 1000) -> dict[str, Any]:
    """Distillation training shards: each training query with its retrieved top K and the reranker's score of each.

    The report (printed, and in OUT/report.json) counts per task the queries read, the samples written and the
    queries skipped per reason, and how many lists hold a positive.

    Args:
        runs: a `lamra-pl retrieve` run folder of the training tasks (e.g. runs/train_retrieval/local, retrieved
            with --queries 'DATA/train/*_task*' --k 100).
        scores: a `lamra-pl rerank` output folder that reranked `runs` (e.g. runs/train_retrieval/reranked_local):
            its scores are the teacher's.
        out: the output shard folder (OUT/<task>/shard-*.tar, OUT/report.json), new or empty: `data.train_shards`
            of a retriever with `model.distill`.
        k: candidates per list, the top K of each ranking (default: the reranker's top N, all it scored).
        maxcount: samples per shard.
    """
    runs_dir, manifest = retrieved_training_runs(runs, out)
    reranked = read_manifest(scores)
    about = reranked.get("rerank")
    if not isinstance(about, dict) or not isinstance(about.get("top_n"), int):
        raise LamraError(f"{scores} is not a folder written by `lamra-pl rerank` (its runs.json has no 'rerank')")
    top_n = about["top_n"]
    k = top_n if k is None else k
    if not 1 <= k <= top_n:
        raise LamraError(f"k must be 1 to {top_n} (the reranker scored the top {top_n} of each query), got {k}")
    missing = sorted(set(manifest["tasks"]) - set(reranked["tasks"]))
    if missing:
        raise LamraError(f"{scores} reranked no runs of the tasks {missing[:3]} of {runs_dir}: rerank every task")
    rankings = {name: read_run_file(entry["run_file"]) for name, entry in manifest["tasks"].items()}
    teacher = {name: read_pair_scores(scores_file(scores, name)) for name in manifest["tasks"]}
    tops: dict[str, dict[str, list[str]]] = {}
    for name, run in rankings.items():
        tops[name] = {qid: list(dict.fromkeys(ranked))[:k] for qid, ranked in zip(run.qids, run.ranked, strict=True)}
        if not any(d in teacher[name].get(q, {}) for q, top in tops[name].items() for d in top):
            raise LamraError(
                f"{scores_file(scores, name)} scores none of the candidates {manifest['tasks'][name]['run_file']} "
                "ranks: give the reranked folder of these runs"
            )
    run_files = {name: manifest["tasks"][name]["run_file"] for name in tops}
    store = ranked_candidates(EmbeddingIndex(manifest["index"]).meta["sources"], tops, run_files)
    report: dict[str, Any] = {"runs": str(runs_dir), "scores": str(scores), "k": k, "teacher": about, "tasks": {}}
    bar = progress(total=sum(len(run.qids) for run in rankings.values()), desc="distill-data", unit="queries")
    with atomic_folder(out) as staged:  # OUT is new or empty (checked above): the whole folder is renamed into place
        for name, entry in manifest["tasks"].items():
            counts: Counter[str] = Counter()
            seen: set[str] = set()
            samples = _samples(Path(entry["queries"]), tops[name], k, teacher[name], store, counts, seen)
            written = sum(write_shards(counted(samples, bar), staged / name, maxcount=maxcount).values())
            unknown_queries = sorted(set(tops[name]) - seen)
            if unknown_queries:  # nothing is left behind: the staged folder goes with the error
                raise LamraError(
                    f"{entry['run_file']} ranks {len(unknown_queries)} queries that are not in {entry['queries']}, "
                    f"e.g. {unknown_queries[:3]}"
                )
            skipped = {reason: counts[reason] for reason in SKIP_REASONS}
            if counts["queries"] != written + sum(skipped.values()):  # every query read is written or counted
                raise AssertionError(f"{name}: {counts['queries']} queries read, {written} written, {skipped} skipped")
            report["tasks"][name] = {
                "queries": counts["queries"],
                "samples": written,
                "skipped": skipped,
                "lists_with_positive": counts["lists_with_positive"],
            }
        bar.close()
        atomic_write(staged / REPORT, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def _samples(
    queries: Path,
    top: dict[str, list[str]],
    k: int,
    teacher: dict[str, dict[str, float]],
    store: CandidateStore,
    counts: Counter[str],
    seen: set[str],
) -> Iterator[dict[str, Any]]:
    for sample, record, positives in query_samples(queries):
        where, qid = sample_location(sample), str(record["qid"])
        counts["queries"] += 1
        seen.add(qid)
        ranked = top.get(qid)
        if ranked is None:
            counts["no_ranking"] += 1
            continue
        if len(ranked) < k:
            counts["short_list"] += 1
            continue
        scored = teacher.get(qid, {})
        if any(d not in scored for d in ranked):
            counts["unscored"] += 1
            continue
        counts["lists_with_positive"] += any(p["id"] in ranked for p in positives)
        yield rewritten_record(
            sample,
            record,
            positives=positives,
            negatives=[member_item(sample, n, where) for n in record.get("negatives") or []],
            candidates=[{**store.record_item(d), "score": scored[d]} for d in ranked],
        )
