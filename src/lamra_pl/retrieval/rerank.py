"""`lamra-pl rerank`: rerank the top N of a run folder with a RerankModule, fuse, write new run files.

    OUT/<task>.run          the fused ranking: the top N by retrieval + w * rerank score (ties in retrieval order),
                            then the rest of the retrieval run in its order
    OUT/scores/<task>.tsv   `qid did retrieval_rank retrieval_score rerank_score` for every reranked pair
    OUT/runs.json           the input manifest with the new run files (so `lamra-pl evaluate --runs OUT` scores
                            them), each task's `retrieval_run_file`, and what was done ("rerank")

Scoring runs through `Trainer.predict`: query shards are dealt to ranks and data workers, each rank writes its
scores to `OUT/scores/parts/`, and rank 0 fuses once all are in. Candidates are read by id from the pool shards
of the index the runs searched (`CandidateStore`); queries get the instruction the retrieval gave them.
A query with fewer than N retrieved candidates has all of them reranked (counted in runs.json); ids the pool does
not hold are an error, before any scoring.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from lamra_pl.data.candidates import CandidateStore
from lamra_pl.data.schema import Item, decode_record
from lamra_pl.data.shards import evaluation_query, expand_shards
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.models.merge import RERANK_SETTINGS_FILE
from lamra_pl.models.rerank import RerankModule
from lamra_pl.models.rerank_inputs import MAX_LIST, JudgePrompt
from lamra_pl.retrieval.encode import encode_trainer
from lamra_pl.retrieval.evaluate import MANIFEST, task_info
from lamra_pl.retrieval.fusion import GRID, fuse, load_weights, tune_fusion, weight_for
from lamra_pl.retrieval.index import EmbeddingIndex
from lamra_pl.retrieval.runs import Run, format_run, read_qrels, read_run

Mode = Literal["pointwise", "listwise"]
DEFAULT_TOP_N: dict[str, int] = {"pointwise": 50, "listwise": 5}  # LamRA's
ZERO_SHOT_TOP_N = 10  # MM-Embed's
SCORES = "scores"


def load_rerank_module(path: str | Path, judge: JudgePrompt | None = None) -> RerankModule:
    """A RerankModule in eval mode from a `lamra-pl fit` checkpoint (.ckpt) or a Hugging Face checkpoint folder
    (a merged reranker, released LamRA-Rank weights, or an off-the-shelf instruct model for zero-shot reranking, which
    may also be a text-only causal LM's .gguf file). With `judge`, an off-the-shelf model scores with that zero-shot
    yes/no question (MM-Embed)."""
    p = Path(path)
    off_the_shelf = p.is_dir() or p.suffix == ".gguf"  # a text-only causal LM's GGUF file is a checkpoint too
    if judge is not None and not off_the_shelf:
        raise LamraError(
            f"zero-shot reranking takes an off-the-shelf model's checkpoint folder (or .gguf file); {str(path)!r} is "
            "neither"
        )
    if off_the_shelf:
        settings_file = p / RERANK_SETTINGS_FILE  # written by `lamra-pl merge` of a reranker
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        module = RerankModule(str(p), lora=None, gradient_checkpointing=False, **settings)
        module.configure_model()
    elif p.is_file():
        module = RerankModule.load_from_checkpoint(
            p, map_location="cpu", weights_only=True, gradient_checkpointing=False
        )
    else:
        raise LamraError(f"reranker {str(path)!r} is neither a checkpoint file nor a checkpoint folder")
    if judge is not None:
        module.use_judge(judge)
    return module.eval()


class RerankBatches(IterableDataset):
    """Scoring batches of the queries in `units` ((task, query shard) pairs): pointwise, `batch_size` (query,
    candidate) pairs a batch; listwise, `batch_size` queries a batch."""

    def __init__(
        self,
        units: list[tuple[str, str]],
        heads: dict[str, dict[str, list[str]]],
        store: CandidateStore,
        module: RerankModule,
        mode: Mode,
        batch_size: int,
        instruction_seed: int | None,
    ) -> None:
        self.units, self.heads, self.store = units, heads, store
        self.collator = module.collator()
        self.mode, self.batch_size, self.instruction_seed = mode, batch_size, instruction_seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.units[info.id :: info.num_workers] if info else self.units
        pending: list[tuple[str, str, Item, list[str]]] = []
        for task, url in mine:
            for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                query = evaluation_query(decode_record(sample), self.instruction_seed)
                head = self.heads[task].get(query.id)
                if not head:
                    continue
                if self.mode == "listwise":
                    pending.append((task, query.id, query, head))
                    if len(pending) == self.batch_size:
                        yield self._listwise(pending)
                        pending = []
                    continue
                for did in head:
                    pending.append((task, query.id, query, [did]))
                    if len(pending) == self.batch_size:
                        yield self._pointwise(pending)
                        pending = []
        if pending:
            yield self._listwise(pending) if self.mode == "listwise" else self._pointwise(pending)

    def _pointwise(self, rows: list[tuple[str, str, Item, list[str]]]) -> dict[str, Any]:
        inputs = self.collator.pointwise_inputs([(q, self.store.item(dids[0])) for _, _, q, dids in rows])
        return {"mode": "pointwise", "inputs": inputs, "tags": [(t, qid, dids) for t, qid, _, dids in rows]}

    def _listwise(self, rows: list[tuple[str, str, Item, list[str]]]) -> dict[str, Any]:
        lists = [(q, [self.store.item(d) for d in dids]) for _, _, q, dids in rows]
        return {
            "mode": "listwise",
            "inputs": self.collator.listwise_inputs(lists),
            "sizes": [len(dids) for _, _, _, dids in rows],
            "tags": [(t, qid, dids) for t, qid, _, dids in rows],
        }


class ScoreWriter(BasePredictionWriter):
    """Appends `task qid did score` lines of each batch to this rank's file in `folder`."""

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder
        self.file: Any = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = (self.folder / f"rank-{trainer.global_rank}.tsv").open("w")

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        scores = prediction.float().cpu().numpy()
        for row, (task, qid, dids) in enumerate(batch["tags"]):
            values = scores[row, : len(dids)] if scores.ndim == 2 else [scores[row]]
            lines = (f"{task}\t{qid}\t{did}\t{float(value)!r}\n" for did, value in zip(dids, values, strict=True))
            self.file.writelines(lines)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.file.close()


class RerankDataModule(LightningDataModule):
    def __init__(self, units: list[tuple[str, str]], num_workers: int, **batches: Any) -> None:
        super().__init__()
        self.units, self.num_workers, self.batches = units, num_workers, batches

    def predict_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        mine = self.units[rank::world]
        dataset = RerankBatches(mine, module=self.trainer.lightning_module, **self.batches)
        return DataLoader(dataset, batch_size=None, num_workers=min(self.num_workers, len(mine)))


def rerank(
    module: RerankModule,
    runs: str,
    out: str,
    *,
    model_path: str,
    mode: Mode = "pointwise",
    top_n: int | None = None,
    fusion: str | float | None = None,
    instruction_seed: int | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    trainer: Trainer | None = None,
) -> Path | None:
    """Rerank every task of a run folder; returns the output folder on rank 0 (None elsewhere).

    A module with a judge prompt (zero-shot, `load_rerank_module(judge=...)`) scores pointwise, by default the top
    10 re-sorted by P(True) alone (fusion w = inf), as MM-Embed reranks."""
    judge = module.collator().judge
    if judge is not None:
        if mode != "pointwise":
            raise LamraError("zero-shot reranking asks one candidate at a time: use --mode pointwise")
        top_n = ZERO_SHOT_TOP_N if top_n is None else top_n
        fusion = "inf" if fusion is None else fusion
    top_n = DEFAULT_TOP_N[mode] if top_n is None else top_n
    if top_n < 1:
        raise LamraError(f"top_n must be >= 1, got {top_n}")
    if mode == "listwise" and top_n > MAX_LIST:
        raise LamraError(f"listwise reranking numbers candidates (1)..({MAX_LIST}): top_n {top_n} is too many")
    weights = load_weights(fusion)
    runs_dir, out_dir = Path(runs), Path(out)
    manifest_file = runs_dir / MANIFEST
    if not manifest_file.is_file():
        raise LamraError(f"{runs_dir} has no {MANIFEST}: give a folder written by `lamra-pl retrieve`")
    manifest = json.loads(manifest_file.read_text())
    if instruction_seed is None:
        instruction_seed = manifest.get("instruction_seed")
    tasks = manifest["tasks"]
    retrieved = {name: read_run(entry["run_file"]) for name, entry in tasks.items()}
    for name in tasks:
        weight_for(weights, name)  # every task has a weight before any work is done
    heads = {name: {q: r[:top_n] for q, r in zip(run.qids, run.ranked, strict=True)} for name, run in retrieved.items()}
    sources = EmbeddingIndex(manifest["index"]).meta["sources"]
    store = CandidateStore(sources, {d for h in heads.values() for ranked in h.values() for d in ranked})
    for name, head in heads.items():
        unknown = sorted({d for ranked in head.values() for d in ranked if d not in store})
        if unknown:
            raise LamraError(
                f"{tasks[name]['run_file']} ranks {len(unknown)} ids that are not in the pool {sources}, "
                f"e.g. {unknown[:3]}"
            )
    units = [(name, url) for name, entry in tasks.items() for url in expand_shards(_queries(entry))]
    trainer = trainer or encode_trainer()
    parts = out_dir / SCORES / "parts"
    trainer.callbacks.append(ScoreWriter(parts))
    datamodule = RerankDataModule(
        units,
        num_workers,
        heads=heads,
        store=store,
        mode=mode,
        batch_size=batch_size,
        instruction_seed=instruction_seed,
    )
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    scores = _read_scores(parts, trainer.world_size)
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        run = retrieved[name]
        lines, ranked, fused_scores = [], [], []
        w = weight_for(weights, name)
        for qid, ids, retrieval in zip(run.qids, run.ranked, run.scores, strict=True):
            head = ids[:top_n]
            mine = scores.get((name, qid), {})
            missing = [d for d in head if d not in mine]
            if missing:
                raise LamraError(f"query {qid} of {name}: no rerank score for {missing[:3]} (is it in the queries?)")
            rerank_scores = np.array([mine[d] for d in head])
            retrieval_scores = np.array(retrieval, dtype=np.float64)
            order, fused_head = fuse(retrieval_scores[: len(head)], rerank_scores, w)
            ranked.append([head[i] for i in order] + ids[len(head) :])
            fused_scores.append(np.concatenate([fused_head, retrieval_scores[len(head) :]]))
            lines += [
                f"{qid}\t{d}\t{rank}\t{retrieval[rank - 1]!r}\t{mine[d]!r}\n" for rank, d in enumerate(head, start=1)
            ]
        run_file = out_dir / f"{name}.run"
        atomic_write(run_file, _format(run.qids, ranked, fused_scores, tag=f"lamra-pl-rerank-{mode}"))
        atomic_write(out_dir / SCORES / f"{name}.tsv", "".join(lines))
        entries[name] = {**entry, "run_file": str(run_file), "retrieval_run_file": entry["run_file"]}
    about = {
        "model": model_path,
        "mode": "zero-shot judge" if judge is not None else mode,
        "prompt": judge.question if judge is not None else "LamRA-Rank",
        "top_n": top_n,
        "fusion": {n: _weight_text(weight_for(weights, n)) for n in tasks},
        # queries whose run holds fewer than top_n candidates (a small pool or a shallow run): all were reranked
        "fewer_than_top_n": {n: sum(len(r) < top_n for r in retrieved[n].ranked) for n in tasks},
    }
    atomic_write(out_dir / MANIFEST, json.dumps({**manifest, "tasks": entries, "rerank": about}, indent=1))
    return out_dir


def _weight_text(w: float) -> float | str:
    return "inf" if w == float("inf") else w  # JSON has no infinity (and NaN weights are refused earlier)


def _queries(entry: dict[str, Any]) -> str:
    # Manifests written before "queries" was recorded: evaluation tasks keep their queries in queries/.
    return entry.get("queries") or str(Path(entry["task_file"]).parent / "queries")


def _format(qids: list[str], ranked: list[list[str]], scores: list[np.ndarray], tag: str) -> str:
    width = max((len(r) for r in ranked), default=0)
    padded = np.zeros((len(ranked), width))
    for row, s in enumerate(scores):
        padded[row, : len(s)] = s
    return format_run(qids, ranked, padded, tag)


def _read_scores(parts: Path, world: int) -> dict[tuple[str, str], dict[str, float]]:
    """This run's scores: the files of its ranks only (a folder reused by a run on more devices has others)."""
    scores: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for rank in range(world):
        path = parts / f"rank-{rank}.tsv"
        if not path.is_file():
            raise LamraError(f"{path} is missing: with several nodes, OUT must be on a file system they share")
        for line in path.read_text().splitlines():
            task, qid, did, value = line.split("\t")
            scores[task, qid][did] = float(value)
    return scores


# per query: retrieval ranking, retrieval scores, rerank scores of its head, positives
Reranked = list[tuple[list[str], np.ndarray, np.ndarray, set[str]]]


def read_reranked(folder: str | Path) -> dict[str, tuple[int, Reranked]]:
    """Per task of a `rerank` output folder: its reported k, and per query (retrieval ranking, retrieval scores,
    rerank scores of its head, positives), for `tune_fusion`."""
    folder = Path(folder)
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file() or "rerank" not in json.loads(manifest_file.read_text()):
        raise LamraError(f"{folder} is not a folder written by `lamra-pl rerank` (no {MANIFEST} with 'rerank')")
    manifest = json.loads(manifest_file.read_text())
    out: dict[str, tuple[int, Reranked]] = {}
    for name, entry in manifest["tasks"].items():
        run: Run = read_run(entry["retrieval_run_file"])
        qrels = read_qrels(entry["qrels_file"])
        rerank_scores: dict[str, list[float]] = defaultdict(list)
        for line in (folder / SCORES / f"{name}.tsv").read_text().splitlines():
            qid, _, _, _, value = line.split("\t")
            rerank_scores[qid].append(float(value))
        k = int(task_info(Path(entry["task_file"]).parent)["recall_k"])
        out[name] = (
            k,
            [
                (ids, np.array(s, dtype=np.float64), np.array(rerank_scores[q]), qrels.get(q, set()))
                for q, ids, s in zip(run.qids, run.ranked, run.scores, strict=True)
            ],
        )
    return out


def tune(reranked: str, out: str, grid: tuple[float, ...] = GRID) -> dict[str, dict[str, float]]:
    """Pick each task's fusion weight on a validation split's `rerank` folder (best M-BEIR reported recall) and
    write them as a weights file for `lamra-pl rerank --fusion`; returns {task: {"w", "k", recalls}}."""
    chosen: dict[str, dict[str, float]] = {}
    for name, (k, queries) in read_reranked(reranked).items():
        w, recall = tune_fusion(queries, k, grid)
        _, alone = tune_fusion(queries, k, (0.0,))
        chosen[name] = {"w": w, "k": k, "retrieval": alone[0.0], "fused": recall[w]}
    header = f"# fusion weights tuned by `lamra-pl tune-fusion` on {reranked} (best R@k of each task)\n"
    atomic_write(out, header + "".join(f"{name}: {c['w']}\n" for name, c in chosen.items()))
    return chosen
