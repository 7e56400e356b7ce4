"""Checkpoints that do not fit the model say what differs; checkpoints load with weights_only."""

from __future__ import annotations

import pytest

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.embedding import EmbeddingModule


def module(backbone, **lora) -> EmbeddingModule:
    m = EmbeddingModule(
        BackboneSpec(backbone, gradient_checkpointing=False), lora=LoraSpec(**{"r": 4, "alpha": 8, **lora})
    )
    m.configure_model()
    return m


def trainable_state(m: EmbeddingModule) -> dict:
    keep = m.trainable_names()
    return {k: v for k, v in m.state_dict().items() if k in keep}


def test_a_checkpoint_of_another_config_says_what_differs(tiny_backbone, finding):
    saved = trainable_state(module(tiny_backbone, r=4))
    with pytest.raises(LamraError, match=r"28 tensors have other shapes .*\(4, 64\) vs \(8, 64\)"):
        module(tiny_backbone, r=8).on_load_checkpoint({"state_dict": saved})
    fewer = module(tiny_backbone, targets=["q_proj", "v_proj"])
    with pytest.raises(LamraError, match=r"20 tensors are not in this model, e.g. \[.*down_proj"):
        fewer.on_load_checkpoint({"state_dict": saved})
    more = module(tiny_backbone)
    more.model.get_output_embeddings().requires_grad_(True)
    with pytest.raises(LamraError, match=r"1 trainable tensors are missing, e.g. \[.*lm_head"):
        more.on_load_checkpoint({"state_dict": saved})
    module(tiny_backbone, r=4).on_load_checkpoint({"state_dict": saved})  # the same config loads
    finding(
        "a checkpoint of another LoRA rank, target list or freezing",
        "refused before loading, naming the tensors missing, unexpected or of another shape",
    )
