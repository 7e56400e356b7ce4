"""`make demo`: the whole pipeline on a tiny random Qwen2-VL and real emoji data, on CPU.

1. build the emoji data set in M-BEIR format and convert it (`data_recipes.emoji`, `lamra-pl convert-mbeir`);
2. build a tiny random backbone whose tokenizer is trained on the training texts (`lamra-pl tiny-backbone`);
3. stage 1, language-only, on the qt->ct pairs (`lamra-pl fit -c experiments/demo/stage1_text.yaml`);
4. `lamra-pl merge`, then stage 2 on every training task (`experiments/demo/stage2_instruct.yaml`);
5. for the trained model and the untrained backbone: `lamra-pl index` the global test pool, `lamra-pl retrieve`
   the held-out queries against each task's local pool and the global pool, `lamra-pl evaluate` the run files
   (each evaluation is a TensorBoard run in runs/demo/eval);
6. reranking (LamRA-Rank): `lamra-pl index` the training pool and `lamra-pl retrieve` the training queries with
   the trained retriever, `lamra-pl rerank-data` from its top 100, `lamra-pl fit -c experiments/demo/rerank_joint.yaml`
   (initialised from the merged retriever), then `lamra-pl rerank` the test runs (pointwise top 10, and listwise
   top 5) and `lamra-pl evaluate` them;
7. `lamra-pl report --runs runs/demo/eval`: the final table (one row per evaluation) is the report's, printed with
   chance per task and saved with the timings as `runs/demo/results.json`;
8. show one `lamra-pl search` with the trained model.

Each step runs the same command a user would; data and run folders are reused if already built
(`make clean` removes them). Set DEMO_ARGS to pass extra overrides to both fits.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from data_recipes import emoji as emoji_recipe
from lamra_pl.retrieval.metrics import chance
from lamra_pl.retrieval.runs import read_qrels

RUN = Path("runs/demo")
DATA = Path("demo")
LAMRA = str(Path(sys.executable).parent / "lamra-pl")
TASK_NAMES = {0: "qt->ci", 1: "qt->ct", 3: "qi->ct", 7: "(qi,qt)->ci"}
RERANK_TOP_N = {"pointwise": 10, "listwise": 5}


def step(title: str, *args: str) -> None:
    print(f"\n== {title}: lamra-pl {' '.join(args)}", flush=True)
    subprocess.run([LAMRA, *args], check=True)


def training_corpus(mbeir: Path) -> Path:
    """The English training names and the instructions: what the tokenizer's merges are learnt from.

    A tokenizer whose merges also cover the other languages splits English names into twice as many pieces,
    and the tiny model then learns about half as fast (held-out qt->ci R@10 9% instead of 17% after 150 steps).
    Other languages still tokenize: the tokenizer is byte-level.
    """
    pool = mbeir / "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
    texts = {json.loads(line).get("txt") for line in pool.read_text(encoding="utf-8").splitlines()}
    for row in (mbeir / "instructions/query_instructions.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        texts.update(row.split("\t")[4:])
    corpus = RUN / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(sorted(t for t in texts if t)), encoding="utf-8")
    return corpus


def evaluate(who: str, model: Path, data: Path) -> None:
    """index -> retrieve (local and global pools) -> evaluate, with the commands a user runs."""
    index, runs = RUN / "index" / who, RUN / "eval" / who
    # Derived from the model just trained: rebuilt on every run (an index refuses a different model).
    shutil.rmtree(index, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    step(
        f"indexing the test pool ({who})",
        "index",
        f"--model={model}",
        f"--pool={data}/eval/test/global_pool",
        f"--out={index}",
    )
    queries = f"{data}/eval/test/*_task*"
    step(
        f"retrieving ({who})",
        "retrieve",
        f"--model={model}",
        f"--index={index}",
        f"--queries={queries}",
        f"--out={runs}",
    )
    for pool in ("local", "global"):
        step(f"evaluating ({who}, {pool} pools)", "evaluate", f"--runs={runs / pool}")


def rerank_stage(data: Path, extra: list[str]) -> None:
    """LamRA-Rank on the demo: training data from the trained retriever, joint training, reranking the test runs."""
    retriever = RUN / "stage2/checkpoints/last.ckpt"
    train_index, train_runs = RUN / "index" / "train", RUN / "eval" / "train_retrieval"
    for stale in (train_index, train_runs, data / "rerank"):
        shutil.rmtree(stale, ignore_errors=True)
    step("merge (the reranker's initialisation)", "merge", f"--ckpt={retriever}", f"--out={RUN / 'stage2_merged'}")
    step(
        "indexing the training pool",
        "index",
        f"--model={retriever}",
        f"--pool={data}/train_pool",
        f"--out={train_index}",
    )
    step(
        "retrieving the training queries (top 100)",
        "retrieve",
        f"--model={retriever}",
        f"--index={train_index}",
        f"--queries={data}/train/*_task*",
        "--pools=[local]",
        "--k=100",
        f"--out={train_runs}",
    )
    step("reranker training data", "rerank-data", f"--runs={train_runs / 'local'}", f"--out={data / 'rerank'}")
    step("reranker training (pointwise + listwise)", "fit", "-c", "experiments/demo/rerank_joint.yaml", *extra)
    for mode, top_n in RERANK_TOP_N.items():
        out = RUN / "eval" / f"reranked_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        step(
            f"reranking the test runs ({mode}, top {top_n})",
            "rerank",
            f"--model={RUN / 'rerank/checkpoints/last.ckpt'}",
            f"--runs={RUN / 'eval' / 'trained' / 'local'}",
            f"--out={out}",
            f"--mode={mode}",
            f"--top_n={top_n}",
            "--batch_size=64",
        )
        step(f"evaluating ({mode} reranking)", "evaluate", f"--runs={out}")


def emoji_recipe_instruction(mbeir: Path) -> str:
    """The first instruction of the text -> image task (the one the model was trained and evaluated with)."""
    for row in (mbeir / "instructions/query_instructions.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        cols = row.split("\t")
        if cols[:2] == ["text", "image"]:
            return cols[4]
    raise SystemExit(f"{mbeir}: no text -> image instruction")


def prepare() -> tuple[Path, Path]:
    """Steps 1-2: the emoji data (built and converted once) and the tiny backbone; returns (mbeir, data).

    `python -m data_recipes.demo --prepare` runs only these (the ablation grid starts from them)."""
    RUN.mkdir(parents=True, exist_ok=True)
    mbeir, data = DATA / "mbeir", DATA / "data"
    if not (mbeir / "summary.json").is_file():
        print("== building the emoji data set (M-BEIR format)", flush=True)
        emoji_recipe.build(mbeir)
    if not (data / "train_pool").is_dir():  # (older conversions lack the training pool and task files)
        shutil.rmtree(data, ignore_errors=True)
        step("converting", "convert-mbeir", f"--root={mbeir}", f"--out={data}")
    step(
        "tiny backbone",
        "tiny-backbone",
        f"--out={RUN / 'backbone'}",
        "--hidden_size=128",
        "--vision_dim=64",
        "--vocab_size=3000",
        "--min_pixels=3136",
        "--max_pixels=3136",
        f"--corpus={training_corpus(mbeir)}",
    )
    return mbeir, data


def main() -> None:
    start = time.time()
    mbeir, data = prepare()
    extra = shlex.split(os.environ.get("DEMO_ARGS", ""))
    step("stage 1 (language-only)", "fit", "-c", "experiments/demo/stage1_text.yaml", *extra)
    step("merge", "merge", f"--ckpt={RUN / 'stage1/checkpoints/last.ckpt'}", f"--out={RUN / 'stage1_merged'}")
    step("stage 2 (multimodal instruction tuning)", "fit", "-c", "experiments/demo/stage2_instruct.yaml", *extra)
    trained_at = time.time()

    evaluate("trained", RUN / "stage2/checkpoints/last.ckpt", data)
    evaluate("untrained", RUN / "backbone", data)
    evaluated_at = time.time()
    rerank_stage(data, extra)
    step("the final table: every evaluation's numbers, from their TensorBoard runs", "report", f"--runs={RUN / 'eval'}")
    chance_rows = []
    for task_dir in sorted((data / "eval" / "test").glob("*_task*")):
        info = json.loads((task_dir / "task.json").read_text())
        positives = [len(p) for p in read_qrels(task_dir / "qrels.txt").values()]
        numbers = chance(info["pool"], positives, (1, 5, 10))
        name = f"{task_dir.name} ({TASK_NAMES.get(info['task_id'], info['task_id'])})"
        chance_rows.append(
            f"| {name} | {info['pool']} | " + " / ".join(f"{100 * v:.1f}" for v in numbers.values()) + " |"
        )
    results = {
        "report": json.loads((RUN / "eval" / "report.json").read_text()),
        "chance (local pools)": chance_rows,
        "minutes": {
            "total": round((time.time() - start) / 60, 1),
            "data+train": round((trained_at - start) / 60, 1),
            "evaluation": round((evaluated_at - trained_at) / 60, 1),
            "reranking (data, training, reranking)": round((time.time() - evaluated_at) / 60, 1),
        },
    }
    (RUN / "results.json").write_text(json.dumps(results, indent=1))
    print("\nchance, R@1 / R@5 / R@10 (%):\n| task | local pool | chance |\n|---|---|---|\n" + "\n".join(chance_rows))
    instruction = emoji_recipe_instruction(mbeir)
    step(
        "one search (trained model, global test pool)",
        "search",
        f"--model={RUN / 'stage2/checkpoints/last.ckpt'}",
        f"--index={RUN / 'index' / 'trained'}",
        "--text=red apple",
        f"--instruction={instruction}",
        "--k=5",
    )
    print(f"\nresults: {RUN / 'results.json'}; TensorBoard: make tensorboard RUNS={RUN}; {results['minutes']} minutes")


if __name__ == "__main__":
    if sys.argv[1:] == ["--prepare"]:
        prepare()
    elif sys.argv[1:]:
        raise SystemExit("usage: python -m data_recipes.demo [--prepare]")
    else:
        main()
