"""Reranker -> embedder distillation: the loss against a hand computation, its gradient under 2 gloo processes and
GradCache, the collator's lists, `lamra-pl distill-data` (what it writes, its counts, its refusals), a fit on its
shards and the make targets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from conftest import shape_image
from helpers import ROOT, clean_error, lamra, lamra_here, ok, one_step_grads, scalars
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.runs import read_manifest, read_pair_scores, read_run_file, scores_file, write_manifest
from lamra_pl.formats.sample import Item, Record, decode_record, encode_record
from lamra_pl.formats.shards import expand_shards
from lamra_pl.formats.task import read_qrels
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.distill import DistillSpec, distill_objective
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import Example, stable_id
from lamra_pl.models.losses import distillation_loss
from lamra_pl.recipes.mbeir import convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


# ---------------------------------------------------------------------------------------------- the loss
def hand_kl(q: list[list[float]], lists: list[list[list[float]]], scores: list[list[float]], tau: float, t: float):
    """mean over queries of sum_j p_t(j) log(p_t(j) / p_s(j)), written out with math."""

    def softmax(x: list[float]) -> list[float]:
        top = max(x)
        e = [math.exp(v - top) for v in x]
        return [v / sum(e) for v in e]

    total = 0.0
    for qi, candidates, s in zip(q, lists, scores, strict=True):
        student = softmax([sum(a * b for a, b in zip(qi, c, strict=True)) / tau for c in candidates])
        teacher = softmax([v / t for v in s])
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(teacher, student, strict=True))
    return total / len(q)


def test_distillation_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 5), dim=-1)
    lists = F.normalize(torch.randn(3, 4, 5), dim=-1)
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.8, 0.05], [0.6, 0.7, 0.1, 0.0]])
    tau, t = 0.07, 0.1
    want = hand_kl(q.tolist(), lists.tolist(), scores.tolist(), tau, t)
    got = distillation_loss(q, lists, scores, 1 / tau, t)
    assert got.dtype == torch.float32
    assert want > 0.1 and abs(got.item() - want) < 1e-5
    # the teacher is the target: KL(teacher || student), not the reverse
    student = F.log_softmax(torch.einsum("bd,bkd->bk", q, lists) / tau, -1)
    reverse = F.kl_div(F.log_softmax(scores / t, -1), student, log_target=True, reduction="batchmean")
    assert abs(reverse.item() - want) > 1e-2
    # zero when the teacher's distribution is the student's; the teacher carries no gradient
    assert distillation_loss(q, lists, torch.einsum("bd,bkd->bk", q, lists), 1 / tau, tau).abs() < 1e-6
    q.requires_grad_()
    scores.requires_grad_()
    distillation_loss(q, lists, scores, 1 / tau, t).backward()
    assert scores.grad is None and q.grad.abs().max() > 0


def test_the_objective_reads_the_lists_after_the_positives_and_adds_infonce():
    torch.manual_seed(1)
    b, k, d = 2, 3, 4
    q = F.normalize(torch.randn(b, d), dim=-1)
    head = F.normalize(torch.randn(b * 2, d), dim=-1)  # positives and one hard negative each
    lists = F.normalize(torch.randn(b * k, d), dim=-1)
    scores = torch.rand(b, k)
    infonce = torch.tensor(1.25)
    spec = DistillSpec(teacher_temperature=0.2, weight=0.5, infonce_weight=2.0)
    loss, stats = distill_objective(spec, infonce, q, torch.cat([head, lists]), scores, 20.0)
    kl = distillation_loss(q, lists.reshape(b, k, d), scores, 20.0, 0.2)
    assert torch.allclose(loss, 0.5 * kl + 2.0 * infonce) and torch.allclose(stats["distill_kl"], kl)
    assert 0.0 <= stats["distill_agree"] <= 1.0
    with pytest.raises(LamraError, match="cannot hold"):
        distill_objective(spec, infonce, q, lists[:4], scores, 20.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"teacher_temperature": 0.0}, "teacher_temperature"),
        ({"weight": -1.0}, "weight"),
        ({"weight": 0.0, "infonce_weight": 0.0}, "nothing would train"),
        ({"candidates": 0}, "candidates"),
    ],
)
def test_distill_spec_refuses_bad_settings(bad, message):
    with pytest.raises(LamraError, match=message):
        DistillSpec(**bad)


# ---------------------------------------------------------------------------------------------- the sample format
def test_a_sample_carries_its_list_and_scores_and_refuses_a_score_that_is_not_a_finite_number():
    from conftest import png

    red = {"id": "img:red", "image": png(shape_image("red", "circle"))}
    listed = [{**red, "score": 0.75}, {"id": "t:1", "txt": "a red ball", "score": 1}]
    sample = encode_record("k0", qid="q0", query={"txt": "red circle"}, positives=[red], candidates=listed)
    record = decode_record(sample)
    assert [c.id for c in record.candidates] == ["img:red", "t:1"] and record.teacher_scores == [0.75, 1.0]
    assert record.candidates[0].image.size == (56, 56) and record.candidates[1].text == "a red ball"
    assert "candidates" not in json.loads(encode_record("k1", qid="q1", query={"txt": "x"}, positives=[red])["json"])
    assert decode_record(encode_record("k1", qid="q1", query={"txt": "x"}, positives=[red])).candidates == []
    for bad in (float("nan"), True, "0.5", None):
        raw = json.loads(sample["json"])
        raw["candidates"][1]["score"] = bad
        with pytest.raises(BadSampleError, match=r"candidates\[1\] has no finite teacher 'score'"):
            decode_record({**sample, "json": json.dumps(raw).encode()})


def test_the_distillation_recipe():
    from test_configs import ParseOnly, cli

    parsed = cli(ParseOnly, "-c", str(ROOT / "experiments/lamra_ret/distill.yaml")).config
    model = parsed.model.init_args
    assert model.backbone.rope == "1d" and model.temperature == 0.05
    assert (model.distill.teacher_temperature, model.distill.weight, model.distill.infonce_weight) == (0.1, 1.0, 0.0)
    assert model.distill.candidates == 16 and parsed.data.init_args.num_negatives == 0
    trainer = parsed.trainer
    assert parsed.data.init_args.batch_size * trainer.devices * trainer.num_nodes == 128


# ---------------------------------------------------------------------------------------------- the collator
@pytest.fixture(scope="module")
def distilling(tiny_backbone) -> EmbeddingModule:
    return EmbeddingModule(BackboneSpec(str(tiny_backbone), gradient_checkpointing=False), distill=DistillSpec())


def record_with_list(qid: str, n: int) -> Record:
    """A record whose list holds n text candidates, scored 0, 0.1, 0.2, ..."""
    items = [Item(f"c{i}", text=f"candidate {i}") for i in range(n)]
    positive = Item("img:red", image=shape_image("red", "circle"))
    scores = [0.1 * i for i in range(n)]
    return Record(qid, qid, Item(qid, "red circle"), [positive], candidates=items, teacher_scores=scores)


def test_the_collator_carries_each_list_after_the_positives_with_its_scores(distilling):
    collator = distilling.collator()
    examples = [collator.choose(record_with_list(f"q{i}", 3), None, 0) for i in range(2)]
    batch = collator(examples)
    assert torch.equal(batch["teacher_scores"], torch.tensor([[0.0, 0.1, 0.2]] * 2))
    ids = [stable_id(i) for i in ["img:red", "img:red", "c0", "c1", "c2", "c0", "c1", "c2"]]
    assert batch["candidate_ids"].tolist() == ids
    assert batch["candidates"]["input_ids"].shape[0] == 8
    # `candidates` cuts each list to its best-ranked; a record without a list, or a shorter one, is a bad sample
    two = EmbeddingModule(distilling.backbone.spec, distill=DistillSpec(candidates=2)).collator()
    assert [c.id for c in two.choose(record_with_list("q", 3), None, 0).candidates] == ["c0", "c1"]
    with pytest.raises(BadSampleError, match="a list of 1 candidates"):
        two.choose(record_with_list("q", 1), None, 0)
    with pytest.raises(BadSampleError, match="distill-data"):
        collator.choose(record_with_list("q", 0), None, 0)
    with pytest.raises(LamraError, match=r"lists of \[2, 3\]"):
        collator([examples[0], collator.choose(record_with_list("q9", 2), None, 0)])
    # without model.distill a list is not read, and the batch has no teacher scores
    plain = EmbeddingModule(distilling.backbone.spec).collator()
    assert "teacher_scores" not in plain([plain.choose(record_with_list("q", 3), None, 0)])


# ---------------------------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def step(tiny_backbone, tmp_path_factory) -> Callable[..., dict[str, torch.Tensor]]:
    """`(devices, mode, strategy="ddp")`: one distillation step's loss, KL term and gradients (`scripts/ddp_grads.py`
    with LOSS distill), each run once."""
    run = one_step_grads(tiny_backbone, tmp_path_factory.mktemp("distill_grads"))
    return lambda devices, mode, strategy="ddp": run(devices, mode, 0.0, strategy, "distill")


def assert_same_step(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], fsdp2: bool = False) -> None:
    """The same loss, KL term and gradients; an FSDP2 run has no learnable temperature (it refuses a trainable
    tensor outside the sharded trunk), so every other tensor."""
    assert got.keys() == want.keys() - ({"log_logit_scale"} if fsdp2 else set())
    assert len([k for k in got if "lora_" in k]) == 28 and "log_logit_scale" in want
    assert want["__kl__"].item() > 1e-3  # the KL term is in the loss, not vacuous
    torch.testing.assert_close(got["__loss__"], want["__loss__"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["__kl__"], want["__kl__"], atol=1e-5, rtol=0)
    for name in got.keys() - {"__loss__", "__kl__"}:
        assert want[name].abs().max() > 1e-6, f"{name}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_two_process_distillation_gradient_equals_one_process_on_the_concatenated_batch(step):
    assert_same_step(step(2, "full"), step(1, "full"))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_gradcache_distillation_gradient_equals_the_full_batch_gradient(step, devices):
    assert_same_step(step(devices, "gradcache"), step(1, "full"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "gradcache"])
def test_distillation_under_fsdp2_equals_one_process_on_the_concatenated_batch(step, mode):
    assert_same_step(step(2, mode, "fsdp2"), step(1, "full"), fsdp2=True)


# ---------------------------------------------------------------------------------------------- distill-data
K = 4


@pytest.fixture(scope="module")
def pipeline(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The fixture converted; the untrained tiny model's top 5 of the training queries (each task's pool), scored
    pointwise by the same folder as a zero-shot LamRA-Rank reranker; distill-data --k 4 of them."""
    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    model = str(tiny_backbone)
    ok(lamra_here("index", f"--model={model}", f"--pool={data / 'train_pool'}", f"--out={root / 'index'}"))
    queries = f"{data}/train/*_task*"
    ok(
        lamra_here(
            "retrieve",
            f"--model={model}",
            f"--index={root / 'index'}",
            f"--queries={queries}",
            "--pools=[local]",
            "--k=5",
            f"--out={root / 'runs'}",
        )
    )
    ok(
        lamra_here(
            "rerank", f"--model={model}", f"--runs={root / 'runs/local'}", f"--out={root / 'scored'}", "--top_n=5"
        )
    )
    ok(
        lamra_here(
            "distill-data",
            f"--runs={root / 'runs/local'}",
            f"--scores={root / 'scored'}",
            f"--out={root / 'out'}",
            f"--k={K}",
        )
    )
    return {"root": root, "data": data, "runs": root / "runs/local", "scores": root / "scored", "out": root / "out"}


def read_task(folder: Path) -> list[Record]:
    pipeline = wds.DataPipeline(wds.SimpleShardList(expand_shards(str(folder))), wds.tarfile_to_samples())
    return [decode_record(s) for s in pipeline]


def test_distill_data_writes_each_query_with_its_top_k_and_the_rerankers_scores(pipeline):
    report = json.loads((pipeline["out"] / "report.json").read_text())
    manifest = json.loads((pipeline["runs"] / "runs.json").read_text())
    assert report["k"] == K and report["teacher"]["top_n"] == 5 and set(report["tasks"]) == set(manifest["tasks"])
    total = with_positive = 0
    for task, counts in report["tasks"].items():
        run = read_run_file(pipeline["runs"] / f"{task}.run")
        top = dict(zip(run.qids, run.ranked, strict=True))
        teacher = read_pair_scores(scores_file(pipeline["scores"], task))
        qrels = read_qrels(pipeline["data"] / "train" / task / "qrels.txt")
        originals = {r.qid: r for r in read_task(pipeline["data"] / "train" / task)}
        written = read_task(pipeline["out"] / task)
        assert counts["queries"] == len(originals) == counts["samples"] + sum(counts["skipped"].values())
        assert counts["samples"] == len(written) == len(originals)  # every query ranked and scored: none skipped
        for record in written:
            original = originals[record.qid]
            assert [c.id for c in record.candidates] == top[record.qid][:K]
            assert record.teacher_scores == [teacher[record.qid][c.id] for c in record.candidates]
            assert all(0.0 <= s <= 1.0 for s in record.teacher_scores)  # P(Yes)
            assert {p.id for p in record.positives} == {p.id for p in original.positives} == qrels[record.qid]
            assert record.instructions == original.instructions and record.query.text == original.query.text
            assert all(c.text is not None or c.image is not None for c in record.candidates)
            with_positive += any(c.id in qrels[record.qid] for c in record.candidates)
            total += 1
    assert total == 26 and with_positive == sum(t["lists_with_positive"] for t in report["tasks"].values())


def test_distill_data_counts_every_query_it_does_not_write(pipeline, tmp_path):
    """One query unranked, one ranked too short, one with a candidate the reranker did not score: each skipped and
    counted, the rest written."""
    task = "emoji_task0"
    manifest = read_manifest(pipeline["runs"])  # its paths resolved: rewritten for the new folder below
    entry = manifest["tasks"][task]
    run = read_run_file(entry["run_file"])
    unranked, short, unscored = run.qids[:3]
    runs = tmp_path / "runs"
    runs.mkdir()
    lines = []
    for qid, ranked in zip(run.qids, run.ranked, strict=True):
        if qid != unranked:
            keep = ranked[:2] if qid == short else ranked
            lines += [f"{qid} Q0 {d} {r} {1.0 - r / 100:.6f} t\n" for r, d in enumerate(keep, start=1)]
    (runs / f"{task}.run").write_text("".join(lines))
    write_manifest(runs, {**manifest, "tasks": {task: {**entry, "run_file": str(runs / f"{task}.run")}}})
    scored = tmp_path / "scored"
    (scored / "scores").mkdir(parents=True)
    (scored / "runs.json").write_text((pipeline["scores"] / "runs.json").read_text())
    drop = run.ranked[2][1]
    kept = [
        line
        for line in scores_file(pipeline["scores"], task).read_text().splitlines(keepends=True)
        if not line.startswith(f"{unscored}\t{drop}\t")
    ]
    scores_file(scored, task).write_text("".join(kept))
    args = (f"--runs={runs}", f"--scores={scored}", f"--out={tmp_path / 'out'}", "--k=4")
    proc = ok(lamra_here("distill-data", *args))
    counts = json.loads((tmp_path / "out/report.json").read_text())["tasks"][task]
    assert counts["skipped"] == {"no_ranking": 1, "short_list": 1, "unscored": 1}
    assert counts["samples"] == counts["queries"] - 3 == len(read_task(tmp_path / "out" / task))
    assert json.loads(proc.stdout)["tasks"][task] == counts


def test_distill_data_refuses_bad_input_with_one_line(pipeline, tmp_path):
    runs, scores = pipeline["runs"], pipeline["scores"]

    def refused(*args: str, needle: str) -> None:
        clean_error(lamra_here("distill-data", *args), needle)

    refused(f"--runs={runs}", f"--scores={runs}", f"--out={tmp_path / 'a'}", needle="not a folder written by")
    refused(f"--runs={runs}", f"--scores={scores}", f"--out={tmp_path / 'b'}", "--k=6", needle="k must be 1 to 5")
    refused(f"--runs={runs}", f"--scores={scores}", f"--out={pipeline['out']}", needle="is not empty")
    refused(f"--runs={tmp_path}", f"--scores={scores}", f"--out={tmp_path / 'c'}", needle="runs.json")
    # the reranked folder of other runs: a task it did not rerank, or scores of none of these candidates
    other = tmp_path / "other"
    (other / "scores").mkdir(parents=True)
    manifest = json.loads((scores / "runs.json").read_text())
    task = next(iter(manifest["tasks"]))
    (other / "runs.json").write_text(json.dumps({**manifest, "tasks": {task: manifest["tasks"][task]}}))
    refused(f"--runs={runs}", f"--scores={other}", f"--out={tmp_path / 'd'}", needle="reranked no runs of the tasks")
    (other / "runs.json").write_text((scores / "runs.json").read_text())
    for name in manifest["tasks"]:
        scores_file(other, name).write_text("ghost\t0:1\t1\t0.5\t0.5\n")
    refused(f"--runs={runs}", f"--scores={other}", f"--out={tmp_path / 'e'}", needle="scores none of the candidates")
    scores_file(other, task).write_text("q\td\t1\t0.5\tnan\n")
    refused(f"--runs={runs}", f"--scores={other}", f"--out={tmp_path / 'f'}", needle=f"{task}.tsv:1")
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing written by a refused run


def test_distillation_steps_move_the_student_to_the_teacher(tiny_backbone):
    """Steps of the objective alone (no InfoNCE) on one batch: the KL to the teacher falls, and the student comes to
    head each list with the teacher's first candidate."""
    torch.manual_seed(0)
    module = EmbeddingModule(
        BackboneSpec(str(tiny_backbone), gradient_checkpointing=False, dtype="float32"),
        lora=LoraSpec(r=8, alpha=16, dropout=0.0),
        distill=DistillSpec(teacher_temperature=0.1),
    )
    module.configure_model()
    shapes = [("red", "circle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle")]
    images = [Item(f"img:{c}-{s}", image=shape_image(c, s)) for c, s in shapes]
    examples = []
    for i, (color, shape) in enumerate(shapes[:3]):
        scores = [0.9 if j == i else 0.1 for j in range(4)]  # a teacher sure of the matching image
        example = Example(
            Item(f"q{i}", f"{color} {shape}"), images[i], [], [images[i].id], candidates=images, teacher_scores=scores
        )
        examples.append(example)
    batch = module.collator()(examples)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    kl, agree = [], []
    for _ in range(10):
        optimizer.zero_grad()
        loss, _ = module.contrastive_loss(batch, gather=False)
        loss.backward()
        optimizer.step()
        kl.append(module._distill_stats["distill_kl"].item())
        agree.append(module._distill_stats["distill_agree"].item())
    assert kl[0] > 1.0 and kl[-1] < 0.25 * kl[0], kl  # (measured: 1.37 -> 0.05)
    assert agree[-1] == 1.0, agree


def test_fit_on_distill_data_trains_and_logs_each_term(pipeline, tiny_backbone, tmp_path):
    proc = lamra(
        "fit",
        "-c",
        "experiments/tiny/distill.yaml",
        f"--model.init_args.backbone.path={tiny_backbone}",
        f"--data.init_args.train_shards={pipeline['out']}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    ok(proc)
    run = tmp_path / "tiny_distill" / "version_0"
    logged = scalars(run)
    assert all(len(logged[f"train/{t}"]) == 3 for t in ("loss", "distill_kl", "infonce", "distill_agree"))
    for (_, loss), (_, kl), (_, infonce) in zip(
        logged["train/loss"], logged["train/distill_kl"], logged["train/infonce"], strict=True
    ):
        assert abs(loss - (kl + 0.5 * infonce)) < 1e-4  # the tiny config's weights: 1 * KL + 0.5 * InfoNCE
    assert not any(t.startswith("data/skipped") for t in logged)  # every sample carried its list
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # peft starts B at zero: the steps trained


@pytest.mark.slow
def test_make_distill_data_and_make_distill(pipeline, tiny_backbone, tmp_path):
    venv = Path(sys.executable).parent.parent
    common = ["make", "--no-print-directory", f"VENV={venv}", f"DATA={pipeline['data']}"]

    def make(*args: str) -> None:
        proc = subprocess.run([*common, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    shards = tmp_path / "distilled"
    make(
        "distill-data",
        f"MODEL={tiny_backbone}",
        f"RERANKER={tiny_backbone}",
        f"TRAIN_INDEX={pipeline['root'] / 'index'}",
        f"DISTILL_RUNS={tmp_path / 'runs'}",
        "DISTILL_K=3",
        f"DISTILLED={shards}",
    )
    report = json.loads((shards / "report.json").read_text())
    assert report["k"] == 3 and sum(t["samples"] for t in report["tasks"].values()) == 26
    make(
        "distill",
        "CONFIG=experiments/tiny/distill.yaml",
        f"BACKBONE={tiny_backbone}",
        f"DISTILLED={shards}",
        f"ARGS=--trainer.max_steps=2 --trainer.log_every_n_steps=1 --trainer.logger.init_args.save_dir={tmp_path}",
    )
    run = tmp_path / "tiny_distill" / "version_0"
    assert f"train_shards: {shards}" in (run / "config.yaml").read_text()
    assert len(scalars(run)["train/distill_kl"]) == 2
