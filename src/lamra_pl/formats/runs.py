"""A run folder: rankings (TREC run files) of a set of tasks, the manifest that says what they rank, and what was
computed from them, so anyone can recompute an evaluation.

Layout version VERSION (`lamra-pl retrieve` writes OUT/local/ and OUT/global/, `lamra-pl rerank` writes OUT/):

    RUNS/
      <task>.run        TREC run, one line per retrieved candidate: `qid Q0 did rank score tag`, ranks from 1, best
                        first
      runs.json         {"format": "lamra-pl-runs", "version": 1, "paths": "relative to the run folder",
                         "pool": "local" | "global", "index": INDEX, "k": int, "instruction_seed": null | int,
                         "tasks": {TASK: {"run_file", "qrels_file", "task_file", "queries", "pool_ids"
                                          [, "retrieval_run_file"]}},
                         ["rerank": {"model", "mode", "prompt", "top_n", "fusion": {TASK: w}, "fewer_than_top_n"}]}
                        (manifests without "format" and "version", from before they were recorded, read as version 1);
                        TASK is a plain name (`lamra_pl.formats.safe_name`): files and folders are named after it
      scores/<task>.tsv reranked folders: `qid did retrieval_rank retrieval_score rerank_score` per reranked pair
      results.json, results.md   written by `lamra-pl evaluate` (`lamra_pl.pipelines.evaluate`), with its
                        TensorBoard run (`lamra_pl.formats.tensorboard`) beside them

Paths. The index and the files of each task (PATH_FIELDS) are stored relative to the run folder when they were given
relative (an absolute path as given; "paths" says so), and `read_manifest` resolves them against where the folder is
now: a run folder moved or copied together with its data and index, or read from another working directory, still
evaluates. Where they went elsewhere, `relocate` names the task folders and the index anew (`lamra-pl evaluate
--tasks --index`). Manifests without "paths" (written before it) hold paths as given, relative to the working
directory of the run that wrote them: each is read that way first, then relative to that directory as it is found
from the run folder's place (a run file's stored folder is the run folder, so the tree moved together still reads),
and a task's run file, last, as the file of that name in the run folder. `rerank.model` is informational, as given.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats import portable_path, read_json, resolve_path, safe_name
from lamra_pl.formats.index import IDS
from lamra_pl.formats.task import TASK_FILE, pool_ids_file, qrels_file, query_shards

FORMAT, VERSION = "lamra-pl-runs", 1
MANIFEST = "runs.json"
RESULTS = "results.json"
SCORES = "scores"
RELATIVE_TO_RUNS = "relative to the run folder"
PATH_FIELDS = ("run_file", "retrieval_run_file", "qrels_file", "task_file", "queries", "pool_ids")


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
    """A run folder's runs.json, its version checked (a folder written by `lamra-pl retrieve` or `rerank`), with its
    paths resolved against where the folder is now (see Paths above): usable from the working directory. Its task
    names are plain file names (`lamra_pl.formats.safe_name`): `rerank`, `rerank-data` and `mine` name their output
    after them."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise LamraError(f"{folder} has no {MANIFEST}: give a folder written by `lamra-pl retrieve`")
    manifest = read_json(path, f"a {FORMAT} manifest")
    if not isinstance(manifest, dict):
        raise LamraError(f"{path} is not a {FORMAT} manifest (not a JSON object)")
    if manifest.get("format", FORMAT) != FORMAT or manifest.get("version", VERSION) != VERSION:
        raise LamraError(
            f"{path}: a {manifest.get('format')} manifest of version {manifest.get('version')}; this lamra-pl reads "
            f"{FORMAT} version {VERSION}"
        )
    tasks = manifest.get("tasks")
    if not isinstance(manifest.get("pool"), str) or not isinstance(tasks, dict):
        raise LamraError(f'{path} is not a {FORMAT} manifest (it needs "pool" and "tasks")')
    for name, entry in tasks.items():
        if not safe_name(name):  # the commands name files and folders after it: OUT/<task>.run, OUT/<task>/
            raise LamraError(
                f"{path}: task {name!r} is not a plain name (letters, digits, '_', '.', '-', starting with a letter "
                "or digit, no '..'): files are named after it, so it could write outside the output folder"
            )
        paths = {k: v for k, v in entry.items() if k in PATH_FIELDS} if isinstance(entry, dict) else None
        if paths is None or not all(isinstance(v, str) for v in paths.values()) or "run_file" not in paths:
            raise LamraError(f'{path}: task {name!r} is not an entry with a "run_file" and paths as strings')
    if not isinstance(manifest.get("index"), str | None):
        raise LamraError(f'{path}: "index" is not a path')
    resolve = _resolver(folder, manifest)
    resolved = {**manifest, "tasks": {}}
    if manifest.get("index"):
        resolved["index"] = resolve(manifest["index"], False)
    for name, entry in tasks.items():
        resolved["tasks"][name] = {k: resolve(v, k == "run_file") if k in PATH_FIELDS else v for k, v in entry.items()}
    return resolved


def _resolver(folder: Path, manifest: dict[str, Any]) -> Callable[[str, bool], str]:
    """stored path, whether it is one of this folder's run files -> the path to read (see Paths above)."""
    marked = manifest.get("paths") == RELATIVE_TO_RUNS
    writer_cwd = None if marked else _writer_cwd(folder, manifest)

    def resolve(stored: str, own: bool) -> str:
        first = resolve_path(stored, folder) if marked else stored
        candidates = [first]
        if writer_cwd is not None and not os.path.isabs(stored):
            candidates.append(os.path.normpath(os.path.join(writer_cwd, stored)))
        if own:
            candidates.append(str(folder / PurePath(stored).name))
        return next((c for c in candidates if os.path.exists(c)), first)

    return resolve


def _writer_cwd(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The working directory an unmarked manifest's paths are relative to, as seen from the run folder's place:
    a relative run file's stored folder is the run folder (retrieve and rerank write their run files into it)."""
    for entry in manifest["tasks"].values():
        stored = PurePath(entry["run_file"])
        if not stored.is_absolute() and ".." not in stored.parts:
            return os.path.join(folder, *[".."] * len(stored.parent.parts))
    return None


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """runs.json, with this layout's format and version, its paths stored for the folder (see Paths above; give
    them absolute or relative to the working directory), written atomically."""
    fields = {k: v for k, v in manifest.items() if k not in ("format", "version", "paths")}
    if isinstance(fields.get("index"), str):
        fields["index"] = portable_path(fields["index"], folder)
    fields["tasks"] = {
        name: {k: portable_path(v, folder) if k in PATH_FIELDS and isinstance(v, str) else v for k, v in entry.items()}
        for name, entry in manifest["tasks"].items()
    }
    head = {"format": FORMAT, "version": VERSION, "paths": RELATIVE_TO_RUNS}
    return atomic_write(Path(folder) / MANIFEST, json.dumps({**head, **fields}, indent=1))


def relocate(
    manifest: dict[str, Any], tasks: Mapping[str, str | Path] | None = None, index: str | None = None
) -> dict[str, Any]:
    """A (read) manifest with its task folders (`tasks`: task name -> folder) and its index named anew, for a run
    folder whose data went elsewhere: each task's qrels, task file, queries and, in the local setting, pool ids
    come from its folder in `tasks`; the index, and in the global setting the pool ids, from `index`."""
    out = {**manifest, "tasks": {name: dict(entry) for name, entry in manifest["tasks"].items()}}
    if index is not None:
        out["index"] = str(index)
    for name, entry in out["tasks"].items():
        if tasks is not None:
            if name not in tasks:
                raise LamraError(f"the task folders given hold no folder of task {name} (they hold {sorted(tasks)})")
            task = Path(tasks[name])
            entry.update(qrels_file=str(qrels_file(task)), task_file=str(task / TASK_FILE))
            entry["queries"] = str(query_shards(task))
            if out["pool"] == "local":
                entry["pool_ids"] = str(pool_ids_file(task))
        if index is not None and out["pool"] != "local":
            entry["pool_ids"] = str(Path(index) / IDS)
    return out


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


def read_pair_scores(path: str | Path) -> dict[str, dict[str, float]]:
    """qid -> {did: rerank score} from a scores/<task>.tsv file, checked: five tab-separated fields a line, a finite
    rerank score, no pair twice (a LamraError names the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise LamraError(f"scores file {path} does not exist")
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            qid, did, value = fields[0], fields[1], float(fields[4])
        except (IndexError, ValueError):
            value = float("nan")
        if len(fields) != 5 or not np.isfinite(value):
            raise LamraError(
                f"{path}:{number}: expected 'qid did retrieval_rank retrieval_score rerank_score' with a "
                f"finite rerank score, got {line[:200]!r}"
            )
        if did in scores[qid]:
            raise LamraError(f"{path}:{number}: query {qid} scores candidate {did} twice")
        scores[qid][did] = value
    return dict(scores)
