"""LamRA-Rank: label masks, one-forward scores, training data, fusion, the rerank tools and their bad input."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_image
from helpers import ROOT, clean_error, lamra_here, ok, scalars
from lamra_pl.errors import LamraError
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import Item, decode_record
from lamra_pl.formats.shards import expand_shards
from lamra_pl.formats.task import read_qrels
from lamra_pl.models.backbone import BackboneSpec, hf_model
from lamra_pl.models.checkpoints import load_reranker
from lamra_pl.models.rerank_inputs import (
    IGNORE,
    JUDGE_DOMAINS,
    LIST_ANSWER,
    JudgePrompt,
    RerankCollator,
    RerankExample,
    judge_question,
)
from lamra_pl.models.reranker import RerankModule
from lamra_pl.pipelines.rerank import _task_kind
from lamra_pl.pipelines.rerank_data import draw
from lamra_pl.ranking.fusion import fuse, fused_ranking, tune_fusion
from lamra_pl.recipes.mbeir import TASKS, convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


def image(color: str, shape: str = "circle", size: int = 56) -> Image.Image:
    return shape_image(color, shape, size)


@pytest.fixture(scope="module")
def reranker(tiny_backbone) -> RerankModule:
    module = RerankModule(BackboneSpec(tiny_backbone, gradient_checkpointing=False, dtype="float32"))
    module.configure_model()
    return module.eval()


EXAMPLES = [
    RerankExample(
        Item("q0", "Find the red circle."),
        [(Item("a", None, image("red")), True), (Item("b", "a blue square with a long description"), False)],
        [Item("b", "blue"), Item("a", None, image("red")), Item("c", "green", image("green", "square"))],
        2,
    ),
    RerankExample(Item("q1", "x", image("yellow", "triangle", 84)), [(Item("d", "yellow triangle"), True)], [], None),
]


@pytest.mark.parametrize("side", ["left", "right"])
def test_label_mask_covers_exactly_the_answer_tokens(reranker, side):
    collator = reranker.collator()
    tokenizer = collator.processor.tokenizer
    tokenizer.padding_side = side
    try:
        batch = collator(EXAMPLES)
    finally:
        tokenizer.padding_side = "left"
    inputs, labels = batch["inputs"], batch["labels"]
    assert torch.equal(batch["kinds"], torch.tensor([0, 0, 0, 1]))
    answers = ["Yes", "No", "Yes", LIST_ANSWER.format(2)]
    pad_column = 0 if side == "left" else -1
    assert inputs["attention_mask"][:, pad_column].eq(0).any()  # the rows really are padded on that side
    for row, answer in enumerate(answers):
        kept = labels[row] != IGNORE
        expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [
            tokenizer.convert_tokens_to_ids("<|im_end|>")
        ]
        assert labels[row, kept].tolist() == expected
        assert torch.equal(labels[row, kept], inputs["input_ids"][row, kept])
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + len(expected)))  # one span
        assert inputs["attention_mask"][row, kept].all()
        real = inputs["attention_mask"][row].nonzero().flatten()
        # the span ends right before the template's trailing newline: nothing of the user turn is trained
        assert positions[-1] == real[-2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_lamra_labels_cover_the_whole_assistant_turn(reranker, side):
    """`labels: assistant_turn` (LamRA's collator): the generation prompt's header, the answer, the end of turn and
    the template's newline after it, and nothing of the system or user turns."""
    collator = RerankCollator(reranker.processor, max_text_tokens=256, labels="assistant_turn")
    tokenizer = collator.processor.tokenizer
    tokenizer.padding_side = side
    try:
        batch = collator(EXAMPLES)
    finally:
        tokenizer.padding_side = "left"
    inputs, labels = batch["inputs"], batch["labels"]
    for row, answer in enumerate(["Yes", "No", "Yes", LIST_ANSWER.format(2)]):
        kept = labels[row] != IGNORE
        assert tokenizer.decode(labels[row, kept]) == f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        positions = kept.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + len(positions)))  # one span
        real = inputs["attention_mask"][row].nonzero().flatten()
        assert positions[-1] == real[-1]  # up to the last real token: the newline after the turn
    with pytest.raises(LamraError, match="model.labels"):
        RerankCollator(reranker.processor, labels="everything")


def test_loss_does_not_depend_on_the_padding_side(reranker):
    collator = reranker.collator()
    losses = []
    for side in ("left", "right"):
        collator.processor.tokenizer.padding_side = side
        with torch.no_grad():
            losses.append(reranker.lm_loss(collator(EXAMPLES))[0])
    collator.processor.tokenizer.padding_side = "left"
    assert torch.allclose(losses[0], losses[1], atol=1e-5)


def test_answer_only_loss_is_the_stock_causal_lm_loss(reranker):
    """With equal weights, the joint loss is what the model's own `labels=` loss computes (LamRA's objective)."""
    text_only = [
        RerankExample(
            Item("q0", "red circle"),
            [(Item("a", "red circle"), True), (Item("b", "blue"), False)],
            [Item("b", "blue"), Item("a", "red circle")],
            2,
        ),
        RerankExample(Item("q1", "green"), [(Item("c", "green square"), True)], [], None),
    ]
    batch = reranker.collator()(text_only)
    with torch.no_grad():
        ours, stats = reranker.lm_loss(batch)
        stock = hf_model(reranker.model)(**batch["inputs"], labels=batch["labels"]).loss
    assert torch.allclose(ours, stock, atol=1e-5), (ours, stock)
    assert set(stats) >= {"loss_pointwise", "loss_listwise", "pointwise_acc", "listwise_acc"}


def test_p_yes_from_one_forward_equals_the_first_generated_step(reranker):
    collator = reranker.collator()
    pairs = [
        (Item("q0", "Find the red circle."), Item("a", None, image("red"))),
        (Item("q1", "a shape", image("blue", "square", 84)), Item("b", "blue square")),
        (Item("q2", "text only"), Item("c", "a much longer candidate text than the others")),
    ]
    inputs = collator.pointwise_inputs(pairs)
    assert inputs["attention_mask"][:, 0].eq(0).any()  # left padding: generate's layout
    p_yes = reranker.score_pointwise(inputs)
    out = hf_model(reranker.model).generate(
        **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    first = out.logits[0][:, [collator.yes_id, collator.no_id]].float().softmax(-1)[:, 0]
    assert torch.allclose(p_yes, first, atol=1e-5), (p_yes, first)
    assert len(set(p_yes.tolist())) == 3  # distinct inputs, distinct scores: nothing is constant
    alone = torch.cat([reranker.score_pointwise(collator.pointwise_inputs([pair])) for pair in pairs])
    assert torch.allclose(p_yes, alone, atol=1e-5)  # padding and batching do not change a score


MULTIMODAL_PAIRS = [
    (Item("q0", "Find the red circle."), Item("a", None, image("red"))),
    (Item("q1", "a shape", image("blue", "square", 84)), Item("b", "blue square")),
    (Item("q2", "text only", image("green")), Item("c", "a candidate with text", image("green", "square"))),
]
TEXT_PAIRS = [
    (Item("q0", "Find the red circle."), Item("a", "a red circle")),
    (Item("q1", "a shape"), Item("b", "blue square")),
    (Item("q2", "text only"), Item("c", "a longer candidate with more text")),
]


@pytest.mark.parametrize(
    ("backbone", "pairs"),
    [("tiny_backbone", MULTIMODAL_PAIRS), ("tiny_llava_next", MULTIMODAL_PAIRS), ("tiny_text_lm", TEXT_PAIRS)],
)
def test_zero_shot_p_true_from_one_forward_equals_the_first_generated_step(backbone, pairs, request):
    """On every backbone family: Qwen2-VL, LLaVA-Next (MM-Embed's judge family) and a text-only causal LM."""
    path = request.getfixturevalue(backbone)
    judge = load_reranker(path, judge=JudgePrompt())  # as `rerank --zero_shot true` loads a folder
    collator = judge.collator()
    inputs = collator.pointwise_inputs(pairs)
    prompts = collator.processor.tokenizer.batch_decode(inputs["input_ids"])
    named = ("image", "text", "image and text") if pairs is MULTIMODAL_PAIRS else ("text",) * 3
    for prompt, words in zip(prompts, named, strict=True):
        assert f"Does the above {words} match the query? True or False" in prompt  # MM-Embed's question
    tokenizer = collator.processor.tokenizer
    first_tokens = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("True", "False")]
    assert [collator.yes_id, collator.no_id] == first_tokens
    p_true = judge.score_pointwise(inputs)
    out = hf_model(judge.model).generate(
        **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    first = out.logits[0][:, [collator.yes_id, collator.no_id]].float().softmax(-1)[:, 0]
    assert torch.allclose(p_true, first, atol=1e-5), (p_true, first)
    assert len(set(p_true.tolist())) == 3
    with pytest.raises(LamraError, match="only placeholder"):
        JudgePrompt("Is the {query} matched by this {candidate}?")


def test_zero_shot_judge_asks_mm_embeds_question_for_each_task(tiny_backbone, tmp_path):
    """By default the judge asks MM-Embed's question for the pair's task: the paper's own words for MSCOCO's
    text-to-image task, the same pattern for the other M-BEIR tasks, the generic question elsewhere; a given
    question is asked everywhere."""
    assert judge_question("mscoco", 0, "image") == "Does the above daily-life image match the caption? True or False"
    asked = {judge_question(d, t, c[1]) for d in JUDGE_DOMAINS for c, t in TASKS.items()}
    assert len(asked) > 40 and all(q.endswith("? True or False") and "  " not in q for q in asked)
    assert judge_question("emoji", 0, "image") == "Does the above image match the query? True or False"
    judge = load_reranker(tiny_backbone, judge=JudgePrompt())
    collator = judge.collator()
    tasks = [("mscoco", 0), ("webqa", 1), None]
    prompts = collator.processor.tokenizer.batch_decode(collator.pointwise_inputs(MULTIMODAL_PAIRS, tasks)["input_ids"])
    expected = [
        "Does the above daily-life image match the caption? True or False",
        "Does the above Wikipedia passage match the question? True or False",
        "Does the above image and text match the query? True or False",
    ]
    for prompt, question in zip(prompts, expected, strict=True):
        assert prompt.count("True or False") == 1 and question in prompt
    given = JudgePrompt("Is the {candidate} relevant? True or False")
    assert {given.asks("text", t) for t in tasks} == {"Is the text relevant? True or False"}
    # `rerank` reads each task's (dataset, task id) from the task.json its run folder names
    task = tmp_path / "mscoco_task0"
    task.mkdir()
    (task / "task.json").write_text(json.dumps({"format": "lamra-pl-task", "dataset": "MSCOCO", "task_id": 0}))
    assert _task_kind({"task_file": str(task / "task.json")}) == ("mscoco", 0)
    assert _task_kind({}) is None


def test_listwise_scores_are_defined_for_every_candidate(reranker):
    collator = reranker.collator()
    lists = [
        (Item("q0", "red"), [Item("a", None, image("red")), Item("b", "blue")]),
        (Item("q1", "shape", image("green")), [Item("c", "x"), Item("d", "y"), Item("e", "z", image("red"))]),
        (Item("q2", "one"), [Item("f", "only candidate")]),
    ]
    scores = reranker.score_listwise(collator.listwise_inputs(lists), [2, 3, 1])
    assert scores.shape == (3, 3)
    assert torch.allclose(scores.sum(-1), torch.ones(3), atol=1e-6)
    assert (scores[0, :2] > 0).all() and (scores[1] > 0).all() and scores[2, 0] == 1.0
    assert scores[0, 2] == 0 and (scores[2, 1:] == 0).all()
    # What greedy decoding would answer is irrelevant: a row's scores come from its own logits only.
    generated = hf_model(reranker.model).generate(**collator.listwise_inputs(lists), max_new_tokens=3, do_sample=False)
    texts = collator.processor.tokenizer.batch_decode(generated[:, -3:])
    print("greedy continuations (a random model's answers):", texts)
    alone = reranker.score_listwise(collator.listwise_inputs(lists[1:2]), [3])
    assert torch.allclose(alone[0], scores[1], atol=1e-5)


def test_too_long_lists_are_refused(reranker):
    with pytest.raises(Exception, match="1 to 9 candidates"):
        reranker.collator().listwise_inputs([(Item("q", "x"), [Item(str(i), "y") for i in range(10)])])


# ------------------------------------------------------------------------------------------ sampling
def test_draws_never_label_a_positive_negative():
    counts: Counter[str] = Counter()
    for trial in range(2000):
        rng = random.Random(trial)
        positives = [f"p{i}" for i in range(rng.randint(1, 3))]
        negatives = [f"n{i}" for i in range(rng.randint(0, 6))]  # 0..3 is the fallback path of the reference
        ranked = rng.sample(positives + negatives, len(positives + negatives))
        d = draw(f"q{trial}", positives, ["an instruction"], ranked, seed=0, counts=counts)
        assert d.positive in positives
        drawn_negatives = [x for x in d.listwise if x != d.positive] + [d.pointwise_negative or ""]
        assert not set(drawn_negatives) & set(positives)
        if not negatives:
            assert d.pointwise_negative is None and d.listwise == [] and d.answer is None
            continue
        assert d.pointwise_negative in negatives
        assert 2 <= len(d.listwise) <= 5 and d.listwise.count(d.positive) == 1
        assert d.listwise[d.answer - 1] == d.positive
        assert len(set(d.listwise)) == len(d.listwise)
    assert counts["no_negative"] > 0 and counts["short_list"] > 0  # both fallbacks were exercised
    again = draw("q7", ["p0"], [], ["n0", "n1", "p0", "n2"], seed=0, counts=Counter())
    assert again == draw("q7", ["p0"], [], ["n0", "n1", "p0", "n2"], seed=0, counts=Counter())  # seeded


def test_fusion_with_zero_weight_reproduces_the_retrieval_ranking():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        retrieval = -np.sort(-np.round(rng.random(n), 2))  # sorted, with ties (as a run file's 6 decimals have)
        rerank = rng.random(n)
        order, fused = fuse(retrieval, rerank, 0.0)
        assert order.tolist() == list(range(n))
        assert np.array_equal(fused, retrieval)
    ranked = ["a", "b", "c", "d"]
    assert fused_ranking(ranked, np.array([0.9, 0.9, 0.8, 0.1]), np.array([0.0, 1.0]), 0.0) == ranked
    assert fused_ranking(ranked, np.array([0.9, 0.9, 0.8, 0.1]), np.array([0.0, 1.0]), 1.0) == ["b", "a", "c", "d"]
    # w=1 sums; the tail after the reranked head never moves
    assert fused_ranking(ranked, np.array([0.9, 0.5, 0.4, 0.3]), np.array([0.0, 0.1, 0.9]), 1.0) == ["c", "a", "b", "d"]


def test_tune_fusion_picks_the_weight_that_helps():
    # The positive is second by retrieval and first by the reranker: any w > 0.1 fixes R@1; w = 0 does not.
    queries = [(["n", "p", "m"], np.array([0.50, 0.45, 0.1]), np.array([0.0, 1.0, 0.0]), {"p"})] * 3
    w, recall = tune_fusion(queries, k=1, grid=(0.0, 0.01, 0.5, 1.0))
    assert (w, recall[0.0], recall[0.5]) == (0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def pipeline(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """Fixture converted; the untrained tiny retriever's runs on the training and test queries."""
    root = tmp_path_factory.mktemp("rerank")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    model = str(tiny_backbone)
    for name, pool in (("train", "train_pool"), ("test", "eval/test/global_pool")):
        ok(lamra_here("index", f"--model={model}", f"--pool={data / pool}", f"--out={root / 'index' / name}"))
    ok(
        lamra_here(
            "retrieve",
            f"--model={model}",
            f"--index={root / 'index/train'}",
            f"--queries={data}/train/*_task*",
            "--pools=[local]",
            "--k=100",
            f"--out={root / 'train_runs'}",
        )
    )
    ok(
        lamra_here(
            "retrieve",
            f"--model={model}",
            f"--index={root / 'index/test'}",
            f"--queries={data}/eval/test/*_task*",
            "--pools=[local]",
            f"--out={root / 'test_runs'}",
        )
    )
    ok(lamra_here("rerank-data", f"--runs={root / 'train_runs/local'}", f"--out={root / 'rerank_data'}"))
    return {"root": root, "data": data, "model": Path(model)}


def test_rerank_data_samples_hold_no_positive_as_negative(pipeline):
    out, data = pipeline["root"] / "rerank_data", pipeline["data"]
    report = json.loads((out / "report.json").read_text())
    import webdataset as wds

    total = 0
    for task in sorted((data / "train").iterdir()):
        qrels = read_qrels(task / "qrels.txt")
        run = read_run_file(pipeline["root"] / "train_runs/local" / f"{task.name}.run")
        top = dict(zip(run.qids, run.ranked, strict=True))
        for sample in wds.DataPipeline(
            wds.SimpleShardList(expand_shards(str(out / task.name))), wds.tarfile_to_samples()
        ):
            record = decode_record(sample)
            raw = json.loads(sample["json"])
            positives = qrels[record.qid]
            assert set(raw["positive_ids"]) == positives
            assert record.positives[0].id in positives
            assert not {n.id for n in record.negatives} & positives
            assert {n.id for n in record.negatives} <= set(top[record.qid])
            spec = record.rerank
            assert spec["pointwise"][0] == [0, True] and all(not label for _, label in spec["pointwise"][1:])
            assert spec["listwise"][spec["answer"] - 1] == 0 and spec["listwise"].count(0) == 1
            total += 1
        assert report["tasks"][task.name]["samples"] == report["tasks"][task.name]["queries"]
    assert total == sum(t["samples"] for t in report["tasks"].values()) > 0


def test_rerank_data_fallbacks_are_counted(pipeline, tmp_path):
    """A query ranked with positives only keeps its pointwise positive; one not ranked at all is skipped."""
    runs = tmp_path / "runs"
    runs.mkdir()
    manifest = json.loads((pipeline["root"] / "train_runs/local/runs.json").read_text())
    task = "emoji_task0"
    entry = manifest["tasks"][task]
    qrels = read_qrels(entry["qrels_file"])
    run = read_run_file(entry["run_file"])
    lines = []
    only_positives, unranked = run.qids[0], run.qids[1]
    for qid, ranked in zip(run.qids, run.ranked, strict=True):
        if qid == unranked:
            continue
        ids = sorted(qrels[qid]) if qid == only_positives else ranked
        lines += [f"{qid} Q0 {d} {r} {1.0 - r / 100:.6f} t\n" for r, d in enumerate(ids, start=1)]
    (runs / f"{task}.run").write_text("".join(lines))
    manifest["tasks"] = {task: {**entry, "run_file": str(runs / f"{task}.run")}}
    (runs / "runs.json").write_text(json.dumps(manifest))
    ok(lamra_here("rerank-data", f"--runs={runs}", f"--out={tmp_path / 'out'}", "--top_k=3"))
    counts = json.loads((tmp_path / "out/report.json").read_text())["tasks"][task]
    assert counts["no_ranking"] == 1 and counts["no_negative"] >= 1
    assert counts["samples"] == counts["queries"] - 1


def test_rerank_data_and_rerank_refuse_unknown_ids(pipeline, tmp_path):
    manifest = json.loads((pipeline["root"] / "test_runs/local/runs.json").read_text())
    name, entry = next(iter(manifest["tasks"].items()))
    bad = tmp_path / "runs"
    bad.mkdir()
    text = Path(entry["run_file"]).read_text().splitlines()
    qid, _, _, rank, score, tag = text[0].split()
    (bad / f"{name}.run").write_text("\n".join([f"{qid} Q0 99:nowhere {rank} {score} {tag}", *text[1:]]) + "\n")
    manifest["tasks"] = {name: {**entry, "run_file": str(bad / f"{name}.run")}}
    (bad / "runs.json").write_text(json.dumps(manifest))
    checkpoint = str(pipeline["model"])
    clean_error(lamra_here("rerank", f"--model={checkpoint}", f"--runs={bad}", f"--out={tmp_path / 'o'}"), "99:nowhere")
    clean_error(lamra_here("rerank-data", f"--runs={bad}", f"--out={tmp_path / 'o2'}"), "99:nowhere", str(bad))
    (bad / f"{name}.run").write_text("ghost Q0 " + text[0].split()[2] + " 1 0.5 t\n")
    clean_error(lamra_here("rerank-data", f"--runs={bad}", f"--out={tmp_path / 'o3'}"), "ghost")
    clean_error(
        lamra_here(
            "rerank",
            f"--model={checkpoint}",
            f"--runs={pipeline['root'] / 'test_runs/local'}",
            "--out=x",
            "--mode=listwise",
            "--top_n=10",
        ),
        "top_n 10",
    )
    clean_error(lamra_here("rerank-data", f"--runs={tmp_path}", "--out=x"), "runs.json")
    clean_error(
        lamra_here("rerank-data", f"--runs={pipeline['root'] / 'train_runs/local'}", f"--out={tmp_path}"), "not empty"
    )
    clean_error(
        lamra_here(
            "rerank",
            f"--model={checkpoint}",
            f"--runs={pipeline['root'] / 'test_runs/local'}",
            "--out=x",
            "--fusion=-1",
        ),
        ">= 0",
    )


@pytest.mark.slow
def test_make_rerank_targets_train_rerank_and_evaluate(pipeline, tmp_path):
    """make rerank-data / rerank-train / rerank on the converted fixture, with the tiny configs."""
    root, data = pipeline["root"], pipeline["data"]
    venv = Path(sys.executable).parent.parent
    common = ["make", "--no-print-directory", f"VENV={venv}", f"DATA={data}", f"MODEL={pipeline['model']}"]

    def make(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*common, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    rerank_data = tmp_path / "rerank_data"
    make(
        "rerank-data",
        f"TRAIN_INDEX={root / 'index/train'}",
        f"TRAIN_RUNS={tmp_path / 'train_runs'}",
        f"RERANK_DATA={rerank_data}",
    )
    assert json.loads((rerank_data / "report.json").read_text())["tasks"]
    runs = tmp_path / "tb"
    make(
        "rerank-train",
        "CONFIG=experiments/tiny/rerank_joint.yaml",
        f"BACKBONE={pipeline['model']}",
        f"RERANK_DATA={rerank_data}",
        f"ARGS=--trainer.max_steps=4 --trainer.log_every_n_steps=1 --data.init_args.batch_size=4 "
        f"--trainer.logger.init_args.save_dir={runs}",
    )
    logged = scalars(runs / "tiny_rerank" / "version_0")
    assert {"train/loss", "train/loss_pointwise", "train/loss_listwise"} <= set(logged)
    checkpoint = runs / "tiny_rerank/version_0/checkpoints/last.ckpt"
    # the trained LoRA reranker, merged into a full checkpoint folder, scores as the checkpoint does
    ok(lamra_here("merge", f"--ckpt={checkpoint}", f"--out={tmp_path / 'merged'}"))
    pairs = [(Item("q", "Find the red circle."), Item("a", None, image("red"))), (Item("q2", "x"), Item("b", "y"))]
    scores = []
    for model in (checkpoint, tmp_path / "merged"):
        module = load_reranker(model)
        scores.append(module.score_pointwise(module.collator().pointwise_inputs(pairs)))
    assert torch.allclose(scores[0], scores[1], atol=1e-5)
    eval_dir = root / "test_runs"
    make("rerank", f"RERANKER={checkpoint}", f"EVAL={eval_dir}", "FUSION=0", "ARGS=--top_n=5")
    reranked = eval_dir / "reranked_local"
    results = json.loads((reranked / "results.json").read_text())
    about = json.loads((reranked / "runs.json").read_text())["rerank"]
    pools = {n: json.loads((data / "eval/test" / n / "task.json").read_text())["pool"] for n in results["tasks"]}
    # the fixture's local pools hold 4 or 5 candidates: every query of a 4-candidate pool has fewer than 5
    assert about["fewer_than_top_n"] == {
        n: (results["tasks"][n]["num_queries"] if p < 5 else 0) for n, p in pools.items()
    }
    assert results["tasks"] and 0.0 <= results["average"]["R@1"] <= 1.0
    # w = 0: the reranked runs rank exactly as the retrieval did, although every head was rescored
    for name, entry in json.loads((reranked / "runs.json").read_text())["tasks"].items():
        assert read_run_file(entry["run_file"]).ranked == read_run_file(entry["retrieval_run_file"]).ranked
        scored = (reranked / "scores" / f"{name}.tsv").read_text().splitlines()
        assert len(scored) == sum(min(5, len(r)) for r in read_run_file(entry["retrieval_run_file"]).ranked)
        assert all(0.0 <= float(line.split("\t")[4]) <= 1.0 for line in scored)
    listwise = tmp_path / "listwise"
    ok(
        lamra_here(
            "rerank",
            f"--model={checkpoint}",
            f"--runs={eval_dir / 'local'}",
            f"--out={listwise}",
            "--mode=listwise",
            "--top_n=3",
        )
    )
    for name, entry in json.loads((listwise / "runs.json").read_text())["tasks"].items():
        per_query: dict[str, float] = {}
        for line in (listwise / "scores" / f"{name}.tsv").read_text().splitlines():
            qid, *_, value = line.split("\t")
            per_query[qid] = per_query.get(qid, 0.0) + float(value)
        assert len(per_query) == len(read_run_file(entry["run_file"]).qids)
        assert all(abs(total - 1.0) < 1e-5 for total in per_query.values())  # every candidate of a list scored
    # MM-Embed's zero-shot reranking: the untrained folder judges each query's top 3; the head is re-sorted by
    # P(True) alone, ties in retrieval order, and the rest of the run follows unchanged.
    make("rerank-zeroshot", f"JUDGE={pipeline['model']}", f"EVAL={eval_dir}", "ARGS=--top_n=3")
    zero = eval_dir / "zeroshot_local"
    manifest = json.loads((zero / "runs.json").read_text())
    assert manifest["rerank"]["mode"] == "zero-shot judge" and set(manifest["rerank"]["fusion"].values()) == {"inf"}
    assert json.loads((zero / "results.json").read_text())["tasks"].keys() == results["tasks"].keys()
    for name, entry in manifest["tasks"].items():
        p_true: dict[tuple[str, str], float] = {}
        for line in (zero / "scores" / f"{name}.tsv").read_text().splitlines():
            qid, did, _, _, value = line.split("\t")
            p_true[qid, did] = float(value)
        retrieved, fused = read_run_file(entry["retrieval_run_file"]), read_run_file(entry["run_file"])
        before = dict(zip(retrieved.qids, retrieved.ranked, strict=True))
        for qid, ranked in zip(fused.qids, fused.ranked, strict=True):
            head = before[qid][:3]
            want = sorted(head, key=lambda d: (-p_true[qid, d], head.index(d)))
            assert ranked[:3] == want and ranked[3:] == before[qid][3:], (name, qid)
    ok(lamra_here("tune-fusion", f"--reranked={reranked}", f"--out={tmp_path / 'fusion.yaml'}"))
    tuned = (tmp_path / "fusion.yaml").read_text()
    assert all(re.search(rf"^{name}: [0-9.]+$", tuned, re.M) for name in results["tasks"])
