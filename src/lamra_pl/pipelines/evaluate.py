"""`lamra-pl evaluate`: a run folder's rankings + qrels -> Recall@K per (dataset, task) and the average, as JSON,
Markdown and a TensorBoard run; `lamra-pl chance`: what random rankings would score on the same tasks.

`evaluate` scores the run files that `lamra-pl retrieve` (or `rerank`) wrote: its runs.json names, per task, the
run file, the qrels file, the task file and the ids of the pool searched (`lamra_pl.formats.runs`), relative to the
run folder, so a folder moved with its data evaluates from anywhere; `--tasks` and `--index` say where the task
folders and the index are when they went elsewhere. Validation during `fit` scores rankings it searched in memory
with the same `ranking.metrics.score_task`.

results.json:
    {"pool": "local" | "global",
     "tasks": {TASK: {"R@1": x, "R@5": x, "R@10": x, "reported": "R@5", "run_file": PATH, "qrels_file": PATH,
                      "num_queries": n[, "wrong_modality@10": x],
                      "dataset_id": 9, "task_id": 0, "mbeir_name": "mbeir_mscoco_task0",
                      "chance": {"R@1": x, "R@5": x, "R@10": x}}},
     "average": {"R@1": x, "R@5": x, "R@10": x, "reported": x[, "wrong_modality@10": x]}}
A task whose task.json (version 2) lists more metrics has them too (CIRCO's "mAP@5".."mAP@50", GeneCIS's "R@2",
"R@3"; `ranking.metrics`), averaged when every task has them, and its "reported" is the metric task.json names.
"reported" is M-BEIR's metric for the task (R@10 for Fashion200K and FashionIQ, R@5 elsewhere); the average's
"reported" is M-BEIR's headline number, the unweighted mean of the tasks' reported metrics. "dataset_id" is
M-BEIR's dataset id, the prefix of the task's query ids ("9:1234"; null when they have none or several), "task_id"
and the dataset's name are the task folder's (task.json), and "mbeir_name" is M-BEIR's name of the unit (its file
names' `mbeir_<dataset>_task<N>`). "chance" is the Recall@K of a random ranking of the pool searched (`chance`'s
formula, counting the positives that are in that pool). Files written before these four fields read as they were:
nothing reads results.json back but people and their tools (`lamra-pl report` reads the TensorBoard run).

The TensorBoard numbers are logged at the training step of the checkpoint evaluated (the reranker's in a reranked
folder, else the retriever's that the index names; 0 for a model folder), so they line up with that fit's curves.

MM-Embed's modality bias is measured when the run folder's index is at hand (every `retrieve` and `rerank` folder
names it): "wrong_modality@10", per task and averaged, is the share of each query's top 10 whose modality (from the
index's items) is not the modality of the query's positives. It matters in a mixed-modality (global) pool; a task's
local pool usually holds its target modality only, so it reads 0 there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.checkpoint import global_step
from lamra_pl.formats.index import EmbeddingIndex, is_complete
from lamra_pl.formats.runs import RESULTS, read_manifest, read_run_file, relocate
from lamra_pl.formats.task import TASK_FILE, qrels_file, read_qrels, reported_metric, task_dirs, task_info, task_metrics
from lamra_pl.formats.tensorboard import EVENTS, read_board, read_hparams, write_evaluation
from lamra_pl.ranking.metrics import BIAS_K, KS, RANK_PAD, metric_depth, score_task, summarise, wrong_modality
from lamra_pl.ranking.metrics import chance as chance_level


def evaluate(
    runs: str, step: int | None = None, log_to: str | None = None, tasks: str | None = None, index: str | None = None
) -> dict[str, Any]:
    """Score a run folder: M-BEIR Recall@K per task and averaged, and MM-Embed's modality bias.

    The bias is the share of wrong-modality results in each query's top 10. Writes results.json and results.md,
    logs the numbers to TensorBoard (scalars, and hparams with final `hp/*` metrics for `lamra-pl report`) and
    prints the table.

    Args:
        runs: a run folder written by `lamra-pl retrieve` (holds runs.json).
        step: the TensorBoard step to log the numbers at; by default the training step of the checkpoint evaluated
            (the reranker's for a reranked folder, else the retriever's), 0 for a model folder.
        log_to: a TensorBoard run folder to log into instead of RUNS, e.g. the fit that trained the model, whose
            report row then shows these numbers (a reranker fit, which validates nothing itself).
        tasks: where the task folders are, when not where runs.json says (moved data): the folder that holds
            them, or a glob such as "data/eval/test/*_task*"; each task is found by its folder's name.
        index: where the searched index is, when not where runs.json says (the global pool's ids, the modality
            bias).
    """
    results = evaluate_runs(runs, tasks=tasks, index=index)
    if step is None:
        step, source = checkpoint_step(runs, index)
    else:
        source = "--step"
    board = save_results(results, runs, step=step, log_to=log_to, index=index)
    print(markdown(results))
    print(f"\n{Path(runs) / RESULTS}; TensorBoard: {board}, step {step} ({source})")
    return results


def checkpoint_step(runs_dir: str | Path, index: str | None = None) -> tuple[int, str]:
    """The training step of the checkpoint a run folder's rankings come from (the reranker's when it was reranked,
    else the retriever's that the index names), 0 when that is a model folder or not at hand; and where it came
    from, in words."""
    manifest = read_manifest(runs_dir)
    rerank = manifest.get("rerank")
    model = rerank.get("model") if rerank else _retriever(index if index is not None else manifest.get("index"))
    if not model:
        return 0, "no model named"
    if not Path(model).exists():
        return 0, f"{model} is not there to read its step"
    try:
        found = global_step(model)
    except LamraError as err:  # the step is where the numbers are drawn, not what they are: they are still logged
        return 0, f"no step read: {err}"
    return (found, f"the step of {model}") if found is not None else (0, f"{model} is a model folder")


def _retriever(index: str | None) -> str | None:
    """The model an index was encoded with, as given to `lamra-pl index`; None when the index is not at hand."""
    return EmbeddingIndex(index).meta["model"].get("path") if index and is_complete(index) else None


def load_manifest(runs_dir: str | Path, tasks: str | None = None, index: str | None = None) -> dict[str, Any]:
    """A run folder's manifest, its paths resolved, with the task folders (`tasks`) and index given anew."""
    manifest = read_manifest(runs_dir)
    if tasks is None and index is None:
        return manifest
    return relocate(manifest, _task_folders(tasks) if tasks is not None else None, index)


def _task_folders(spec: str) -> dict[str, Path]:
    """Task name -> folder, from a folder of task folders, a task folder, or a glob of them."""
    folder = Path(spec).expanduser()
    if folder.is_dir() and not (folder / TASK_FILE).is_file():
        spec = str(folder / "*")
    return {task.name: task for task in task_dirs(spec)}


def evaluate_runs(
    runs_dir: str | Path, ks: tuple[int, ...] = KS, tasks: str | None = None, index: str | None = None
) -> dict[str, Any]:
    """Score every run file listed in `runs_dir/runs.json` (with the task folders and index given anew, if given);
    validates everything before anything is written."""
    manifest = load_manifest(runs_dir, tasks, index)
    modality_of = _modalities(manifest.get("index"))
    scored: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, int]] = {}  # id -> row per pool file: the global pool is shared by every task
    for name, entry in manifest["tasks"].items():
        run_file, qrels_path = Path(entry["run_file"]), Path(entry["qrels_file"])
        task_dir = Path(entry["task_file"]).parent
        if not task_dir.is_dir():
            raise LamraError(
                f"task {name}'s folder {task_dir} (from {Path(runs_dir) / 'runs.json'}) is not there; if the data "
                "moved, give --tasks: the folder that holds the task folders now"
            )
        info = task_info(task_dir)
        if entry["pool_ids"] not in pools:
            if not Path(entry["pool_ids"]).is_file():
                where = "--tasks (the task folders)" if manifest["pool"] == "local" else "--index"
                raise LamraError(
                    f"{entry['pool_ids']}, the ids of the pool task {name} was searched in, is not there; if it "
                    f"moved, give {where} where it is now"
                )
            ids = Path(entry["pool_ids"]).read_text().splitlines()
            pools[entry["pool_ids"]] = {i: row for row, i in enumerate(ids)}
        row_of = pools[entry["pool_ids"]]
        run = read_run_file(run_file)
        qrels = read_qrels(qrels_path)
        metrics = task_metrics(info)
        ranked = _rows(run.ranked, row_of, run_file, entry["pool_ids"], max(max(ks), metric_depth(metrics)))
        missing = sorted(set(qrels) - set(run.qids))
        if missing:
            raise LamraError(
                f"{run_file} has no ranking for {len(missing)} queries of {qrels_path}, e.g. {missing[:3]}"
            )
        _check_depth(run.ranked, metrics, len(row_of), run_file, manifest.get("k"))
        scores = score_task(run.qids, ranked, row_of, qrels, ks, str(qrels_path), metrics)
        scored[name] = {
            **scores,
            "reported": reported_metric(info),
            "run_file": str(run_file),
            "qrels_file": str(qrels_path),
            "num_queries": len(run.qids),
            **mbeir_ids(info, run.qids),
        }
        if run.qids:  # a random ranking of the pool searched, its positives counted as that pool holds them
            positives = [sum(d in row_of for d in qrels[q]) for q in run.qids]
            scored[name]["chance"] = chance_level(len(row_of), positives, ks)
        if modality_of is not None:
            targets = [next((modality_of[d] for d in sorted(qrels[q]) if d in modality_of), None) for q in run.qids]
            share = wrong_modality(run.ranked, targets, modality_of, BIAS_K)
            if not np.isnan(share):  # no query with a positive in the index: no measure, rather than NaN
                scored[name][f"wrong_modality@{BIAS_K}"] = share
    return {"pool": manifest["pool"], "tasks": scored, "average": summarise(scored, ks)}


def mbeir_ids(info: dict[str, Any], qids: list[str]) -> dict[str, Any]:
    """M-BEIR's names of a task: its dataset id (the prefix of its query ids, "9" of "9:1234", as a number when it
    is one; None when the ids have no prefix or several), its task id and its name (`mbeir_<dataset>_task<N>`)."""
    prefixes = {q.split(":", 1)[0] for q in qids if ":" in q}
    dataset_id: int | str | None = prefixes.pop() if len(prefixes) == 1 and all(":" in q for q in qids) else None
    if isinstance(dataset_id, str) and dataset_id.isdigit():
        dataset_id = int(dataset_id)
    task = info.get("task_id")
    return {"dataset_id": dataset_id, "task_id": task, "mbeir_name": f"mbeir_{info.get('dataset')}_task{task}"}


def _modalities(index: str | None) -> dict[str, str] | None:
    """id -> modality of the index a run folder searched, or None when it is not at hand (moved, or a hand-made
    manifest without one): then there is no modality-bias column, and nothing else changes."""
    if not index or not is_complete(index):
        return None
    found = EmbeddingIndex(index)
    return dict(zip(found.ids, found.modalities, strict=True))


def _check_depth(ranked: list[list[str]], metrics: list[str], pool: int, run_file: Path, k: Any) -> None:
    """A metric beyond R@1/5/10 (CIRCO's mAP@50) needs rankings that deep (or the whole pool): a shallower run
    would score it low without a word."""
    deepest = max((int(m.split("@")[1]) for m in metrics if m.startswith("mAP@")), default=0)
    need = min(deepest, pool)
    short = next((len(r) for r in ranked if len(r) < need), None)
    if short is not None:
        raise LamraError(
            f"{run_file} ranks {short} candidates for a query, but mAP@{deepest} needs the top {need}: retrieve with "
            f"--k {deepest} or more (this run's k: {k})"
        )


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
    """The results table: R@K, the reported metric, and the columns only some tasks have (a task's metrics beyond
    R@K, e.g. CIRCO's mAP@k; the modality bias), blank where a task has none."""
    bias = f"wrong_modality@{BIAS_K}"
    columns = [f"R@{k}" for k in ks]
    beyond = dict.fromkeys(m for t in results["tasks"].values() for m in t if _metric(m) and m not in columns)
    extra = [m for m in beyond if m != bias] + ([bias] if bias in results["average"] else [])
    head = "| task | queries | " + " | ".join([*columns, "reported", *extra]) + " |"
    lines = [head, "|" + "---|" * (len(ks) + 3 + len(extra))]

    def cell(row: dict[str, Any], metric: str) -> str:
        return f"{100 * row[metric]:.1f}" if metric in row else ""

    for name, t in results["tasks"].items():
        cells = [cell(t, c) for c in columns] + [f"{t['reported']} {100 * t[t['reported']]:.1f}"]
        cells += [cell(t, m) for m in extra]
        lines.append(f"| {name} | {t['num_queries']} | " + " | ".join(cells) + " |")
    avg = results["average"]
    if avg:
        cells = [cell(avg, c) for c in columns] + [f"{100 * avg['reported']:.1f}"]
        cells += [cell(avg, m) for m in extra]
        lines.append("| **average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_hparams(runs_dir: str | Path, index: str | None = None) -> dict[str, Any]:
    """What an evaluation evaluated, from its manifest: the retriever, index (`index`: where it is now, if given),
    pool and depth, and any reranking."""
    manifest = read_manifest(runs_dir)
    index = index if index is not None else manifest.get("index")
    hparams = {"retriever": _retriever(index), "index": index, "pool": manifest["pool"], "k": manifest.get("k")}
    hparams["instruction_seed"] = manifest.get("instruction_seed")
    rerank = manifest.get("rerank")
    if rerank:
        hparams.update({"reranker": rerank["model"], "rerank_mode": rerank["mode"], "rerank_top_n": rerank["top_n"]})
        weights = set(rerank["fusion"].values())
        hparams["fusion_w"] = weights.pop() if len(weights) == 1 else json.dumps(rerank["fusion"], sort_keys=True)
    return hparams


def save_results(
    results: dict[str, Any],
    runs_dir: str | Path,
    step: int = 0,
    log_to: str | Path | None = None,
    index: str | None = None,
) -> Path:
    """results.json and results.md in `runs_dir`, and the numbers to TensorBoard; returns the TensorBoard folder.

    The TensorBoard run is `runs_dir` itself, or `log_to` (e.g. the fit that trained the model evaluated). It gets
    the numbers as scalars `eval_<pool>/<task>/<metric>` at `step`, and once as hparams with the final metrics
    `hp/<task>/<metric>` (what `FinalMetrics` logs at the end of a fit), so `lamra-pl report` tabulates either.
    """
    runs_dir = Path(runs_dir)
    board = Path(log_to) if log_to is not None else runs_dir
    if log_to is not None and not board.is_dir():
        raise LamraError(f"--log_to {str(log_to)!r} is not a folder (give a run folder, e.g. runs/grid/lamra)")
    if log_to is not None and any(board.glob(EVENTS)) and read_board(board, board).finished:
        # hp/<task>/<metric> names carry no pool or split: a second set would silently replace the first.
        raise LamraError(f"--log_to {str(log_to)!r} already has final metrics (hp/*): log into a run without them")
    named = {f"{name}/{m}": v for name, t in results["tasks"].items() for m, v in t.items() if _metric(m)}
    named.update({f"average/{m}": v for m, v in results["average"].items()})
    hparams = evaluation_hparams(runs_dir, index)
    if log_to is not None:  # the run's own hyperparameters first, so TensorBoard's HParams tab shows them
        hparams = {**read_hparams(board), **{f"eval.{k}": v for k, v in hparams.items()}}
    scalars = {f"eval_{results.get('pool', 'pool')}/{m}": v for m, v in named.items()}
    write_evaluation(board, scalars, step, hparams, named)
    # Last: a grid step is done when results.json exists, so it must not exist before the logging is.
    atomic_write(runs_dir / "results.md", markdown(results) + "\n")
    atomic_write(runs_dir / RESULTS, json.dumps(results, indent=1))
    return board


def _metric(name: str) -> bool:
    return name.startswith(("R@", "mAP@", "wrong_modality@"))


def chance(tasks: str, ks: list[int] = list(KS)) -> dict[str, dict[str, float]]:  # noqa: B006 - read by jsonargparse
    """Print the Recall@K of a random ranking on each task's local pool, to read real numbers against.

    Per query 1 - C(N - P, k) / C(N, k) (N candidates, P positives), averaged over the task's queries.

    Args:
        tasks: evaluation task folders, a glob such as "data/eval/test/*_task*".
        ks: the K of Recall@K.
    """
    rows: dict[str, dict[str, float]] = {}
    lines = [f"| task | task id | local pool | chance R@{' / R@'.join(map(str, ks))} (%) |", "|---|---|---|---|"]
    for task in task_dirs(tasks):
        info = task_info(task)
        positives = [len(p) for p in read_qrels(qrels_file(task)).values()]
        rows[task.name] = chance_level(info["pool"], positives, tuple(ks))
        numbers = " / ".join(f"{100 * v:.1f}" for v in rows[task.name].values())
        lines.append(f"| {task.name} | {info['task_id']} | {info['pool']} | {numbers} |")
    print("\n".join(lines))
    return rows


DIRECTIONS = {0: "T2I", 3: "I2T", 7: "CIR"}  # M-BEIR task id -> the column name in LamRA's zero-shot table
VIDEO_SETS = ("msrvtt", "msvd")  # their tasks 0 and 3 are text -> video and video -> text: T2V, V2T
# Their task 7 queries interleave several images with texts (a story, a session), no composed reference: IT2I
INTERLEAVED_SETS = ("vist", "multiturn_fashioniq")


def zeroshot_report(runs: str, sets: list[str] | None = None) -> dict[str, Any]:
    """Put the evaluated zero-shot sets in one table, as LamRA's zero-shot table: each task's reported metric.

    Reads RUNS/<set>/local/results.json (`make zeroshot` writes them), writes RUNS/zeroshot.md and
    RUNS/zeroshot.json, and prints the table: one column per task (set, direction, metric), and below it every
    metric of every task.

    Args:
        runs: the folder holding one run folder per set (`make zeroshot`: runs/zeroshot).
        sets: the sets, in the table's order (default: every RUNS/<set>/local/results.json, sorted).
    """
    folder = Path(runs)
    if sets is None:
        sets = sorted(p.parent.parent.name for p in folder.glob(f"*/local/{RESULTS}"))
    if not sets:
        raise LamraError(f"no {folder}/<set>/local/{RESULTS}: evaluate a set first (make zeroshot)")
    columns: dict[str, float] = {}
    details: dict[str, Any] = {}
    for name in sets:
        path = folder / name / "local" / RESULTS
        if not path.is_file():
            raise LamraError(f"{path} does not exist: set {name!r} was not evaluated (make zeroshot SETS={name})")
        results = json.loads(path.read_text())
        for task, row in results["tasks"].items():
            direction = DIRECTIONS.get(row.get("task_id"), f"task{row.get('task_id')}")
            if name in VIDEO_SETS:
                direction = direction.replace("I", "V")
            elif name in INTERLEAVED_SETS:
                direction = "IT2I"
            columns[f"{task.rsplit('_task', 1)[0]} {direction} {row['reported']}"] = row[row["reported"]]
            details[task] = {m: v for m, v in row.items() if _metric(m)} | {"num_queries": row["num_queries"]}
    head = "| " + " | ".join(columns) + " |"
    table = [head, "|" + "---|" * len(columns), "| " + " | ".join(f"{100 * v:.1f}" for v in columns.values()) + " |"]
    metrics = list(dict.fromkeys(m for row in details.values() for m in row if m != "num_queries"))
    table += ["", "| task | queries | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for task, row in details.items():
        cells = [f"{100 * row[m]:.1f}" if m in row else "" for m in metrics]
        table.append(f"| {task} | {row['num_queries']} | " + " | ".join(cells) + " |")
    text = "\n".join(table)
    report = {"sets": sets, "table": columns, "tasks": details}
    atomic_write(folder / "zeroshot.md", text + "\n")
    atomic_write(folder / "zeroshot.json", json.dumps(report, indent=1))
    print(text)
    return report
