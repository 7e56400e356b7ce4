"""`lamra-pl retrieve`: the queries of task folders against an index -> one run folder per pool setting.

    OUT/queries/<task>/      the task's query embeddings (an index folder; reused if complete, resumable)
    OUT/<pool>/              a run folder (`lamra_pl.formats.runs`): a TREC run per task, the top k per query, and
                             runs.json (for `evaluate`, `rerank`, `rerank-data`, `mine`)

Pool settings: "global" searches the whole index (M-BEIR's global pool when the index is of `global_pool/`);
"local" restricts the search to the task's own pool (`<task>/pool/ids.txt`), as M-BEIR_local does; a task with
per-query galleries (`galleries.jsonl`, GeneCIS) ranks each query's own gallery there. A task with exclusions
(`excluded.jsonl`, VIST) leaves each query's listed candidates out of its ranking, in both settings.

Everything that can be checked without the model is checked before it is loaded: the index, the task folders, and
in the local setting each task's pool (not empty, all of it in the index). The run folders name the index and the
task files relative to themselves (`lamra_pl.formats.runs`: Paths).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from lamra_pl.data.items import Job
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.index import IDS, EmbeddingIndex
from lamra_pl.formats.runs import format_run, write_manifest
from lamra_pl.formats.settings import ModelSettings, module_args
from lamra_pl.formats.task import (
    GALLERIES_FILE,
    TASK_FILE,
    pool_ids,
    pool_ids_file,
    qrels_file,
    query_shards,
    read_excluded,
    read_galleries,
    task_dirs,
    task_info,
)
from lamra_pl.models.checkpoints import caller_settings, load_retriever
from lamra_pl.pipelines.encode import encode, lists_no_id
from lamra_pl.pipelines.trainer import TrainerSpec
from lamra_pl.ranking.search import Backend, TopK, leave_out, search

Pool = Literal["local", "global"]


def retrieve(
    model: str,
    index: str,
    queries: str,
    out: str,
    k: int = 50,
    pools: list[Pool] = ["local", "global"],  # noqa: B006 - jsonargparse reads the default
    backend: Backend = "auto",
    instruction_seed: int | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    trainer: TrainerSpec | None = None,
    backbone: str | None = None,
    trust_remote_code: bool = False,
    settings: ModelSettings | None = None,
) -> dict[str, Path]:
    """Search an index with the queries of evaluation tasks: a TREC run file per task and pool setting.

    Args:
        model: the checkpoint that built the index (checked against the index's probe embeddings).
        index: an index folder written by `lamra-pl index`.
        queries: evaluation task folders, a glob such as "data/eval/test/*_task*".
        out: output folder: queries/<task>/ (query embeddings), <pool>/<task>.run and <pool>/runs.json.
        k: candidates kept per query (50 is enough for reranking).
        pools: "local" restricts each task to its own pool (pool/ids.txt); "global" searches the whole index.
        backend: faiss (IndexFlatIP; GPUs with faiss-gpu), torch, or auto (faiss when installed).
        instruction_seed: none: each task's first instruction; an int: one drawn per query, seeded by (seed, qid).
        batch_size: queries per forward pass.
        num_workers: data loader processes per device.
        trainer: the devices and precision to encode the queries with.
        backbone: the backbone folder of a checkpoint whose backbone is no longer where it says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
        settings: how the model reads its inputs (`--settings.rope 1d`, `--settings.max_pixels N`, ...): for a
            folder without lamra-pl's settings file, or to change what the model records. `--settings.dim D`:
            the Matryoshka dimension the index was built at.
    """
    searched = EmbeddingIndex(index)
    tasks = task_dirs(queries)
    out_dir = Path(out)
    subsets = {t.name: _local_rows(t, searched) for t in tasks} if "local" in pools else {}
    gallery_rows = {t.name: rows for t in tasks if "local" in pools and (rows := _gallery_rows(t, searched))}
    excluded_rows = {t.name: rows for t in tasks if (rows := _excluded_rows(t, searched))}
    module = load_retriever(
        model, backbone=caller_settings(backbone, trust_remote_code, settings), module=module_args(settings)
    )
    probe = module.probe_embeddings()
    searched.check_model(probe)
    jobs = [Job(str(out_dir / "queries" / t.name), (str(query_shards(t)),), "queries") for t in tasks]
    runner = (trainer or TrainerSpec()).build()
    settings = {"batch_size": batch_size, "num_workers": num_workers, "instruction_seed": instruction_seed}
    if not encode(module, jobs, model_path=model, trainer=runner, probe=probe, **settings):
        return {}
    written: dict[str, Path] = {}
    for pool in pools:
        entries: dict[str, dict[str, Any]] = {}
        files: dict[Path, str] = {}
        for task in tasks:
            encoded = EmbeddingIndex(out_dir / "queries" / task.name)
            excluded = excluded_rows.get(task.name, {})
            wide = k + max((len(rows) for rows in excluded.values()), default=0)  # room for what is left out
            if pool == "local" and task.name in gallery_rows:
                found = _search_galleries(searched, encoded, gallery_rows[task.name], wide, backend, task)
            else:
                found = search(
                    searched.embeddings,
                    encoded.embeddings,
                    wide,
                    tie_key=searched.id_rank,
                    subset=subsets.get(task.name) if pool == "local" else None,
                    backend=backend,
                )
            found = leave_out(found, encoded.ids, excluded, k)
            ranked = [[searched.ids[r] for r in row if r >= 0] for row in found.rows]
            run_file = out_dir / pool / f"{task.name}.run"
            files[run_file] = format_run(encoded.ids, ranked, found.scores, tag=f"lamra-pl-{pool}")
            entries[task.name] = {
                "run_file": str(run_file),
                "qrels_file": str(qrels_file(task)),
                "task_file": str(task / TASK_FILE),
                "queries": str(query_shards(task)),
                "pool_ids": str(pool_ids_file(task)) if pool == "local" else str(searched.path / IDS),
            }
        for path, text in files.items():
            atomic_write(path, text)
        manifest = {"pool": pool, "index": str(searched.path), "k": k, "instruction_seed": instruction_seed}
        write_manifest(out_dir / pool, {**manifest, "tasks": entries})
        written[pool] = out_dir / pool
    for pool, folder in written.items():
        print(f"{pool} pool: run files in {folder}; score them with: lamra-pl evaluate --runs {folder}")
    return written


def _local_rows(task: Path, index: EmbeddingIndex) -> np.ndarray:
    """The index rows of the task's own pool; it must hold candidates, and every one of its ids must be in the
    index."""
    task_info(task)
    ids = pool_ids(task)
    if lists_no_id(pool_ids_file(task)):
        raise LamraError(
            f"task {task}: its local pool ({pool_ids_file(task)}) is empty, so the local setting has nothing to "
            "search; convert the task again, or retrieve with --pools '[global]'"
        )
    missing = [i for i in ids if i not in index.row_of]
    if missing:
        raise LamraError(
            f"{len(missing)} candidates of {pool_ids_file(task)} are not in the index {index.path}, e.g. "
            f"{missing[:3]}: index the global pool (or this task's pool) of the same split"
        )
    return np.sort(np.fromiter((index.row_of[i] for i in ids), dtype=np.int64, count=len(ids)))


def _gallery_rows(task: Path, index: EmbeddingIndex) -> dict[str, np.ndarray] | None:
    """qid -> the sorted index rows of its own gallery (the task's galleries.jsonl, GeneCIS), or None."""
    found = read_galleries(task)
    if found is None:
        return None
    missing = sorted({i for ids in found.values() for i in ids if i not in index.row_of})
    if missing:
        raise LamraError(
            f"{len(missing)} gallery candidates of {task / GALLERIES_FILE} are not in the index {index.path}, e.g. "
            f"{missing[:3]}: index the global pool of the same split"
        )
    return {qid: np.unique(np.fromiter((index.row_of[i] for i in ids), dtype=np.int64)) for qid, ids in found.items()}


def _excluded_rows(task: Path, index: EmbeddingIndex) -> dict[str, np.ndarray]:
    """qid -> the index rows its ranking leaves out (the task's excluded.jsonl, VIST); ids the index lacks could
    never be returned, so they need no leaving out. {} for a task without exclusions."""
    found = read_excluded(task) or {}
    return {
        qid: np.fromiter((index.row_of[i] for i in dict.fromkeys(ids) if i in index.row_of), dtype=np.int64)
        for qid, ids in found.items()
    }


def _search_galleries(
    index: EmbeddingIndex, encoded: EmbeddingIndex, rows: dict[str, np.ndarray], k: int, backend: Backend, task: Path
) -> TopK:
    """Each query ranked within its own gallery (the local setting of a task with galleries.jsonl): the top k of
    its gallery, padded with -1 to the widest."""
    missing = [q for q in encoded.ids if q not in rows]
    if missing:
        raise LamraError(f"{len(missing)} queries of {task} have no line in {GALLERIES_FILE}, e.g. {missing[:3]}")
    out_rows = np.full((len(encoded.ids), k), -1, dtype=np.int64)
    out_scores = np.full((len(encoded.ids), k), -np.inf)
    for q, qid in enumerate(encoded.ids):
        found = search(
            index.embeddings,
            encoded.embeddings[q : q + 1],
            k,
            tie_key=index.id_rank,
            subset=rows[qid],
            backend=backend,
        )
        out_rows[q], out_scores[q] = found.rows[0], found.scores[0]
    return TopK(out_rows, out_scores)
