"""The `lamra-pl` command: LightningCLI subcommands (fit, validate, test, predict) and tool subcommands.

    lamra-pl fit -c experiments/lamra_ret/stage1_text.yaml [--model.backbone PATH] [--trainer.max_steps N]
    lamra-pl tiny-backbone --out checkpoints/tiny-qwen2vl
    lamra-pl merge --ckpt runs/stage1/version_0/checkpoints/last.ckpt --out checkpoints/stage1-merged
    lamra-pl index --model CKPT --pool data/eval/test/global_pool --out indexes/test_global
    lamra-pl retrieve --model CKPT --index indexes/test_global --queries 'data/eval/test/*_task*' --out runs/eval
    lamra-pl evaluate --runs runs/eval/local
    lamra-pl search --model CKPT --index indexes/test_global --text "a red apple" --k 5
    lamra-pl rerank-data --runs runs/train_retrieval/local --out data/rerank --top_k 100
    lamra-pl mine --runs runs/train_mining/global --out data/mined
    lamra-pl fit -c experiments/lamra_rank/rerank_joint.yaml
    lamra-pl rerank --model RERANKER_CKPT --runs runs/eval/local --out runs/eval/reranked_local
    lamra-pl tune-fusion --reranked runs/eval_val/reranked_local --out fusion.yaml
    lamra-pl grid --grid experiments/ablations/grids/demo.yaml && lamra-pl report --runs runs/ablations/demo

Errors in user input (paths, config keys, data) print as one line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import auto_cli
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lamra_pl.data.datamodule
import lamra_pl.data.mix
import lamra_pl.models.clip
import lamra_pl.models.embedding
import lamra_pl.models.rerank  # noqa: F401
from lamra_pl.errors import LamraError
from lamra_pl.models.rerank_inputs import JUDGE_QUESTION, JudgePrompt


def tiny_backbone(
    out: str,
    model_type: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    vision_dim: int = 32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: str | None = None,
    seed: int = 0,
) -> None:
    """Write a tiny randomly initialised checkpoint (for tests and the CPU demo).

    Args:
        out: output directory.
        model_type: "qwen2_vl" (the demo's), "llava_next" (MM-Embed's family), or a text-only causal LM's
            model_type ("qwen2", "llama", "mistral", ...).
        hidden_size: language model width (the vision projector maps into it).
        num_layers: decoder layers.
        vocab_size: embedding rows; the byte-level BPE tokenizer is trained to leave a few spare.
        vision_dim: vision tower width (multimodal models).
        min_pixels: smallest image area the processor resizes to (qwen2_vl).
        max_pixels: largest image area the processor resizes to (qwen2_vl).
        corpus: optional text file (one text per line) to train the tokenizer on besides the prompts.
        seed: weight initialisation seed.
    """
    from lamra_pl.models.backbone import family_of
    from lamra_pl.models.tiny import build_tiny_causal_lm, build_tiny_llava_next, build_tiny_qwen2vl

    lines: list[str] = []
    if corpus is not None:
        if not Path(corpus).is_file():
            raise LamraError(f"corpus file {corpus!r} does not exist")
        lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    shape = {"hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size}
    if model_type == "qwen2_vl":
        path = build_tiny_qwen2vl(
            out, **shape, vision_dim=vision_dim, min_pixels=min_pixels, max_pixels=max_pixels, corpus=lines, seed=seed
        )
    elif model_type == "llava_next":
        path = build_tiny_llava_next(out, **shape, vision_dim=vision_dim, corpus=lines, seed=seed)
    elif family_of(model_type, where="--model_type").text_only:
        path = build_tiny_causal_lm(out, model_type=model_type, **shape, corpus=lines, seed=seed)
    else:
        raise LamraError(f"--model_type {model_type!r}: a tiny builder exists for qwen2_vl, llava_next and causal LMs")
    print(f"tiny {model_type} written to {path}")


def merge(ckpt: str, out: str) -> None:
    """Merge a LoRA adapter into its base weights (float32) and save a full checkpoint in the base dtype.

    Args:
        ckpt: Lightning checkpoint written by `lamra-pl fit`.
        out: output directory (model, processor, chat template).
    """
    from lamra_pl.models.merge import merge as merge_checkpoint

    print(f"merged checkpoint written to {merge_checkpoint(ckpt, out)}")


def convert_mbeir(root: str, out: str, strict: bool = False, splits: list[str] | None = None) -> None:
    """Convert an M-BEIR folder to training shards, evaluation sets and the global pool.

    Args:
        root: the M-BEIR folder (query/, cand_pool/, qrels/, instructions/, images).
        out: output folder (train/, eval/<split>/, report.json).
        strict: stop at the first problem instead of skipping and counting.
        splits: evaluation splits to convert (default: test).
    """
    from data_recipes.mbeir import convert

    _report(convert, root, out, strict=strict, splits=tuple(splits or ["test"]))


def convert_nli(csv: str, out: str, strict: bool = False) -> None:
    """Convert SimCSE-style NLI triples (sent0,sent1,hard_neg) to text-only training shards.

    Args:
        csv: the CSV file.
        out: output folder (train/nli_task1/).
        strict: stop at the first bad row instead of skipping and counting.
    """
    from data_recipes.nli import convert

    _report(convert, csv, out, strict=strict)


def index(
    model: str,
    pool: str,
    out: str,
    batch_size: int = 32,
    num_workers: int = 1,
    bucket: bool = True,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str | None = None,
) -> None:
    """Encode a candidate pool into an index folder; a killed run continues where it stopped when run again.

    Args:
        model: a `lamra-pl fit` checkpoint (.ckpt: LoRA adapter or trained weights) or a merged checkpoint folder.
        pool: a candidate shard folder (e.g. data/eval/test/global_pool, or a task's pool/).
        out: the index folder (format: lamra_pl.retrieval.index).
        batch_size: items per forward pass.
        num_workers: data loader processes per device.
        bucket: sort each shard's items by length before batching (less padding).
        accelerator: cpu, gpu or auto.
        devices: devices to shard the pool over (DDP).
        precision: Lightning precision, e.g. bf16-mixed (default 32-true).
    """
    from lamra_pl.retrieval.encode import Job, encode, encode_trainer
    from lamra_pl.retrieval.index import EmbeddingIndex
    from lamra_pl.retrieval.retriever import load_embedding_module

    module = load_embedding_module(model)
    trainer = encode_trainer(accelerator, devices, precision)
    job = Job(out, (pool,), "pool")
    if encode(
        module, [job], model_path=model, batch_size=batch_size, num_workers=num_workers, bucket=bucket, trainer=trainer
    ):
        built = EmbeddingIndex(out)
        print(f"index {out}: {len(built)} candidates x {built.dim} (float16)")


def retrieve(
    model: str,
    index: str,
    queries: str,
    out: str,
    k: int = 50,
    pools: list[Literal["local", "global"]] = ["local", "global"],  # noqa: B006 - jsonargparse reads the default
    backend: Literal["auto", "faiss", "torch"] = "auto",
    instruction_seed: int | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str | None = None,
) -> None:
    """Search an index with the queries of evaluation tasks; write a TREC run file per task and pool setting.

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
        accelerator: cpu, gpu or auto.
        devices: devices to encode on (DDP).
        precision: Lightning precision, e.g. bf16-mixed (default 32-true).
    """
    from lamra_pl.retrieval.encode import encode_trainer
    from lamra_pl.retrieval.retrieve import retrieve as run
    from lamra_pl.retrieval.retriever import load_embedding_module

    written = run(
        load_embedding_module(model),
        index,
        queries,
        out,
        model_path=model,
        k=k,
        pools=tuple(pools),
        backend=backend,
        instruction_seed=instruction_seed,
        batch_size=batch_size,
        num_workers=num_workers,
        trainer=encode_trainer(accelerator, devices, precision),
    )
    for pool, folder in written.items():
        print(f"{pool} pool: run files in {folder}; score them with: lamra-pl evaluate --runs {folder}")


def evaluate(runs: str, step: int = 0, log_to: str | None = None) -> None:
    """Score the run files of a `lamra-pl retrieve` (or `rerank`) folder: M-BEIR Recall@K per task and the average,
    and the share of wrong-modality results in the top 10 (MM-Embed's modality bias).

    Writes results.json and results.md, logs the numbers to TensorBoard (scalars, and hparams with final `hp/*`
    metrics for `lamra-pl report`) and prints the table.

    Args:
        runs: a run folder written by `lamra-pl retrieve` (holds runs.json).
        step: the TensorBoard step to log the numbers at (e.g. the checkpoint's training step).
        log_to: a TensorBoard run folder to log into instead of RUNS, e.g. the fit that trained the model, whose
            report row then shows these numbers (a reranker fit, which validates nothing itself).
    """
    from lamra_pl.retrieval.evaluate import evaluate_runs, markdown, save_results

    results = evaluate_runs(runs)
    board = save_results(results, runs, step=step, log_to=log_to)
    print(markdown(results))
    print(f"\n{Path(runs) / 'results.json'}; TensorBoard: {board}")


def search(
    model: str,
    index: str,
    text: str | None = None,
    image: str | None = None,
    k: int = 10,
    instruction: str | None = None,
    backend: Literal["auto", "faiss", "torch"] = "auto",
) -> None:
    """Search an index for a text, an image or both, and print the ranked candidates.

    Args:
        model: the checkpoint that built the index.
        index: an index folder written by `lamra-pl index`.
        text: the query text.
        image: the query image file.
        k: results to print.
        instruction: a task instruction prepended to the query text (e.g. "Find the emoji image with this name.").
        backend: faiss, torch or auto.
    """
    from lamra_pl.retrieval.retriever import Retriever

    if text is None and image is None:
        raise LamraError("give --text, --image or both")
    hits = Retriever.from_checkpoint(model).search(
        index, query_text=text, query_image=image, k=k, instruction=instruction, backend=backend
    )
    print(f"{'rank':>4}  {'score':>7}  {'id':<16} text | image")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.id:<16} {hit.txt or ''} | {hit.img or ''}")


def rerank_data(runs: str, out: str, top_k: int = 100, seed: int = 0) -> None:
    """Reranker training shards from a retriever's run files on the training queries (LamRA-Rank's data).

    Per query: the pointwise positive, one pointwise negative from the top K minus every positive, and a listwise
    sample of 2-5 candidates with the positive at a random position. Counts of what was short are in the report.

    Args:
        runs: a `lamra-pl retrieve` run folder of training tasks (e.g. runs/train_retrieval/local, retrieved
            with --queries 'DATA/train/*_task*' --k 100).
        out: the output shard folder (OUT/<task>/shard-*.tar, OUT/report.json): `data.train_shards` of a reranker.
        top_k: negatives are drawn from each query's top K.
        seed: seed of the draws (per query, so independent of order).
    """
    from lamra_pl.data.rerank_data import make_rerank_data

    print(json.dumps(make_rerank_data(runs, out, top_k=top_k, seed=seed), indent=1))


def mine(
    runs: str,
    out: str,
    strategy: Literal["modality", "topk", "random"] = "modality",
    c1: int = 1,
    c2: int = 1,
    window: tuple[int, int] = (46, 50),
    seed: int = 0,
) -> None:
    """MM-Embed's modality-aware hard negatives: training shards whose queries carry c1 + c2 mined negatives.

    Args:
        runs: a `lamra-pl retrieve --pools [global] --k 50` folder of the training queries (DATA/train/*_task*)
            against an index of the union training pool (DATA/train_pool), e.g. runs/train_mining/global.
        out: the output shard folder (OUT/<task>/shard-*.tar, OUT/report.json): `data.train_shards` of a retriever
            with `data.num_negatives` <= c1 + c2.
        strategy: "modality" (C1: wrong modality ranked above the positive; C2: right modality in the rank
            window), "topk" (the best-ranked non-positives, modality-blind) or "random" (random pool candidates).
        c1: negatives per query from C1 (for "topk" and "random": c1 + c2 negatives in all).
        c2: negatives per query from C2.
        window: C2's ranks, 1-based and inclusive (MM-Embed: 46-50).
        seed: seed of the random fill of short lists (per query).
    """
    from lamra_pl.data.mining import MiningSpec
    from lamra_pl.data.mining import mine as mine_negatives

    spec = MiningSpec(strategy=strategy, c1=c1, c2=c2, window=tuple(window), seed=seed)
    print(json.dumps(mine_negatives(runs, out, spec), indent=1))


def rerank(
    model: str,
    runs: str,
    out: str,
    mode: Literal["pointwise", "listwise"] = "pointwise",
    top_n: int | None = None,
    fusion: str | None = None,
    instruction_seed: int | None = None,
    batch_size: int = 16,
    num_workers: int = 1,
    accelerator: str = "auto",
    devices: int = 1,
    precision: str | None = None,
    zero_shot: bool = False,
    question: str = JUDGE_QUESTION,
    answers: tuple[str, str] = ("True", "False"),
) -> None:
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
        accelerator: cpu, gpu or auto.
        devices: devices to score on (DDP).
        precision: Lightning precision, e.g. bf16-mixed (default 32-true).
        zero_shot: score with the judge question below instead of LamRA-Rank's prompt (model: a folder).
        question: the zero-shot question after the query and candidate; {candidate} names the candidate's
            modality ("image", "text", "image and text").
        answers: the positive and negative answer words; the score is P(first) over the two.
    """
    from lamra_pl.retrieval.encode import encode_trainer
    from lamra_pl.retrieval.rerank import load_rerank_module
    from lamra_pl.retrieval.rerank import rerank as run

    judge = JudgePrompt(question, *answers) if zero_shot else None
    written = run(
        load_rerank_module(model, judge=judge),
        runs,
        out,
        model_path=model,
        mode=mode,
        top_n=top_n,
        fusion=fusion,
        instruction_seed=instruction_seed,
        batch_size=batch_size,
        num_workers=num_workers,
        trainer=encode_trainer(accelerator, devices, precision),
    )
    if written is not None:
        print(f"reranked run files in {written}; score them with: lamra-pl evaluate --runs {written}")


def tune_fusion(reranked: str, out: str) -> None:
    """Pick the fusion weight w of each task on a validation split (grid 0..2, step 0.05; best reported R@k).

    Args:
        reranked: a `lamra-pl rerank` output folder of a validation split.
        out: the weights file to write (YAML), for `lamra-pl rerank --fusion`.
    """
    from lamra_pl.retrieval.rerank import tune

    chosen = tune(reranked, out)
    print("| task | R@k | retrieval | fused | w |\n|---|---|---|---|---|")
    for name, c in chosen.items():
        print(f"| {name} | R@{c['k']} | {100 * c['retrieval']:.1f} | {100 * c['fused']:.1f} | {c['w']} |")
    print(f"\n{out}")


def report(runs: str) -> None:
    """Compare the training runs under a folder: a Markdown table and PNG plots, written into that folder.

    Reads each run's TensorBoard event files and config.yaml (or hparams.yaml), not its console output. Rows:
    runs (finished, unfinished, or unreadable with the reason); columns: the hyperparameters that differ, then
    the final Recall per task and averaged (best in bold).

    Args:
        runs: a folder of runs, e.g. runs/ or runs/ablations (searched recursively).
    """
    from lamra_pl.report import report as write_report

    written = write_report(runs)
    print(written["table"])
    print("\n".join(written["files"]))


def _report(convert: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> None:
    """Run a converter with its per-line warnings on stderr, then print its counts as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(json.dumps(convert(*args, **kwargs), indent=1))


def grid(grid: str, only: list[str] | None = None, dry_run: bool = False) -> None:
    """Run a grid of fits and tool steps (e.g. experiments/ablations/grids/demo.yaml); done steps are skipped.

    Args:
        grid: the grid file (format: lamra_pl.grid).
        only: run only these fits (and every tool step).
        dry_run: print the commands without running them.
    """
    from lamra_pl.grid import run_grid

    print(json.dumps(run_grid(grid, only=only, dry_run=dry_run), indent=1))


TOOLS: dict[str, Callable[..., Any]] = {
    "tiny-backbone": tiny_backbone,
    "merge": merge,
    "convert-mbeir": convert_mbeir,
    "convert-nli": convert_nli,
    "index": index,
    "retrieve": retrieve,
    "evaluate": evaluate,
    "search": search,
    "rerank-data": rerank_data,
    "mine": mine,
    "rerank": rerank,
    "tune-fusion": tune_fusion,
    "report": report,
    "grid": grid,
}


class LamraCLI(LightningCLI):
    """LightningCLI with lamra-pl's defaults: any LightningModule/DataModule by class_path, config overwrite."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            # jsonargparse reports a failing __init__ as "does not validate against any of the Union subtypes";
            # surface our own error (which names the bad path or value) instead.
            cause = _lamra_cause(err)
            if cause is None:
                raise
            raise cause from None
        trainer = self.trainer
        if not self.model.automatic_optimization and trainer.gradient_clip_val:
            # Lightning refuses it too, with a traceback that does not say where the setting went.
            raise LamraError(
                "trainer.gradient_clip_val is not available with model.gradcache_chunk_size (GradCache steps the "
                "optimizer itself): set model.gradcache_clip_norm instead"
            )


def _lamra_cause(err: BaseException | None) -> LamraError | None:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LamraError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in TOOLS:
            auto_cli(TOOLS[args[0]], args=args[1:], as_positional=False, prog=f"lamra-pl {args[0]}")
        else:
            LamraCLI(
                LightningModule,
                LightningDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={"plugins": [{"class_path": "lamra_pl.files.AtomicCheckpointIO"}]},
                args=None if argv is None else args,  # None: LightningCLI reads sys.argv itself
                parser_kwargs={"prog": "lamra-pl", "epilog": f"tool subcommands: {', '.join(TOOLS)}"},
            )
    except LamraError as err:
        print(f"lamra-pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
