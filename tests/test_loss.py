"""InfoNCE against a hand computation: hard negatives, and a masked in-batch duplicate of a positive."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import shape_image
from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.base import ScheduleSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import Example, stable_id
from lamra_pl.models.losses import false_negative_mask, info_nce


def hand_info_nce(q: list[list[float]], c: list[list[float]], labels: list[int], tau: float, masked: set) -> float:
    total = 0.0
    for i, qi in enumerate(q):
        logits = {j: sum(a * b for a, b in zip(qi, cj, strict=True)) / tau for j, cj in enumerate(c)}
        denominator = sum(math.exp(v) for j, v in logits.items() if (i, j) not in masked)
        total += -math.log(math.exp(logits[labels[i]]) / denominator)
    return total / len(q)


def test_info_nce_matches_hand_computation_with_hard_negatives_and_duplicate():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)  # [pos0, pos1, pos2, neg0, neg1, neg2]
    # queries 0 and 2 share one positive (an in-batch duplicate); query 1's hard negative is query 2's positive.
    ids = torch.tensor([10, 11, 10, 20, 12, 21])
    positive_ids = torch.tensor([[10, -1], [11, -1], [10, 12]])  # query 2 also has a second positive, id 12
    labels = torch.arange(3)
    mask = false_negative_mask(positive_ids, ids, labels)
    masked = {(i, j) for i in range(3) for j in range(6) if mask[i, j]}
    assert masked == {(0, 2), (2, 0), (2, 4)}
    tau = 0.05
    expected = hand_info_nce(q.tolist(), c.tolist(), labels.tolist(), tau, masked)
    got = info_nce(q, c, labels, 1 / tau, mask)
    assert abs(got.item() - expected) < 1e-5  # float32 logits
    # the mask matters: without it the duplicate counts as a negative
    assert abs(info_nce(q, c, labels, 1 / tau).item() - expected) > 1e-3


def test_module_loss_is_info_nce_over_its_own_embeddings(tiny_backbone):
    m = EmbeddingModule(
        BackboneSpec(str(tiny_backbone), gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        temperature=0.07,
    )
    m.configure_model()
    m.eval()
    img = {c: Item(f"img:{c}", image=shape_image(c, "circle")) for c in ("red", "green", "blue", "yellow")}
    examples = [
        Example(Item("q0", text="red circle"), img["red"], [img["green"]], ["img:red"]),
        Example(Item("q1", text="a red round thing"), img["red"], [img["blue"]], ["img:red"]),  # duplicate
        Example(Item("q2", text="yellow circle"), img["yellow"], [img["red"]], ["img:yellow"]),
    ]
    batch = m.collator()(examples)
    assert batch["candidate_ids"].tolist() == [stable_id(i) for i in ["img:red"] * 2 + ["img:yellow", "img:green"]] + [
        stable_id("img:blue"),
        stable_id("img:red"),
    ]
    with torch.no_grad():
        loss, _ = m.contrastive_loss(batch, gather=False)
        q = m.embed(batch["query"]).double()
        c = m.embed(batch["candidates"]).double()
    # candidates: [red, red, yellow, green, blue, red]; every "red" column other than its own label is masked
    # for queries 0 and 1 (their positive), and query 2's hard negative is red too (not its positive: kept).
    masked = {(0, 1), (0, 5), (1, 0), (1, 5)}
    expected = hand_info_nce(q.tolist(), c.tolist(), [0, 1, 2], 0.07, masked)
    assert abs(loss.item() - expected) < 1e-5


def test_optimizer_and_schedule_use_trainable_parameters_only(tiny_backbone):
    from functools import partial

    from lightning.pytorch import Trainer

    m = EmbeddingModule(
        BackboneSpec(str(tiny_backbone)),
        lora=LoraSpec(r=4, alpha=8),
        learnable_temperature=True,
        optimizer=partial(torch.optim.AdamW, lr=0.1),
        schedule=ScheduleSpec(warmup_ratio=0.1),
    )
    m.configure_model()
    m.trainer = Trainer(max_steps=100, logger=False, enable_checkpointing=False)
    config = m.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert in_optimizer == trainable and id(m.log_logit_scale) in trainable and len(trainable) == 29
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and abs(lrs[10] - 0.1) < 1e-9 and lrs[55] < 0.06 and lrs[99] < 1e-3  # warmup, cosine


def test_learnable_temperature_gets_a_gradient(tiny_backbone):
    m = EmbeddingModule(
        BackboneSpec(str(tiny_backbone)), lora=LoraSpec(r=4, alpha=8, dropout=0.0), learnable_temperature=True
    )
    m.configure_model()
    examples = [
        Example(Item(f"q{i}", text=f"{c} circle"), Item(f"img:{c}", image=shape_image(c, "circle")), [], [f"img:{c}"])
        for i, c in enumerate(("red", "green", "blue"))
    ]
    loss, _ = m.contrastive_loss(m.collator()(examples), gather=False)
    loss.backward()
    assert m.log_logit_scale.grad is not None and m.log_logit_scale.grad.abs() > 0
    assert abs(1 / m.logit_scale.item() - 0.05) < 1e-6
