"""A run folder: rankings (TREC run files) of a set of tasks, the manifest that says what they rank, and what was
computed from them, so anyone can recompute an evaluation.

Layout version VERSION (`lamra-pl retrieve` writes OUT/local/ and OUT/global/, `lamra-pl rerank` writes OUT/):

    RUNS/
      <task>.run        TREC run, one line per retrieved candidate: `qid Q0 did rank score tag`, ranks from 1, best
                        first
      runs.json         {"format": "lamra-pl-runs", "version": 1, "pool": "local" | "global", "index": INDEX,
                         "k": int, "instruction_seed": null | int,
                         "tasks": {TASK: {"run_file", "qrels_file", "task_file", "queries", "pool_ids"
                                          [, "retrieval_run_file"]}},
                         ["rerank": {"model", "mode", "prompt", "top_n", "fusion": {TASK: w}, "fewer_than_top_n"}]}
                        (manifests without "format" and "version", from before they were recorded, read as version 1)
      scores/<task>.tsv reranked folders: `qid did retrieval_rank retrieval_score rerank_score` per reranked pair
      results.json, results.md   written by `lamra-pl evaluate` (`lamra_pl.pipelines.evaluate`), with its
                        TensorBoard run (`lamra_pl.formats.tensorboard`) beside them
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write

FORMAT, VERSION = "lamra-pl-runs", 1
MANIFEST = "runs.json"
RESULTS = "results.json"
SCORES = "scores"


@dataclass
class Run:
    """A parsed run file: query ids in file order, and per query its ranked candidate ids and scores."""

    qids: list[str]
    ranked: list[list[str]]
    scores: list[list[float]]


def format_run(qids: list[str], ranked: list[list[str]], scores: np.ndarray, tag: str) -> str:
    lines = []
    for qid, ids, row in zip(qids, ranked, scores, strict=True):
        # `row` may be longer than `ids` (padding where the pool had fewer than k candidates).
        entries = enumerate(zip(ids, row[: len(ids)], strict=True), start=1)
        lines.extend(f"{qid} Q0 {did} {rank} {score:.6f} {tag}" for rank, (did, score) in entries)
    return "".join(f"{line}\n" for line in lines)


def write_run(path: str | Path, qids: list[str], ranked: list[list[str]], scores: np.ndarray, tag: str) -> Path:
    return atomic_write(path, format_run(qids, ranked, scores, tag))


def read_run_file(path: str | Path) -> Run:
    """A TREC run file, checked: every query's ranks are 1..n."""
    path = Path(path)
    if not path.is_file():
        raise LamraError(f"run file {path} does not exist")
    rows: dict[str, list[tuple[int, str, float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            qid, _, did, rank, score = fields[0], fields[1], fields[2], int(fields[3]), float(fields[4])
        except (IndexError, ValueError):
            raise LamraError(f"{path}:{number}: expected 'qid Q0 did rank score tag', got {line!r}") from None
        rows.setdefault(qid, []).append((rank, did, score))
    qids = list(rows)
    ranked, scores = [], []
    for qid in qids:
        entries = sorted(rows[qid])
        if [r for r, _, _ in entries] != list(range(1, len(entries) + 1)):
            raise LamraError(f"{path}: the ranks of query {qid} are not 1..{len(entries)}")
        ranked.append([d for _, d, _ in entries])
        scores.append([s for _, _, s in entries])
    return Run(qids, ranked, scores)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A run folder's runs.json, its version checked (a folder written by `lamra-pl retrieve` or `rerank`)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise LamraError(f"{folder} has no {MANIFEST}: give a folder written by `lamra-pl retrieve`")
    manifest = json.loads(path.read_text())
    if manifest.get("format", FORMAT) != FORMAT or manifest.get("version", VERSION) != VERSION:
        raise LamraError(
            f"{path}: a {manifest.get('format')} manifest of version {manifest.get('version')}; this lamra-pl reads "
            f"{FORMAT} version {VERSION}"
        )
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """runs.json, with this layout's format and version, written atomically."""
    fields = {k: v for k, v in manifest.items() if k not in ("format", "version")}
    return atomic_write(Path(folder) / MANIFEST, json.dumps({"format": FORMAT, "version": VERSION, **fields}, indent=1))


def scores_file(folder: str | Path, task: str) -> Path:
    return Path(folder) / SCORES / f"{task}.tsv"


def format_scores(qid: str, head: list[str], retrieval: list[float], rerank: dict[str, float]) -> str:
    """One query's scores/<task>.tsv lines: its reranked head in retrieval order."""
    return "".join(
        f"{qid}\t{did}\t{rank}\t{retrieval[rank - 1]!r}\t{rerank[did]!r}\n" for rank, did in enumerate(head, start=1)
    )


def read_rerank_scores(path: str | Path) -> dict[str, list[float]]:
    """qid -> the rerank scores of its head, in retrieval order, from a scores/<task>.tsv file."""
    scores: dict[str, list[float]] = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        qid, _, _, _, value = line.split("\t")
        scores[qid].append(float(value))
    return dict(scores)
