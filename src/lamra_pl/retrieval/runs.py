"""Run files and qrels: the files an evaluation is computed from, so anyone can recompute it.

* run file (TREC): one line per retrieved candidate, `qid Q0 did rank score tag`, ranks from 1, best first;
* qrels (M-BEIR's): one line per positive, `qid 0 did relevance task_id`; relevance > 0 counts as positive.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write


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


def read_run(path: str | Path) -> Run:
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


def read_qrels(path: str | Path) -> dict[str, set[str]]:
    path = Path(path)
    if not path.is_file():
        raise LamraError(f"qrels file {path} does not exist")
    qrels: dict[str, set[str]] = defaultdict(set)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            qid, did, relevance = fields[0], fields[2], int(fields[3])
        except (IndexError, ValueError):
            raise LamraError(f"{path}:{number}: expected 'qid 0 did relevance task_id', got {line!r}") from None
        if relevance > 0:
            qrels[qid].add(did)
    return dict(qrels)
