"""The InfoNCE's options (`LossSpec`) against hand computations, float32: the false-negative margin, the query-query
and candidate-candidate terms, hardness weighting, per-task temperatures and Matryoshka sizes; each is the plain
InfoNCE, bit for bit, when off. (Their exactness under 2 DDP processes and GradCache: test_ddp.py.)"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import shape_image
from helpers import ROOT
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import Item, Record
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import Example, choose_example
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.models.losses import (
    false_negative_mask,
    info_nce,
    info_nce_with_options,
    matryoshka_loss,
    query_query_mask,
)

Vectors = list[list[float]]
TINY_CLIP = str(ROOT / "experiments/clip/tiny_clip.json")


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def hand_loss(
    q: Vectors,
    c: Vectors,
    labels: list[int],
    tau: float | list[float],
    masked: set[tuple[int, int]],
    *,
    all_q: Vectors | None = None,
    query_masked: set[tuple[int, int]] = frozenset(),
    dd: bool = False,
    margin: float | None = None,
    beta: float | None = None,
) -> tuple[float, int]:
    """(mean over queries of -log(exp(pos/tau_i) / Z_i), how many columns the margin dropped), row by row:
    Z_i = exp(pos/tau_i) + sum over kept negatives n of w(n) * exp(n/tau_i), w(n) = exp(beta * n) or 1."""
    total, by_margin = 0.0, 0
    for i, qi in enumerate(q):
        t = tau[i] if isinstance(tau, list) else tau
        label = labels[i]
        positive = dot(qi, c[label])
        negatives = [dot(qi, cj) for j, cj in enumerate(c) if j != label and (i, j) not in masked]
        if all_q is not None:
            negatives += [dot(qi, qg) for g, qg in enumerate(all_q) if (i, g) not in query_masked]
        if dd:
            negatives += [dot(c[label], cj) for j, cj in enumerate(c) if j != label and (i, j) not in masked]
        if margin is not None:
            kept = [n for n in negatives if not n > positive + margin]
            by_margin += len(negatives) - len(kept)
            negatives = kept
        z = math.exp(positive / t) + sum((math.exp(beta * n) if beta else 1.0) * math.exp(n / t) for n in negatives)
        total += -(positive / t - math.log(z))
    return total / len(q), by_margin


def cut(vectors: Vectors, d: int) -> Vectors:
    """The first d dimensions, L2-normalised again, by hand."""
    out = []
    for v in vectors:
        norm = math.sqrt(sum(x * x for x in v[:d]))
        out.append([x / norm for x in v[:d]])
    return out


@pytest.fixture
def batch() -> dict:
    """Three local queries, candidates [pos0, pos1, pos2, neg0, neg1, neg2]; queries 0 and 2 share a positive
    (an in-batch duplicate), and query 2 has a second positive (id 12, query 1's hard negative)."""
    torch.manual_seed(0)
    return {
        "q": F.normalize(torch.randn(3, 6, dtype=torch.float64), dim=-1),
        "c": F.normalize(torch.randn(6, 6, dtype=torch.float64), dim=-1),
        "ids": torch.tensor([10, 11, 10, 20, 12, 21]),
        "positive_ids": torch.tensor([[10, -1], [11, -1], [10, 12]]),
        "labels": torch.arange(3),
    }


def masked_pairs(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(i, j) for i, j in mask.nonzero().tolist()}


def test_with_every_option_off_the_loss_is_info_nce_bit_for_bit(batch):
    q, c, labels = batch["q"], batch["c"], batch["labels"]
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    plain = info_nce(q, c, labels, 20.0, mask)
    off = info_nce_with_options(q, c, labels, 20.0, mask)
    assert torch.equal(off, plain)
    assert torch.equal(
        matryoshka_loss(partial(info_nce_with_options, labels=labels, logit_scale=20.0, mask=mask), [q, c], None), plain
    )
    assert torch.equal(matryoshka_loss(lambda a, b: info_nce(a, b, labels, 20.0, mask), [q, c], []), plain)
    spec = LossSpec.of(None)
    assert spec == LossSpec.of({}) and spec.weights == [] and not spec.query_query and not spec.candidate_candidate
    assert spec.false_negative_margin is spec.hardness_beta is spec.task_temperatures is spec.matryoshka_dims is None


def test_false_negative_margin_drops_candidates_scoring_above_the_positive_plus_margin(batch):
    q, c, labels = batch["q"], batch["c"].clone(), batch["labels"]
    c[5] = F.normalize(q[1] + 0.1 * c[5], dim=-1)  # query 2's hard negative, made a near copy of query 1
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    for margin in (0.0, 0.1, -0.2):
        want, dropped = hand_loss(q.tolist(), c.tolist(), labels.tolist(), 0.05, masked_pairs(mask), margin=margin)
        got = info_nce_with_options(q, c, labels, 20.0, mask, margin=margin)
        assert dropped > 0, margin  # the margin drops something here, so the comparison is not the plain loss
        assert abs(got.item() - want) < 1e-5, margin
        assert abs(got.item() - info_nce(q, c, labels, 20.0, mask).item()) > 1e-3
    # A margin above every score gap drops nothing: the plain loss.
    far = info_nce_with_options(q, c, labels, 20.0, mask, margin=3.0)
    torch.testing.assert_close(far, info_nce(q, c, labels, 20.0, mask), rtol=0, atol=1e-6)


def test_query_query_term_adds_the_other_queries_as_negatives(batch):
    q, c, labels, ids = batch["q"], batch["c"], batch["labels"], batch["ids"]
    mask = false_negative_mask(batch["positive_ids"], ids, labels)
    query_mask = query_query_mask(batch["positive_ids"], ids[labels])
    # each query against itself, and queries 0 and 2 against each other (their labelled positives are the same id)
    assert masked_pairs(query_mask) == {(0, 0), (1, 1), (2, 2), (0, 2), (2, 0)}
    want, _ = hand_loss(
        q.tolist(),
        c.tolist(),
        [0, 1, 2],
        0.05,
        masked_pairs(mask),
        all_q=q.tolist(),
        query_masked=masked_pairs(query_mask),
    )
    got = info_nce_with_options(q, c, labels, 20.0, mask, all_queries=q, query_mask=query_mask)
    assert abs(got.item() - want) < 1e-5
    with pytest.raises(ValueError, match="mask"):
        info_nce_with_options(q, c, labels, 20.0, mask, all_queries=q)


def test_query_query_term_on_one_rank_of_a_gathered_batch():
    """Rank 1 of 2: its 2 local queries are rows 2-3 of the gathered 4, its labels index the gathered candidates."""
    torch.manual_seed(1)
    all_q = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(8, 5, dtype=torch.float64), dim=-1)  # rank 0: [p0 p1 n0 n1], rank 1: [p2 p3 n2 n3]
    ids = torch.arange(100, 108)
    all_labels = torch.tensor([0, 1, 4, 5])
    positive_ids = torch.tensor([[104], [105]])  # rank 1's queries
    labels = all_labels[2:]
    query_mask = query_query_mask(positive_ids, ids[all_labels])
    assert masked_pairs(query_mask) == {(0, 2), (1, 3)}  # each local query against its own gathered row
    mask = false_negative_mask(positive_ids, ids, labels)
    want, _ = hand_loss(
        all_q[2:].tolist(), c.tolist(), labels.tolist(), 0.1, set(), all_q=all_q.tolist(), query_masked={(0, 2), (1, 3)}
    )
    got = info_nce_with_options(all_q[2:], c, labels, 10.0, mask, all_queries=all_q, query_mask=query_mask)
    assert abs(got.item() - want) < 1e-5


def test_candidate_candidate_term_adds_the_other_candidates_as_negatives_of_the_positive(batch):
    q, c, labels = batch["q"], batch["c"], batch["labels"]
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    want, _ = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], 0.05, masked_pairs(mask), dd=True)
    got = info_nce_with_options(q, c, labels, 20.0, mask, candidate_candidate=True)
    assert abs(got.item() - want) < 1e-5
    assert abs(got.item() - info_nce(q, c, labels, 20.0, mask).item()) > 1e-3


def test_hardness_weighting_multiplies_each_negative_by_exp_beta_score(batch):
    q, c, labels = batch["q"], batch["c"], batch["labels"]
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    want, _ = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], 0.05, masked_pairs(mask), beta=3.0)
    q32 = q.float().requires_grad_()
    got = info_nce_with_options(q32, c, labels, 20.0, mask, hardness_beta=3.0)
    assert abs(got.item() - want) < 1e-5
    # The weights carry no gradient: the gradient is the plain loss's with exp(beta * s) as constants.
    got.backward()
    reference = q.float().requires_grad_()
    weights = 3.0 * (q.float() @ c.float().T)
    weights[torch.arange(3), labels] = 0.0  # the positive is not weighted
    logits = (20.0 * (reference @ c.float().T) + weights).masked_fill(mask, float("-inf"))
    F.cross_entropy(logits, labels).backward()
    torch.testing.assert_close(q32.grad, reference.grad, rtol=1e-5, atol=1e-6)


def test_per_query_temperatures_scale_each_row(batch):
    q, c, labels = batch["q"], batch["c"], batch["labels"]
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    taus = [0.05, 0.1, 0.02]
    want, _ = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], taus, masked_pairs(mask))
    scales = torch.tensor([1 / t for t in taus])
    assert abs(info_nce_with_options(q, c, labels, scales, mask).item() - want) < 1e-5
    with_dd, _ = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], taus, masked_pairs(mask), dd=True)
    assert abs(info_nce_with_options(q, c, labels, scales, mask, candidate_candidate=True).item() - with_dd) < 1e-5


def test_every_option_at_once(batch):
    q, c, labels, ids = batch["q"], batch["c"], batch["labels"], batch["ids"]
    mask = false_negative_mask(batch["positive_ids"], ids, labels)
    query_mask = query_query_mask(batch["positive_ids"], ids[labels])
    taus = [0.05, 0.1, 0.02]
    want, dropped = hand_loss(
        q.tolist(),
        c.tolist(),
        [0, 1, 2],
        taus,
        masked_pairs(mask),
        all_q=q.tolist(),
        query_masked=masked_pairs(query_mask),
        dd=True,
        margin=0.05,
        beta=2.0,
    )
    got = info_nce_with_options(
        q,
        c,
        labels,
        torch.tensor([1 / t for t in taus]),
        mask,
        all_queries=q,
        query_mask=query_mask,
        candidate_candidate=True,
        margin=0.05,
        hardness_beta=2.0,
    )
    assert dropped > 0 and abs(got.item() - want) < 1e-5


def test_matryoshka_loss_is_the_weighted_sum_over_cut_and_renormalised_embeddings(batch):
    q, c, labels = batch["q"], batch["c"], batch["labels"]
    mask = false_negative_mask(batch["positive_ids"], batch["ids"], labels)
    pairs = masked_pairs(mask)
    want = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], 0.05, pairs)[0]
    want += 0.5 * hand_loss(cut(q.tolist(), 2), cut(c.tolist(), 2), [0, 1, 2], 0.05, pairs)[0]
    want += 2.0 * hand_loss(cut(q.tolist(), 4), cut(c.tolist(), 4), [0, 1, 2], 0.05, pairs)[0]
    loss = partial(info_nce_with_options, labels=labels, logit_scale=20.0, mask=mask)
    got = matryoshka_loss(lambda a, b: loss(a, b), [q, c], [2, 4], [0.5, 2.0])
    assert abs(got.item() - want) < 1e-5
    # default weights 1; None entries pass through (the query-query term's queries when it is off)
    seen = []
    matryoshka_loss(lambda a, b, n: seen.append((a.shape[-1], n)) or a.sum(), [q, c, None], [3])
    assert seen == [(6, None), (3, None)]
    # with the query-query term: the gathered queries are cut like the others
    query_mask = query_query_mask(batch["positive_ids"], batch["ids"][labels])
    qm = masked_pairs(query_mask)
    with_qq = hand_loss(q.tolist(), c.tolist(), [0, 1, 2], 0.05, pairs, all_q=q.tolist(), query_masked=qm)[0]
    cq = cut(q.tolist(), 3)
    with_qq += hand_loss(cq, cut(c.tolist(), 3), [0, 1, 2], 0.05, pairs, all_q=cq, query_masked=qm)[0]
    got = matryoshka_loss(partial(_positional, loss, query_mask), [q, c, q], [3])
    assert abs(got.item() - with_qq) < 1e-5


def _positional(loss, query_mask, q, c, a):
    return loss(q, c, all_queries=a, query_mask=query_mask)


def test_loss_spec_checks_its_values():
    with pytest.raises(LamraError, match="task_temperatures"):
        LossSpec(task_temperatures=0)
    with pytest.raises(LamraError, match="matryoshka_dims"):
        LossSpec(matryoshka_dims=[64, 64])
    with pytest.raises(LamraError, match="matryoshka_dims"):
        LossSpec(matryoshka_dims=[])
    with pytest.raises(LamraError, match="matryoshka_weights"):
        LossSpec(matryoshka_dims=[8, 16], matryoshka_weights=[1.0])
    with pytest.raises(LamraError, match="matryoshka_weights"):
        LossSpec(matryoshka_weights=[1.0])
    spec = LossSpec.of({"matryoshka_dims": [8, 32]})
    assert spec.weights == [1.0, 1.0]
    spec.check_dim(64)
    with pytest.raises(LamraError, match=r"\[64\] are not below the embedding size 64"):
        LossSpec(matryoshka_dims=[8, 64]).check_dim(64)


# ------------------------------------------------------------------------------------------------ in the module
COLORS = ("red", "green", "blue", "yellow")


def examples(tasks: list[int | None]) -> list[Example]:
    out = []
    for i, task in enumerate(tasks):
        color = COLORS[i % 4]
        positive = Item(f"img:{color}", image=shape_image(color, "circle"))
        negative = Item(f"img:{color}-sq", image=shape_image(color, "square"))
        out.append(Example(Item(f"q{i}", text=f"{color} circle"), positive, [negative], [positive.id], task))
    return out


def module(tiny_backbone, **loss) -> EmbeddingModule:
    m = EmbeddingModule(
        BackboneSpec(str(tiny_backbone), gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        temperature=0.05,
        learnable_temperature=True,
        loss=LossSpec(**loss) if loss else None,
    )
    m.configure_model()
    return m


def test_collator_carries_each_querys_task_and_choose_refuses_a_bad_one(tiny_backbone):
    m = module(tiny_backbone)
    assert m.collator()(examples([3, None, 0]))["task_ids"].tolist() == [3, -1, 0]
    record = Record("k", "q1", Item("q1", "x"), [Item("p", "y")], task_id=4)
    assert choose_example(record, random.Random(0), 0).task_id == 4
    for bad in ("2", -1, True):
        record.task_id = bad
        with pytest.raises(BadSampleError, match="task_id"):
            choose_example(record, None, 0)


def test_module_with_no_loss_options_computes_plain_info_nce_bit_for_bit(tiny_backbone):
    m = module(tiny_backbone)
    batch = m.collator()(examples([0, 1, None]))
    with torch.no_grad():
        loss, _ = m.contrastive_loss(batch, gather=False)
        q, c = m.embed(batch["query"]), m.embed(batch["candidates"])
    mask = false_negative_mask(batch["positive_ids"], batch["candidate_ids"], torch.arange(3))
    assert torch.equal(loss, info_nce(q, c, torch.arange(3), m.logit_scale, mask))
    assert m.loss_parameters() == [m.log_logit_scale] and m.task_log_logit_scale is None


def test_module_loss_with_every_option_matches_the_hand_computation(tiny_backbone):
    m = module(
        tiny_backbone,
        false_negative_margin=0.005,
        query_query=True,
        candidate_candidate=True,
        hardness_beta=2.0,
        task_temperatures=3,
        matryoshka_dims=[16],
        matryoshka_weights=[0.5],
    )
    with torch.no_grad():
        m.task_log_logit_scale.copy_(torch.log(1 / torch.tensor([0.05, 0.1, 0.02])))
    tasks = [0, 2, None, 1]
    batch = m.collator()(examples(tasks))
    with torch.no_grad():
        loss, _ = m.contrastive_loss(batch, gather=False)
        q, c = m.embed(batch["query"]).double(), m.embed(batch["candidates"]).double()
    taus = [0.05, 0.02, 0.05, 0.1]  # query 2 has no task: the model's temperature
    labels = [0, 1, 2, 3]
    # candidates [red, green, blue, yellow, red-sq, ...]: all different, so no false negative by id
    assert not false_negative_mask(batch["positive_ids"], batch["candidate_ids"], torch.arange(4)).any()
    own = {(i, i) for i in range(4)}
    options = {"dd": True, "margin": 0.005, "beta": 2.0}
    want, dropped = hand_loss(
        q.tolist(), c.tolist(), labels, taus, set(), all_q=q.tolist(), query_masked=own, **options
    )
    q16, c16 = cut(q.tolist(), 16), cut(c.tolist(), 16)
    want += 0.5 * hand_loss(q16, c16, labels, taus, set(), all_q=q16, query_masked=own, **options)[0]
    assert dropped > 0 and abs(loss.item() - want) < 1e-4


def test_per_task_temperatures_train_their_tasks_only_and_refuse_an_unknown_task(tiny_backbone):
    m = module(tiny_backbone, task_temperatures=4)
    assert m.hparams["loss"] == {**asdict(LossSpec()), "task_temperatures": 4}  # a mapping: weights_only checkpoints
    assert torch.equal(m.task_log_logit_scale.detach(), m.log_logit_scale.detach().repeat(4))
    assert m.loss_parameters() == [m.log_logit_scale, m.task_log_logit_scale]
    batch = m.collator()(examples([0, 2, None]))
    scale = m.query_logit_scale(batch)
    assert scale.shape == (3,) and torch.allclose(scale, torch.full((3,), 20.0))
    loss, _ = m.contrastive_loss(batch, gather=False)
    loss.backward()
    grad = m.task_log_logit_scale.grad
    assert grad[0] != 0 and grad[2] != 0 and grad[1] == 0 and grad[3] == 0  # tasks 1 and 3 are not in the batch
    assert m.log_logit_scale.grad != 0  # the query without a task
    with pytest.raises(LamraError, match=r"task_id 4, but model.loss.task_temperatures is 4 \(task ids 0..3\)"):
        m.contrastive_loss(m.collator()(examples([0, 4])), gather=False)
    no_tasks = {k: v for k, v in batch.items() if k != "task_ids"}
    with pytest.raises(LamraError, match="task id"):
        m.contrastive_loss(no_tasks, gather=False)


def test_matryoshka_size_not_below_the_embedding_is_refused_at_the_first_loss(tiny_backbone):
    m = module(tiny_backbone, matryoshka_dims=[8, 64])  # the tiny backbone's embeddings have 64 dimensions
    with pytest.raises(LamraError, match="matryoshka_dims"):
        m.contrastive_loss(m.collator()(examples([0, 1])), gather=False)


def test_clip_takes_the_loss_options_too():
    torch.manual_seed(0)
    clip = CLIPModule(TINY_CLIP, loss={"task_temperatures": 2, "candidate_candidate": True})
    assert clip.loss_parameters() == [clip.task_log_logit_scale] and clip.loss_spec.candidate_candidate
    batch = clip.collator()(examples([1, 0, None]))
    loss, _ = clip.contrastive_loss(batch, gather=False)
    loss.backward()
    assert clip.task_log_logit_scale.grad.abs().min() > 0
