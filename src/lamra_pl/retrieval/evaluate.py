"""M-BEIR evaluation: rankings + qrels -> Recall@K per (dataset, task) and the average, as JSON and Markdown.

`lamra-pl evaluate RUNS` scores the run files that `lamra-pl retrieve` wrote (its `runs.json` names, per task,
the run file, the qrels file, the task file and the ids of the pool searched). Validation during `fit` and
`lamra-pl validate` call `score_task` too, on rankings they computed in memory with the same search.

results.json:
    {"pool": "local" | "global",
     "tasks": {TASK: {"R@1": x, "R@5": x, "R@10": x, "reported": "R@5", "run_file": PATH, "qrels_file": PATH,
                      "num_queries": n}},
     "average": {"R@1": x, "R@5": x, "R@10": x, "reported": x}}
"reported" is M-BEIR's metric for the task (R@10 for Fashion200K and FashionIQ, R@5 elsewhere); the average's
"reported" is M-BEIR's headline number, the unweighted mean of the tasks' reported metrics.

`evaluate` also measures MM-Embed's modality bias when the run folder's index is at hand (every `retrieve` and
`rerank` folder names it): "wrong_modality@10", per task and averaged, is the share of each query's top 10 whose
modality (from the index's items) is not the modality of the query's positives. It matters in a mixed-modality
(global) pool; a task's local pool usually holds its target modality only, so it reads 0 there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.retrieval.index import EmbeddingIndex
from lamra_pl.retrieval.metrics import RANK_PAD, pad_positives, recall_at_k, wrong_modality
from lamra_pl.retrieval.runs import read_qrels, read_run
from lamra_pl.retrieval.search import id_ranks, search

KS = (1, 5, 10)
BIAS_K = 10  # wrong_modality@BIAS_K
MANIFEST = "runs.json"


def score_task(
    qids: list[str],
    ranked: np.ndarray,
    row_of: dict[str, int],
    qrels: dict[str, set[str]],
    ks: tuple[int, ...] = KS,
    qrels_file: str = "qrels",
) -> dict[str, float]:
    """Recall@K of rankings given as [Q, K] pool row numbers (RANK_PAD for missing results); `row_of` maps each
    pool id to its row.

    Every query needs at least one qrels line. Positives absent from the pool count (they cannot be found).
    """
    no_qrels = [q for q in qids if not qrels.get(q)]
    if no_qrels:
        raise LamraError(f"{len(no_qrels)} queries have no positive in {qrels_file}, e.g. {no_qrels[:3]}")
    positives = pad_positives([[row_of[d] for d in qrels[q] if d in row_of] for q in qids])
    return recall_at_k(ranked, positives, ks)


def query_shards(task_dir: Path) -> Path:
    """A task's query shard folder: `queries/` in an evaluation task, the folder itself in a training task."""
    return task_dir / "queries" if (task_dir / "queries").is_dir() else task_dir


def task_info(task_dir: Path) -> dict[str, Any]:
    path = task_dir / "task.json"
    if not path.is_file():
        raise LamraError(f"{task_dir} is not an evaluation task folder (no task.json; see `lamra-pl convert-mbeir`)")
    return json.loads(path.read_text())


def summarise(tasks: dict[str, dict[str, Any]], ks: tuple[int, ...] = KS) -> dict[str, float]:
    if not tasks:
        return {}
    average = {f"R@{k}": float(np.mean([t[f"R@{k}"] for t in tasks.values()])) for k in ks}
    average["reported"] = float(np.mean([t[t["reported"]] for t in tasks.values()]))
    bias = f"wrong_modality@{BIAS_K}"
    if all(bias in t for t in tasks.values()):
        average[bias] = float(np.mean([t[bias] for t in tasks.values()]))
    return average


def evaluate_embeddings(
    groups: dict[str, dict[str, tuple[list[str], np.ndarray]]], ks: tuple[int, ...] = KS
) -> dict[str, Any]:
    """Evaluate tasks from in-memory embeddings: {task_dir: {"queries": (ids, emb), "pool": (ids, emb)}}.

    Embeddings are rounded to float16 first, as an index stores them, so the numbers equal `index`+`retrieve`.
    """
    tasks: dict[str, dict[str, Any]] = {}
    for task_dir, parts in sorted(groups.items()):
        info = task_info(Path(task_dir))
        (qids, queries), (pool_ids, pool) = parts["queries"], parts["pool"]
        found = search(
            pool.astype(np.float16), queries.astype(np.float16), max(ks), tie_key=id_ranks(pool_ids), backend="torch"
        )
        qrels_file = Path(task_dir) / "qrels.txt"
        row_of = {i: row for row, i in enumerate(pool_ids)}
        scores = score_task(qids, found.rows, row_of, read_qrels(qrels_file), ks, str(qrels_file))
        tasks[Path(task_dir).name] = {**scores, "reported": f"R@{info['recall_k']}", "num_queries": len(qids)}
    return {"tasks": tasks, "average": summarise(tasks, ks)}


def evaluate_runs(runs_dir: str | Path, ks: tuple[int, ...] = KS) -> dict[str, Any]:
    """Score every run file listed in `runs_dir/runs.json`; validates everything before anything is written."""
    runs_dir = Path(runs_dir)
    manifest_file = runs_dir / MANIFEST
    if not manifest_file.is_file():
        raise LamraError(f"{runs_dir} has no {MANIFEST}: give a folder written by `lamra-pl retrieve`")
    manifest = json.loads(manifest_file.read_text())
    modality_of = _modalities(manifest.get("index"))
    tasks: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, int]] = {}  # id -> row per pool file: the global pool is shared by every task
    for name, entry in manifest["tasks"].items():
        run_file, qrels_file = Path(entry["run_file"]), Path(entry["qrels_file"])
        info = json.loads(Path(entry["task_file"]).read_text())
        if entry["pool_ids"] not in pools:
            ids = Path(entry["pool_ids"]).read_text().splitlines()
            pools[entry["pool_ids"]] = {i: row for row, i in enumerate(ids)}
        row_of = pools[entry["pool_ids"]]
        run = read_run(run_file)
        qrels = read_qrels(qrels_file)
        ranked = _rows(run.ranked, row_of, run_file, entry["pool_ids"], max(ks))
        missing = sorted(set(qrels) - set(run.qids))
        if missing:
            raise LamraError(
                f"{run_file} has no ranking for {len(missing)} queries of {qrels_file}, e.g. {missing[:3]}"
            )
        scores = score_task(run.qids, ranked, row_of, qrels, ks, str(qrels_file))
        tasks[name] = {
            **scores,
            "reported": f"R@{info['recall_k']}",
            "run_file": str(run_file),
            "qrels_file": str(qrels_file),
            "num_queries": len(run.qids),
        }
        if modality_of is not None:
            targets = [next((modality_of[d] for d in sorted(qrels[q]) if d in modality_of), None) for q in run.qids]
            share = wrong_modality(run.ranked, targets, modality_of, BIAS_K)
            if not np.isnan(share):  # no query with a positive in the index: no measure, rather than NaN
                tasks[name][f"wrong_modality@{BIAS_K}"] = share
    return {"pool": manifest["pool"], "tasks": tasks, "average": summarise(tasks, ks)}


def _modalities(index: str | None) -> dict[str, str] | None:
    """id -> modality of the index a run folder searched, or None when it is not at hand (moved, or a hand-made
    manifest without one): then there is no modality-bias column, and nothing else changes."""
    if not index or not (Path(index) / "items.jsonl").is_file():
        return None
    found = EmbeddingIndex(index)
    return dict(zip(found.ids, found.modalities, strict=True))


def _rows(ranked: list[list[str]], row_of: dict[str, int], run_file: Path, pool_file: str, depth: int) -> np.ndarray:
    width = max(depth, max((len(r) for r in ranked), default=0))
    out = np.full((len(ranked), width), RANK_PAD, dtype=np.int64)
    for q, ids in enumerate(ranked):
        try:
            out[q, : len(ids)] = [row_of[d] for d in ids]
        except KeyError as err:
            raise LamraError(
                f"{run_file} ranks id {err.args[0]!r}, which is not in the pool searched ({pool_file})"
            ) from None
    return out


def markdown(results: dict[str, Any], ks: tuple[int, ...] = KS) -> str:
    bias = f"wrong_modality@{BIAS_K}"
    extra = [bias] if bias in results["average"] else []
    head = "| task | queries | " + " | ".join([*(f"R@{k}" for k in ks), "reported", *extra]) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 3 + len(extra))]
    for name, t in results["tasks"].items():
        cells = [f"{100 * t[f'R@{k}']:.1f}" for k in ks] + [f"{t['reported']} {100 * t[t['reported']]:.1f}"]
        cells += [f"{100 * t[m]:.1f}" for m in extra]
        lines.append(f"| {name} | {t['num_queries']} | " + " | ".join(cells) + " |")
    avg = results["average"]
    if avg:
        cells = [f"{100 * avg[f'R@{k}']:.1f}" for k in ks] + [f"{100 * avg['reported']:.1f}"]
        cells += [f"{100 * avg[m]:.1f}" for m in extra]
        lines.append("| **average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_hparams(runs_dir: str | Path) -> dict[str, Any]:
    """What an evaluation evaluated, from its manifest: the retriever, index, pool and depth, and any reranking."""
    manifest = json.loads((Path(runs_dir) / MANIFEST).read_text())
    index = manifest.get("index")
    meta_file = Path(index) / "index.json" if index else None
    model = json.loads(meta_file.read_text())["model"].get("path") if meta_file and meta_file.is_file() else None
    hparams = {"retriever": model, "index": index, "pool": manifest["pool"], "k": manifest.get("k")}
    hparams["instruction_seed"] = manifest.get("instruction_seed")
    rerank = manifest.get("rerank")
    if rerank:
        hparams.update({"reranker": rerank["model"], "rerank_mode": rerank["mode"], "rerank_top_n": rerank["top_n"]})
        weights = set(rerank["fusion"].values())
        hparams["fusion_w"] = weights.pop() if len(weights) == 1 else json.dumps(rerank["fusion"], sort_keys=True)
    return hparams


def save_results(
    results: dict[str, Any], runs_dir: str | Path, step: int = 0, log_to: str | Path | None = None
) -> Path:
    """results.json and results.md in `runs_dir`, and the numbers to TensorBoard; returns the TensorBoard folder.

    The TensorBoard run is `runs_dir` itself, or `log_to` (e.g. the fit that trained the model evaluated). It gets
    the numbers as scalars `eval_<pool>/<task>/<metric>` at `step`, and once as hparams with the final metrics
    `hp/<task>/<metric>` (what `FinalMetrics` logs at the end of a fit), so `lamra-pl report` tabulates either.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    from lamra_pl.report import FINAL, read_hparams, read_run

    runs_dir = Path(runs_dir)
    board = Path(log_to) if log_to is not None else runs_dir
    if log_to is not None and not board.is_dir():
        raise LamraError(f"--log_to {str(log_to)!r} is not a folder (give a run folder, e.g. runs/grid/lamra)")
    if log_to is not None and any(board.glob("events.out.tfevents.*")) and read_run(board, board).finished:
        # hp/<task>/<metric> names carry no pool or split: a second set would silently replace the first.
        raise LamraError(f"--log_to {str(log_to)!r} already has final metrics (hp/*): log into a run without them")
    logger = TensorBoardLogger(str(board), name="", version="", default_hp_metric=False)
    named = {f"{name}/{m}": v for name, t in results["tasks"].items() for m, v in t.items() if _metric(m)}
    named.update({f"average/{m}": v for m, v in results["average"].items()})
    logger.log_metrics({f"eval_{results.get('pool', 'pool')}/{m}": v for m, v in named.items()}, step=step)
    hparams = evaluation_hparams(runs_dir)
    if log_to is not None:  # the run's own hyperparameters first, so TensorBoard's HParams tab shows them
        hparams = {**read_hparams(board), **{f"eval.{k}": v for k, v in hparams.items()}}
    logger.log_hyperparams(hparams, {FINAL + m: v for m, v in named.items()})
    logger.finalize("success")
    # Last: a grid step is done when results.json exists, so it must not exist before the logging is.
    atomic_write(runs_dir / "results.md", markdown(results) + "\n")
    atomic_write(runs_dir / "results.json", json.dumps(results, indent=1))
    return board


def _metric(name: str) -> bool:
    return name.startswith(("R@", "wrong_modality@"))
