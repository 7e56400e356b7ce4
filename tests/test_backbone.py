"""Backbone loading by path: `<emb>`, LoRA only on the language model, freezing, full fine-tuning."""

from __future__ import annotations

import pytest

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import EMB_TOKEN, BackboneSpec, LoraSpec, load_backbone, load_processor


def spec(path, **settings) -> BackboneSpec:
    """A backbone as `load_backbone` loaded it by default: without activation checkpointing."""
    return BackboneSpec(path, gradient_checkpointing=False, **settings)


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_processor_gets_emb_token_without_resizing_the_model(tiny_backbone):
    processor = load_processor(BackboneSpec(tiny_backbone))
    assert EMB_TOKEN in processor.tokenizer.get_vocab()
    ids = processor.tokenizer("x<emb>.", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.convert_tokens_to_ids(EMB_TOKEN) in ids  # one token, not split into pieces
    model = load_backbone(spec(tiny_backbone), vocab_size=len(processor.tokenizer))
    assert model.get_input_embeddings().num_embeddings == 512  # spare rows: no resize, never a shrink


def test_lora_targets_only_the_language_model(tiny_backbone):
    model = load_backbone(spec(tiny_backbone), vocab_size=400, lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    names = trainable(model)
    assert len(names) == 7 * 2 * 2
    assert all(".language_model.layers." in n and ("lora_A" in n or "lora_B" in n) for n in names)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in names}
    assert {m.rsplit(".", 1)[1] for m in lora_modules} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)


def test_projector_and_vision_tower_unfreeze_on_request(tiny_backbone):
    projector = trainable(
        load_backbone(spec(tiny_backbone, train_projector=True), vocab_size=400, lora=LoraSpec(r=4, alpha=8))
    )
    assert any(".visual.merger." in n for n in projector)
    assert not any(".visual.blocks." in n for n in projector)
    tower = trainable(load_backbone(spec(tiny_backbone, train_vision_tower=True), vocab_size=400))
    assert any(".visual.blocks." in n for n in tower) and not any(".visual.merger." in n for n in tower)
    assert any(".language_model.layers." in n for n in tower)
    assert "lm_head.weight" not in tower


def test_full_fine_tuning_trains_the_language_model_only(tiny_backbone):
    names = trainable(load_backbone(spec(tiny_backbone), vocab_size=400))
    assert any("language_model.layers.0.self_attn.q_proj.weight" in n for n in names)
    assert not any(".visual." in n for n in names) and "lm_head.weight" not in names


def test_lm_head_unfreezes_on_request_with_or_without_lora(tiny_backbone):
    full = trainable(load_backbone(spec(tiny_backbone, train_lm_head=True), vocab_size=400))
    assert "lm_head.weight" in full and not any(".visual." in n for n in full)
    adapters = trainable(
        load_backbone(spec(tiny_backbone, train_lm_head=True), vocab_size=400, lora=LoraSpec(r=4, alpha=8))
    )
    # peft freezes the base model: the head must survive that, beside the adapters and nothing else.
    assert {n for n in adapters if "lora_" not in n} == {"base_model.model.lm_head.weight"}


def test_resize_when_the_tokenizer_outgrows_the_embeddings(tiny_backbone):
    model = load_backbone(spec(tiny_backbone), vocab_size=520)
    assert model.get_input_embeddings().num_embeddings == 520


@pytest.mark.parametrize("bad", ["/definitely/not/here", "."])
def test_bad_backbone_path_is_a_clear_error(bad):
    with pytest.raises(LamraError, match="backbone path"):
        load_processor(BackboneSpec(bad))


def test_bad_lora_spec():
    with pytest.raises(LamraError, match="lora.r"):
        LoraSpec(r=0)


def test_built_model_trains_in_training_mode_with_checkpointing(tiny_backbone):
    from lamra_pl.models.backbone import hf_model
    from lamra_pl.models.embedding import EmbeddingModule

    module = EmbeddingModule(BackboneSpec(tiny_backbone), lora=LoraSpec(r=4, alpha=8, dropout=0.1))
    module.configure_model()
    # Lightning never calls train(); from_pretrained leaves eval mode, which would disable LoRA dropout.
    assert all(m.training for m in module.modules())
    assert hf_model(module.model).is_activation_checkpointing
    module.eval()
    assert not any(m.training for m in module.modules())


def test_min_max_pixels_override_reaches_the_processor(tiny_backbone):
    from PIL import Image

    small = load_processor(BackboneSpec(tiny_backbone))
    large = load_processor(BackboneSpec(tiny_backbone, min_pixels=112 * 112, max_pixels=112 * 112))
    image = Image.new("RGB", (56, 56), "red")
    grid = [p.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist() for p in (small, large)]
    assert grid == [[[1, 4, 4]], [[1, 8, 8]]]  # 14-px patches: 56 px -> 4 x 4, resized to 112 px -> 8 x 8
