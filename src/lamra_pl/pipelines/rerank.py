"""`lamra-pl rerank`: rerank the top N of a run folder with a RerankModule, fuse, write a new run folder;
`lamra-pl tune-fusion`: pick the fusion weight per task on a validation split.

    OUT/<task>.run          the fused ranking: the top N by retrieval + w * rerank score (ties in retrieval order),
                            then the rest of the retrieval run in its order
    OUT/scores/<task>.tsv   `qid did retrieval_rank retrieval_score rerank_score` for every reranked pair
    OUT/runs.json           the input manifest with the new run files (so `lamra-pl evaluate --runs OUT` scores
                            them), each task's `retrieval_run_file`, and what was done ("rerank")

Scoring runs through `Trainer.predict` (`predict.predict`): query shards are dealt to ranks and data workers, each
rank writes its scores to `OUT/scores/parts/`, and rank 0 fuses once all are in. Candidates are read by id from the
pool shards of the index the runs searched (`CandidateStore`); queries get the instruction the retrieval gave them.
A query with fewer than N retrieved candidates has all of them reranked (counted in runs.json); ids the pool does
not hold are an error, before any scoring.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import IterableDataset

from lamra_pl.data.candidates import CandidateStore, ranked_candidates
from lamra_pl.data.items import worker_share
from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import (
    SCORES,
    format_run,
    format_scores,
    read_manifest,
    read_rerank_scores,
    read_run_file,
    scores_file,
    write_manifest,
)
from lamra_pl.formats.sample import Item, decode_record, evaluation_query
from lamra_pl.formats.settings import ModelSettings, module_args
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.formats.task import QUERIES, read_qrels, task_info
from lamra_pl.models.checkpoints import caller_settings, load_reranker
from lamra_pl.models.rerank_inputs import CANDIDATE_WORDS, MAX_LIST, JudgePrompt, RerankCollator
from lamra_pl.pipelines.predict import BatchWriter, Tally, predict
from lamra_pl.pipelines.trainer import TrainerSpec
from lamra_pl.ranking.fusion import GRID, fuse, load_weights, tune_fusion, weight_for

Mode = Literal["pointwise", "listwise"]
DEFAULT_TOP_N: dict[str, int] = {"pointwise": 50, "listwise": 5}  # LamRA's
ZERO_SHOT_TOP_N = 10  # MM-Embed's


def rerank(
    model: str,
    runs: str,
    out: str,
    mode: Mode = "pointwise",
    top_n: int | None = None,
    fusion: str | None = None,
    instruction_seed: int | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    trainer: TrainerSpec | None = None,
    zero_shot: bool = False,
    question: str | None = None,
    answers: tuple[str, str] = ("True", "False"),
    backbone: str | None = None,
    trust_remote_code: bool = False,
    settings: ModelSettings | None = None,
) -> Path | None:
    """Rerank the top N of each run file with a reranker and fuse: final = retrieval + w * rerank score.

    Zero-shot (MM-Embed): `--zero_shot true --model FOLDER` asks an off-the-shelf model, for each of the top N
    (default 10), the query, the candidate and `question`; the score is P(True) over {True, False} from one
    forward pass, and the head is re-sorted by it alone (default fusion "inf"; give --fusion to add retrieval).

    Args:
        model: a reranker checkpoint (`lamra-pl fit` .ckpt) or a Hugging Face checkpoint folder (zero-shot).
        runs: a run folder written by `lamra-pl retrieve` (or by `rerank`).
        out: output run folder; score it with `lamra-pl evaluate --runs OUT`.
        mode: pointwise (P(Yes) per candidate) or listwise (one prompt with the top N numbered).
        top_n: candidates reranked per query (default: 50 pointwise, 5 listwise, as LamRA).
        fusion: w, as a number for every task or a weights file (task: w, default: w), e.g.
            experiments/lamra_rank/fusion.yaml (LamRA's) or the output of tune-fusion. Default 1.
        instruction_seed: the queries' instructions; default: the one the retrieval used.
        batch_size: prompts per forward pass.
        num_workers: data loader processes per device.
        trainer: the devices and precision to score with.
        zero_shot: score with the judge question below instead of LamRA-Rank's prompt (model: a folder).
        question: the zero-shot question after the query and candidate, for every task; {candidate} names the
            candidate's modality ("image", "text", "image and text"). Default: MM-Embed's question for each task
            ("Does the above daily-life image match the caption? True or False" for MSCOCO's text-to-image task;
            "Does the above {candidate} match the query? True or False" for a task outside M-BEIR); the questions
            asked are written into the output's runs.json.
        answers: the positive and negative answer words; the score is P(first) over the two.
        backbone: the backbone folder of a checkpoint whose backbone is no longer where it says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
        settings: how the model reads its inputs (`--settings.rope 1d`, `--settings.max_pixels N`, ...): for a
            folder without lamra-pl's settings file, or to change what the model records.
    """
    judge = JudgePrompt(question, *answers) if zero_shot else None
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
    manifest = read_manifest(runs_dir)
    if instruction_seed is None:
        instruction_seed = manifest.get("instruction_seed")
    tasks = manifest["tasks"]
    retrieved = {name: read_run_file(entry["run_file"]) for name, entry in tasks.items()}
    for name in tasks:
        weight_for(weights, name)  # every task has a weight before any work is done
    heads = {name: {q: r[:top_n] for q, r in zip(run.qids, run.ranked, strict=True)} for name, run in retrieved.items()}
    if not manifest.get("index"):
        raise LamraError(
            f"{runs_dir}/runs.json names no index: candidates are read from the pool of the index searched"
        )
    sources = EmbeddingIndex(manifest["index"]).meta["sources"]  # resolved against where the index is now
    store = ranked_candidates(sources, heads, {name: tasks[name]["run_file"] for name in heads})
    shards = [(name, url) for name, entry in tasks.items() for url in expand_shards(_queries(entry))]
    module = load_reranker(
        model,
        judge=judge,
        backbone=caller_settings(backbone, trust_remote_code, settings),
        module=module_args(settings),
    )  # once the run folder and the pool are known to be usable
    runner = (trainer or TrainerSpec()).build()
    parts = out_dir / SCORES / "parts"
    collator = module.collator()

    kinds = {name: _task_kind(entry) for name, entry in tasks.items()}  # which question a zero-shot judge asks

    def rank_batches(rank: int, world: int) -> RerankBatches:
        return RerankBatches(shards[rank::world], heads, store, collator, mode, batch_size, instruction_seed, kinds)

    # pairs scored (pointwise) or lists (listwise, one a query); a query with nothing retrieved is not scored
    everything = sum(len(h) if mode == "pointwise" else 1 for head in heads.values() for h in head.values() if h)
    tally = Tally(
        "rerank",
        "pairs" if mode == "pointwise" else "lists",
        lambda batch: len(batch["tags"]),
        lambda rank, world: everything if world == 1 else None,  # a rank's share is known once its shards are read
    )
    if not predict(module, rank_batches, ScoreWriter(parts), runner, num_workers, tally):
        return None
    scores = _read_scores(parts, runner.world_size)
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
            lines.append(format_scores(qid, head, retrieval, mine))
        run_file = out_dir / f"{name}.run"
        atomic_write(run_file, _format(run.qids, ranked, fused_scores, tag=f"lamra-pl-rerank-{mode}"))
        atomic_write(scores_file(out_dir, name), "".join(lines))
        entries[name] = {**entry, "run_file": str(run_file), "retrieval_run_file": entry["run_file"]}
    about = {
        "model": model,
        "mode": "zero-shot judge" if judge is not None else mode,
        "prompt": _questions(judge, kinds) if judge is not None else "LamRA-Rank",
        "top_n": top_n,
        "fusion": {n: _weight_text(weight_for(weights, n)) for n in tasks},
        # queries whose run holds fewer than top_n candidates (a small pool or a shallow run): all were reranked
        "fewer_than_top_n": {n: sum(len(r) < top_n for r in retrieved[n].ranked) for n in tasks},
    }
    write_manifest(out_dir, {**manifest, "tasks": entries, "rerank": about})
    print(f"reranked run files in {out_dir}; score them with: lamra-pl evaluate --runs {out_dir}")
    return out_dir


def _task_kind(entry: dict[str, Any]) -> tuple[str, int] | None:
    """(dataset, M-BEIR task id) of a run folder's task, from its task.json; None where it does not say."""
    if not entry.get("task_file"):
        return None
    info = task_info(Path(entry["task_file"]).parent)
    dataset, task_id = info.get("dataset"), info.get("task_id")
    if not isinstance(dataset, str) or isinstance(task_id, bool) or not isinstance(task_id, int):
        return None
    return dataset.lower(), task_id


def _questions(judge: JudgePrompt, kinds: dict[str, tuple[str, int] | None]) -> dict[str, dict[str, str]]:
    """The question a zero-shot judge asked in each task, per candidate modality."""
    return {name: {m: judge.asks(m, kind) for m in CANDIDATE_WORDS} for name, kind in kinds.items()}


class RerankBatches(IterableDataset):
    """Scoring batches of the queries in `shards` ((task, query shard) pairs): pointwise, `batch_size` (query,
    candidate) pairs a batch; listwise, `batch_size` queries a batch. The data workers share the shards out."""

    def __init__(
        self,
        shards: list[tuple[str, str]],
        heads: dict[str, dict[str, list[str]]],
        store: CandidateStore,
        collator: RerankCollator,
        mode: Mode,
        batch_size: int,
        instruction_seed: int | None,
        kinds: dict[str, tuple[str, int] | None] | None = None,
    ) -> None:
        self.shards, self.heads, self.store, self.collator = shards, heads, store, collator
        self.mode, self.batch_size, self.instruction_seed = mode, batch_size, instruction_seed
        self.kinds = kinds or {}  # each task's (dataset, M-BEIR task id): which question a zero-shot judge asks

    @property
    def units(self) -> int:
        return len(self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending: list[tuple[str, str, Item, list[str]]] = []
        for task, url in worker_share(self.shards):
            for sample in read_samples([url]):
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
        pairs = [(q, self.store.item(dids[0])) for _, _, q, dids in rows]
        inputs = self.collator.pointwise_inputs(pairs, [self.kinds.get(t) for t, _, _, _ in rows])
        return {"mode": "pointwise", "inputs": inputs, "tags": [(t, qid, dids) for t, qid, _, dids in rows]}

    def _listwise(self, rows: list[tuple[str, str, Item, list[str]]]) -> dict[str, Any]:
        lists = [(q, [self.store.item(d) for d in dids]) for _, _, q, dids in rows]
        return {
            "mode": "listwise",
            "inputs": self.collator.listwise_inputs(lists),
            "sizes": [len(dids) for _, _, _, dids in rows],
            "tags": [(t, qid, dids) for t, qid, _, dids in rows],
        }


class ScoreWriter(BatchWriter):
    """Appends `task qid did score` lines of each batch to this rank's file in `folder`."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.file: Any = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = (self.folder / f"rank-{trainer.global_rank}.tsv").open("w")

    def write_batch(self, trainer: Trainer, prediction: Any, batch: dict[str, Any]) -> None:
        scores = prediction.float().cpu().numpy()
        for row, (task, qid, dids) in enumerate(batch["tags"]):
            values = scores[row, : len(dids)] if scores.ndim == 2 else [scores[row]]
            lines = (f"{task}\t{qid}\t{did}\t{float(value)!r}\n" for did, value in zip(dids, values, strict=True))
            self.file.writelines(lines)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.file.close()


def _weight_text(w: float) -> float | str:
    return "inf" if w == float("inf") else w  # JSON has no infinity (and NaN weights are refused earlier)


def _queries(entry: dict[str, Any]) -> str:
    # Manifests written before "queries" was recorded: evaluation tasks keep their queries in queries/.
    return entry.get("queries") or str(Path(entry["task_file"]).parent / QUERIES)


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
    manifest = read_manifest(folder)
    if "rerank" not in manifest:
        raise LamraError(f"{folder} is not a folder written by `lamra-pl rerank` (its runs.json has no 'rerank')")
    out: dict[str, tuple[int, Reranked]] = {}
    for name, entry in manifest["tasks"].items():
        run = read_run_file(entry["retrieval_run_file"])
        qrels = read_qrels(entry["qrels_file"])
        rerank_scores = read_rerank_scores(scores_file(folder, name))
        k = int(task_info(Path(entry["task_file"]).parent)["recall_k"])
        out[name] = (
            k,
            [
                (ids, np.array(s, dtype=np.float64), np.array(rerank_scores.get(q, [])), qrels.get(q, set()))
                for q, ids, s in zip(run.qids, run.ranked, run.scores, strict=True)
            ],
        )
    return out


def tune(reranked: str, out: str) -> dict[str, dict[str, float]]:
    """Pick the fusion weight w of each task on a validation split's reranked runs.

    The grid is 0 to 2 in steps of 0.05; the best reported R@k wins, the smallest w among equals.

    Args:
        reranked: a `lamra-pl rerank` output folder of a validation split.
        out: the weights file to write (YAML), for `lamra-pl rerank --fusion`.
    """
    chosen: dict[str, dict[str, float]] = {}
    for name, (k, queries) in read_reranked(reranked).items():
        w, recall = tune_fusion(queries, k, GRID)
        _, alone = tune_fusion(queries, k, (0.0,))
        chosen[name] = {"w": w, "k": k, "retrieval": alone[0.0], "fused": recall[w]}
    header = f"# fusion weights tuned by `lamra-pl tune-fusion` on {reranked} (best R@k of each task)\n"
    atomic_write(out, header + "".join(f"{name}: {c['w']}\n" for name, c in chosen.items()))
    print("| task | R@k | retrieval | fused | w |\n|---|---|---|---|---|")
    for name, c in chosen.items():
        print(f"| {name} | R@{c['k']} | {100 * c['retrieval']:.1f} | {100 * c['fused']:.1f} | {c['w']} |")
    print(f"\n{out}")
    return chosen
