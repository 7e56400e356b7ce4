"""Backbone loading by path: `<emb>`, LoRA only on the language model, freezing, full fine-tuning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import lamra, ok
from lamra_pl.api import Retriever
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


EMBED = """
import sys
import numpy as np
from lamra_pl.api import Retriever
retriever = Retriever.from_checkpoint(sys.argv[1])
np.save(sys.argv[2], retriever.encode(texts=["red circle", "a blue square on white", "green"]))
if len(sys.argv) > 3:  # build an index in this process, search it in another
    retriever.build_index(["red circle", "blue square", "green triangle"], ids=["a", "b", "c"], out=sys.argv[3])
if len(sys.argv) > 4:
    print([hit.id for hit in retriever.search(sys.argv[4], query_text="red circle", k=2)])
"""


@pytest.fixture(scope="module")
def no_spare_rows(tiny_text_lm, tmp_path_factory) -> tuple[Path, Path]:
    """A text LM whose embedding matrix has exactly its tokenizer's rows (as many real small LMs), so `<emb>` needs a
    new row; and a 2-step `fit` on it with `pooling: last_token` (the pooling the new row reaches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lamra_pl.formats.sample import encode_record
    from lamra_pl.formats.shards import write_shards

    root = tmp_path_factory.mktemp("no_spare_rows")
    folder = root / "lm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_lm)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    words = ["red", "green", "blue", "small", "large"]
    samples = [
        encode_record(f"t{i}", qid=f"t:{i}", query={"txt": f"{a} {b}"}, positives=[{"id": f"d{i}", "txt": f"{b} {a}"}])
        for i, (a, b) in enumerate((a, b) for a in words for b in words if a != b)
    ]
    write_shards(samples, root / "shards", maxcount=10)
    ok(
        lamra(
            "fit",
            "-c",
            "experiments/tiny/stage1_text.yaml",
            f"--model.init_args.backbone.path={folder}",
            f"--data.init_args.train_shards={root / 'shards'}",
            "--model.init_args.pooling=last_token",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=2",
            f"--trainer.logger.init_args.save_dir={root / 'runs'}",
            "--trainer.logger.init_args.version=run",
        )
    )
    return folder, next((root / "runs").glob("*/run/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_a_new_emb_row_is_the_mean_of_the_others_so_every_process_embeds_alike(no_spare_rows, tmp_path):
    folder, checkpoint = no_spare_rows
    from transformers import AutoTokenizer

    assert EMB_TOKEN not in AutoTokenizer.from_pretrained(folder).get_vocab()
    spec = BackboneSpec(folder, gradient_checkpointing=False)
    processor = load_processor(spec, add_emb_token=True)
    model = load_backbone(spec, len(processor.tokenizer))
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == len(processor.tokenizer)  # it was resized
    torch.testing.assert_close(rows[-1], rows[:-1].mean(0))
    # two processes: the same vectors; the index one builds, the other searches (same-model check passes)
    index, first, second = tmp_path / "index", tmp_path / "a.npy", tmp_path / "b.npy"
    run = [sys.executable, "-c", EMBED, str(checkpoint)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([*run, str(first), str(index)], check=True, capture_output=True, env=env)
    found = subprocess.run(
        [*run, str(second), str(tmp_path / "other"), str(index)], capture_output=True, text=True, env=env
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip().splitlines()[-1].startswith("['a'")
    np.testing.assert_array_equal(np.load(first), np.load(second))


@pytest.mark.slow
def test_a_checkpoint_and_its_merged_folder_embed_alike_with_a_new_emb_row(no_spare_rows, tmp_path):
    _, checkpoint = no_spare_rows
    ok(lamra("merge", f"--ckpt={checkpoint}", f"--out={tmp_path / 'merged'}"))
    texts = ["red circle", "a blue square on white", "green"]
    from_checkpoint = Retriever.from_checkpoint(checkpoint).encode(texts=texts)
    from_merged = Retriever.from_checkpoint(tmp_path / "merged").encode(texts=texts)
    np.testing.assert_allclose(from_merged, from_checkpoint, atol=1e-5)
