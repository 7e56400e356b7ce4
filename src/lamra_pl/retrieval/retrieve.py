"""Queries of evaluation task folders against an index -> one TREC run file per task and pool setting.

    OUT/queries/<task>/      the task's query embeddings (an index folder; reused if complete, resumable)
    OUT/<pool>/<task>.run    TREC run: `qid Q0 did rank score tag`, the top k per query
    OUT/<pool>/runs.json     per task: run file, qrels file, task file, query shards, ids of the pool searched
                             (for `evaluate`, `rerank`, `rerank-data`)

Pool settings: "global" searches the whole index (M-BEIR's global pool when the index is of `global_pool/`);
"local" restricts the search to the task's own pool (`<task>/pool/ids.txt`), as M-BEIR_local does.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import Trainer

from lamra_pl.data.shards import POOL_IDS
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.retrieval.encode import Job, encode
from lamra_pl.retrieval.evaluate import MANIFEST, query_shards, task_info
from lamra_pl.retrieval.index import EmbeddingIndex, probe_embeddings
from lamra_pl.retrieval.runs import format_run
from lamra_pl.retrieval.search import Backend, search

Pool = Literal["local", "global"]


def task_dirs(spec: str) -> list[Path]:
    """Evaluation task folders from a glob ("data/eval/test/*_task*", or "data/train/*_task*": training folders
    are tasks on the training pool too) or one folder."""
    found = sorted(Path(p) for p in glob.glob(spec) if (Path(p) / "task.json").is_file())
    if not found:
        raise LamraError(f"no evaluation task folder (with task.json) matches {spec!r}")
    return found


def retrieve(
    module: ContrastiveSteps,
    index_dir: str,
    queries: str,
    out: str,
    *,
    model_path: str,
    k: int = 50,
    pools: tuple[Pool, ...] = ("local", "global"),
    backend: Backend = "auto",
    instruction_seed: int | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    trainer: Trainer | None = None,
) -> dict[str, Path]:
    """Encode each task's queries, search the index, write run files; returns {pool: run folder} on rank 0."""
    index = EmbeddingIndex(index_dir)
    probe = probe_embeddings(module)
    index.check_model(probe)
    tasks = task_dirs(queries)
    out_dir = Path(out)
    subsets = {t.name: _local_rows(t, index) for t in tasks} if "local" in pools else {}
    jobs = [Job(str(out_dir / "queries" / t.name), (str(query_shards(t)),), "queries") for t in tasks]
    if not encode(
        module,
        jobs,
        model_path=model_path,
        batch_size=batch_size,
        num_workers=num_workers,
        instruction_seed=instruction_seed,
        trainer=trainer,
        probe=probe,
    ):
        return {}
    written: dict[str, Path] = {}
    for pool in pools:
        entries: dict[str, dict[str, Any]] = {}
        files: dict[Path, str] = {}
        for task in tasks:
            encoded = EmbeddingIndex(out_dir / "queries" / task.name)
            found = search(
                index.embeddings,
                encoded.embeddings,
                k,
                tie_key=index.id_rank,
                subset=subsets.get(task.name) if pool == "local" else None,
                backend=backend,
            )
            ranked = [[index.ids[r] for r in row if r >= 0] for row in found.rows]
            run_file = out_dir / pool / f"{task.name}.run"
            files[run_file] = format_run(encoded.ids, ranked, found.scores, tag=f"lamra-pl-{pool}")
            entries[task.name] = {
                "run_file": str(run_file),
                "qrels_file": str(task / "qrels.txt"),
                "task_file": str(task / "task.json"),
                "queries": str(query_shards(task)),
                "pool_ids": str(task / "pool" / POOL_IDS) if pool == "local" else str(index.path / "ids.txt"),
            }
        for path, text in files.items():
            atomic_write(path, text)
        manifest = {
            "pool": pool,
            "index": str(index.path),
            "k": k,
            "instruction_seed": instruction_seed,
            "tasks": entries,
        }
        atomic_write(out_dir / pool / MANIFEST, json.dumps(manifest, indent=1))
        written[pool] = out_dir / pool
    return written


def _local_rows(task: Path, index: EmbeddingIndex) -> np.ndarray:
    """The index rows of the task's own pool; every one of its ids must be in the index."""
    task_info(task)
    ids_file = task / "pool" / POOL_IDS
    if not ids_file.is_file():
        raise LamraError(f"{ids_file} does not exist: convert the data again with `lamra-pl convert-mbeir`")
    ids = ids_file.read_text().splitlines()
    missing = [i for i in ids if i not in index.row_of]
    if missing:
        raise LamraError(
            f"{len(missing)} candidates of {ids_file} are not in the index {index.path}, e.g. {missing[:3]}: "
            "index the global pool (or this task's pool) of the same split"
        )
    return np.sort(np.fromiter((index.row_of[i] for i in ids), dtype=np.int64, count=len(ids)))
