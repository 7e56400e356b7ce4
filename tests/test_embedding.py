"""Pooling position, padding invariance and position-id modes of the EmbeddingModule."""

from __future__ import annotations

import pytest
import torch

from conftest import shape_image
from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.pooling import pooling_index

ITEMS = [
    Item("t", text="a tiny red circle drawn on white paper, seen from above"),
    Item("i", image=shape_image("blue", "square")),
    Item("it", text="make it green", image=shape_image("red", "triangle", size=84)),
    Item("t2", text="x"),
]


def module(backbone, pooling="before_emb", **settings) -> EmbeddingModule:
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    m = EmbeddingModule(BackboneSpec(backbone, gradient_checkpointing=False, **settings), lora=lora, pooling=pooling)
    m.configure_model()
    return m.eval()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooled_position_is_token_before_emb(tiny_backbone, padding_side):
    m = module(tiny_backbone, padding_side=padding_side)
    batch = EmbeddingCollator(m.processor).encode(ITEMS)
    assert m.processor.tokenizer.padding_side == padding_side
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = ids.shape[1] - mask.sum(1)
    assert (pad > 0).any(), "the batch must actually be padded"
    index = pooling_index(ids, mask, m.emb_token_id, "before_emb")
    newline = m.processor.tokenizer.convert_tokens_to_ids(m.processor.tokenizer.tokenize("\n"))[0]
    for row in range(len(ITEMS)):
        assert ids[row, index[row] + 1] == m.emb_token_id
        assert ids[row, index[row]] == newline  # the "\n" that ends "<|im_start|>assistant\n"
        assert mask[row, index[row]] == 1
    # images really are in the prompts of the image rows
    image_token = m.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert [(ids[r] == image_token).any().item() for r in range(4)] == [False, True, True, False]
    last = pooling_index(ids, mask, m.emb_token_id, "last_token")
    for row in range(len(ITEMS)):
        assert mask[row, last[row]] == 1 and mask[row, last[row] + 1 :].sum() == 0


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("rope", ["model", "1d"])
@pytest.mark.parametrize("pooling", ["before_emb", "last_token"])
def test_padding_never_changes_an_embedding(tiny_backbone, padding_side, rope, pooling):
    m = module(tiny_backbone, padding_side=padding_side, rope=rope, pooling=pooling)
    collate = EmbeddingCollator(m.processor)
    with torch.no_grad():
        together = m.embed(collate.encode(ITEMS))
        alone = torch.cat([m.embed(collate.encode([item])) for item in ITEMS])
    assert together.dtype == torch.float32
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(len(ITEMS)))


def test_rope_1d_differs_from_mrope_on_images_and_each_is_deterministic(tiny_backbone):
    runs = {}
    for rope in ("model", "1d", "model", "1d"):
        m = module(tiny_backbone, rope=rope)
        with torch.no_grad():
            runs.setdefault(rope, []).append(m.embed(EmbeddingCollator(m.processor).encode(ITEMS)))
    for rope in ("model", "1d"):
        torch.testing.assert_close(runs[rope][0], runs[rope][1], atol=0, rtol=0)
    diff = (runs["model"][0] - runs["1d"][0]).abs().max(-1).values
    assert diff[1] > 1e-5 and diff[2] > 1e-5, "image rows must differ between mRoPE and 1-D positions"
    assert diff[0] < 1e-6 and diff[3] < 1e-6, "text rows have the same positions under both"


def test_mrope_positions_are_the_models_own(tiny_backbone):
    m = module(tiny_backbone)
    batch = EmbeddingCollator(m.processor).encode(ITEMS[1:3])
    ours = m.backbone.position_ids(m.model, batch)
    reference, _ = m.trunk.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    assert torch.equal(ours, reference)
    assert ours.shape[0] == 3 and not torch.equal(ours[1], ours[2])  # height and width sections differ


def test_missing_emb_token_is_a_clear_error(tiny_backbone):
    m = module(tiny_backbone)
    batch = EmbeddingCollator(m.processor).encode(ITEMS[:1])
    batch["input_ids"][batch["input_ids"] == m.emb_token_id] = 0
    with pytest.raises(Exception, match="no <emb> token"):
        m.embed(batch)
