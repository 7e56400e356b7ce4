"""Bidirectional attention (`backbone.attention: bidirectional`) and mean pooling (`pooling: mean`, optionally without
the query's instruction tokens), in float32 on the tiny Qwen2-VL: the decoder really attends both ways and stays the
stock forward when causal, padding on either side never changes an embedding, the means are hand means, a fit trains
with them and its merged folder embeds as the checkpoint; the reranker and the export targets refuse what they cannot
compute, in one line. The other families are in test_backbone_families.py."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from conftest import shape_image
from helpers import embeds_alone_as_in_a_batch, lamra, scalars
from lamra_pl.api import Retriever
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item, instructed_item, instruction_chars, with_instruction
from lamra_pl.formats.settings import SETTINGS_FILE, ModelSettings
from lamra_pl.models.backbone import BackboneSpec, LoraSpec, load_backbone, load_processor, trunk
from lamra_pl.models.checkpoints import load_retriever
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator, truncate_text
from lamra_pl.models.reranker import RerankModule
from lamra_pl.pipelines.export import export
from test_checkpoints import LORA, perturbed, save
from test_export import SHAPE, served_inputs, st_user

SHAPE_ITEM = instructed_item("q", SHAPE, "a blue square")
ITEMS = [
    Item("t", "a tiny red circle drawn on white paper, seen from above"),
    SHAPE_ITEM,
    instructed_item("qi", "Retrieve the matching picture", "make it green", shape_image("red", "triangle", 84)),
    instructed_item("qo", SHAPE, None, shape_image("blue", "square")),  # the instruction is all of its text
    Item("i", image=shape_image("green", "circle")),
]


def module(
    backbone: Path, attention: str = "bidirectional", pooling: str = "mean", exclude_instruction: bool = False, **spec
) -> EmbeddingModule:
    """A float32 retriever on `backbone` with a fresh (identity) LoRA adapter, in eval mode."""
    backbone_spec = BackboneSpec(backbone, gradient_checkpointing=False, attention=attention, dtype="float32", **spec)
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    built = EmbeddingModule(backbone_spec, lora=lora, pooling=pooling, exclude_instruction=exclude_instruction)
    built.configure_model()
    return built.eval()


# ------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_states_differ_from_causal_and_causal_is_the_stock_forward(tiny_backbone, attn):
    """Causal: exactly the checkpoint's own forward (transformers, nothing changed). Bidirectional: every token but
    the last reads later tokens, so its last-layer state moves; on a text, the first token's state depends on the
    last token, which a causal decoder never lets it see."""
    causal, both = (module(tiny_backbone, a, attn_implementation=attn) for a in ("causal", "bidirectional"))
    batch = EmbeddingCollator(causal.processor).encode(ITEMS[:3])
    real = batch["attention_mask"].bool()
    stock = AutoModelForImageTextToText.from_pretrained(tiny_backbone, dtype=torch.float32, attn_implementation=attn)
    rows, stock_rows = causal.model.get_input_embeddings().weight, stock.get_input_embeddings().num_embeddings
    if rows.shape[0] > stock_rows:  # `<emb>`'s row, added by lamra-pl (`mean_new_rows`)
        stock.resize_token_embeddings(rows.shape[0], mean_resizing=False)
        stock.get_input_embeddings().weight.data[stock_rows:] = rows[stock_rows:].detach()
    with torch.no_grad():
        ours = causal.backbone.hidden_states(causal.model, batch)
        theirs = stock.model(**batch, use_cache=False).last_hidden_state
        bidirectional = both.backbone.hidden_states(both.model, batch)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    moved = (bidirectional - ours).abs().amax(-1)  # [B, L]
    last = real.long().cumsum(-1).argmax(-1)
    for row in range(len(real)):
        non_final = real[row].clone()
        non_final[last[row]] = False
        assert moved[row][non_final].min() > 1e-4, row

    # The first token of a text, with only its last token changed.
    collator = EmbeddingCollator(causal.processor)
    a, b = collator.encode([Item("a", "red circle")]), collator.encode([Item("b", "red square")])
    with torch.no_grad():
        first = {
            name: [m.backbone.hidden_states(m.model, x)[0, 0] for x in (a, b)]
            for name, m in (("causal", causal), ("bidirectional", both))
        }
    torch.testing.assert_close(first["causal"][0], first["causal"][1], atol=0, rtol=0)
    assert (first["bidirectional"][0] - first["bidirectional"][1]).abs().max() > 1e-4


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["mean", "last_token", "before_emb", "latent_attention"])
def test_a_padded_batch_embeds_as_each_item_alone(tiny_backbone, pooling, padding_side):
    """Bidirectional attention never reads padding: a batch padded on either side embeds as its items one by one
    (left padding puts padding before the tokens that now attend forward), with every pooling."""
    extra = {"exclude_instruction": True} if pooling in ("mean", "latent_attention") else {}
    m = module(tiny_backbone, pooling=pooling, padding_side=padding_side, **extra)
    _, together = embeds_alone_as_in_a_batch(m, ITEMS)
    assert len({tuple(row.round(decimals=4).tolist()) for row in together}) == len(ITEMS)


def test_a_backbone_whose_config_is_bidirectional_is_not_read_as_causal(tiny_backbone, tmp_path):
    """A folder whose config.json says `is_causal: false` (as a merged bidirectional retriever's does) is refused
    as causal rather than silently run another way; with attention bidirectional it loads."""
    folder = tmp_path / "bidirectional-backbone"
    shutil.copytree(tiny_backbone, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["is_causal"] = False
    (folder / "config.json").write_text(json.dumps(config))
    vocabulary = len(load_processor(BackboneSpec(folder)).tokenizer)
    with pytest.raises(LamraError, match="is_causal: false") as refused:
        load_backbone(BackboneSpec(folder), vocabulary)
    assert "\n" not in str(refused.value) and "backbone.attention: bidirectional" in str(refused.value)
    loaded = load_backbone(BackboneSpec(folder, attention="bidirectional"), vocabulary)
    assert trunk(loaded).config.get_text_config().is_causal is False


def test_the_reranker_refuses_bidirectional_attention_in_one_line(tiny_backbone):
    with pytest.raises(LamraError) as refused:
        RerankModule(BackboneSpec(tiny_backbone, attention="bidirectional"))
    assert "\n" not in str(refused.value) and "causal" in str(refused.value)
    with pytest.raises(LamraError, match="backbone.attention is 'sideways'"):
        BackboneSpec(tiny_backbone, attention="sideways")


# ------------------------------------------------------------------------------------------- mean pooling
def test_mean_pooling_is_the_hand_mean_over_real_tokens_less_the_instruction_when_asked(tiny_backbone):
    plain = module(tiny_backbone, padding_side="left")
    exclude = module(tiny_backbone, padding_side="left", exclude_instruction=True)
    batch = exclude.collator().encode(ITEMS)
    real, instruction = batch["attention_mask"].bool(), batch["instruction_mask"]
    with torch.no_grad():
        states = plain.backbone.hidden_states(plain.model, batch)
        pooled = {"all": plain.embed(batch), "without": exclude.embed(batch)}
    for row in range(len(ITEMS)):
        for name, keep in (("all", real[row]), ("without", real[row] & ~instruction[row])):
            hand = states[row][keep].double().mean(0)
            hand = (hand / hand.norm()).float()
            torch.testing.assert_close(pooled[name][row], hand, atol=1e-6, rtol=0)
    # Exactly the instruction's tokens are left out: rows with one differ, rows without are the same.
    tokenizer = plain.processor.tokenizer
    for row, item in enumerate(ITEMS):
        marked = tokenizer.decode(batch["input_ids"][row][instruction[row]])
        assert marked == (item.text or "")[: item.instruction_chars], (marked, item)
        assert not (instruction[row] & ~real[row]).any()
        differ = (pooled["all"][row] - pooled["without"][row]).abs().max() > 1e-5
        assert differ == (item.instruction_chars > 0), item.id
    assert plain.collator().encode(ITEMS).get("instruction_mask") is None  # only when a pooling leaves it out


def test_instruction_characters_follow_the_text_the_model_sees(tiny_backbone):
    cases = [
        (SHAPE, "a blue square", SHAPE),
        ("find the picture", "a blue square", "Find the picture"),
        ("  find it:", "Cat", "Find it:"),
        (SHAPE, None, with_instruction(SHAPE, None)),
        (None, "a blue square", ""),
    ]
    for instruction, text, head in cases:
        full = with_instruction(instruction, text)
        assert full[: instruction_chars(instruction, text)] == head, (instruction, text)
    # Cutting the text keeps the instruction it still holds.
    tokenizer = load_processor(BackboneSpec(tiny_backbone)).tokenizer
    cut = truncate_text(tokenizer, SHAPE_ITEM, 3)
    assert 0 < cut.instruction_chars <= len(cut.text) and SHAPE.startswith(cut.text[: cut.instruction_chars])
    assert truncate_text(tokenizer, SHAPE_ITEM, 100).instruction_chars == len(SHAPE)


def test_exclude_instruction_needs_a_mean(tiny_backbone):
    with pytest.raises(LamraError, match="exclude_instruction") as refused:
        EmbeddingModule(BackboneSpec(tiny_backbone), pooling="before_emb", exclude_instruction=True)
    assert "\n" not in str(refused.value)


def test_the_api_leaves_the_given_instruction_out(tiny_backbone):
    """`Retriever.encode_queries(..., instruction=)` marks the instruction it prepends, as `retrieve` does."""
    m = module(tiny_backbone, exclude_instruction=True)
    retriever = Retriever(m, "tiny")
    api = retriever.encode_queries(["a blue square"], instruction=SHAPE)
    with torch.no_grad():
        ours = m.embed(m.collator().encode([SHAPE_ITEM])).numpy()
        unmarked = m.embed(m.collator().encode([Item("q", SHAPE_ITEM.text)])).numpy()
    np.testing.assert_allclose(api, ours, atol=1e-6)
    assert np.abs(api - unmarked).max() > 1e-5


# ------------------------------------------------------------------------------------- fit, merge, settings
@pytest.mark.slow
def test_a_fit_trains_bidirectional_mean_and_the_merged_folder_embeds_as_the_checkpoint(
    tiny_backbone, shape_shards, tmp_path
):
    """The overlay's settings, with activation checkpointing (its recomputation must attend as the forward did):
    the loss is finite, the checkpoint and its merged folder embed the same, the folder's config.json says
    `is_causal: false` and its settings file the rest; without the settings file the folder is refused as causal,
    and `--settings` read it as trained."""
    runs = tmp_path / "runs"
    proc = lamra(
        "fit",
        *("-c", "experiments/tiny/stage2_instruct.yaml", "-c", "experiments/ablations/bidirectional_mean.yaml"),
        f"--model.init_args.backbone.path={tiny_backbone}",
        "--model.init_args.backbone.gradient_checkpointing=true",
        f"--data.init_args.train_shards={shape_shards}",
        "--data.init_args.batch_size=6",
        "--trainer.max_steps=3",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={runs}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = runs / "tiny_stage2" / "version_0"
    losses = [v for _, v in scalars(run)["train/loss"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    ckpt, out = run / "checkpoints" / "last.ckpt", tmp_path / "merged"
    merge = lamra("merge", f"--ckpt={ckpt}", f"--out={out}")
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["text_config"]["is_causal"] is False
    settings = json.loads((out / SETTINGS_FILE).read_text())["init_args"]
    assert settings["backbone"]["attention"] == "bidirectional"
    assert settings["pooling"] == "mean" and settings["exclude_instruction"] is True

    texts = ["a blue square", "a red circle on white"]
    images = [shape_image("blue", "square"), None]
    embedded = {}
    for name, path in (("checkpoint", ckpt), ("folder", out)):
        retriever = Retriever.from_checkpoint(path)
        embedded[name] = retriever.encode_queries(texts, images, instruction=SHAPE)
        embedded[name + " documents"] = retriever.encode_documents(texts, images)
    np.testing.assert_allclose(embedded["folder"], embedded["checkpoint"], atol=1e-5)
    np.testing.assert_allclose(embedded["folder documents"], embedded["checkpoint documents"], atol=1e-5)

    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    (bare / SETTINGS_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the defaults warning: what this test is not about
        with pytest.raises(LamraError, match="is_causal: false"):
            Retriever.from_checkpoint(bare)
        given = ModelSettings(attention="bidirectional", pooling="mean", exclude_instruction=True, max_text_tokens=64)
        again = Retriever.from_checkpoint(bare, settings=given).encode_queries(texts, images, instruction=SHAPE)
    np.testing.assert_allclose(again, embedded["folder"], atol=1e-6)


# ------------------------------------------------------------------------------------------------ export
def bidirectional_checkpoint(backbone: Path, tmp_path: Path, attention: str = "bidirectional", **module_args) -> Path:
    """A trained-looking (perturbed LoRA) retriever checkpoint, bidirectional unless `attention` says otherwise."""
    trained = EmbeddingModule(
        BackboneSpec(str(backbone), gradient_checkpointing=False, attention=attention),
        lora=LoraSpec(**LORA),
        **module_args,
    )
    trained.configure_model()
    hparams = {
        "_class_path": "lamra_pl.models.embedding.EmbeddingModule",
        "backbone": {"path": str(backbone), "gradient_checkpointing": False, "attention": attention},
        "lora": LORA,
        **module_args,
    }
    save(tmp_path / "bidirectional.ckpt", perturbed(trained), hparams)
    return tmp_path / "bidirectional.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_sentence_transformers_computes_a_bidirectional_retriever(tiny_backbone, pooling, tmp_path):
    """The exported folder's config.json carries `is_causal: false`, which transformers' own forward reads: a
    SentenceTransformer (in a process without lamra_pl) encodes as lamra-pl does, mean pooled or last token."""
    ckpt = bidirectional_checkpoint(tiny_backbone, tmp_path, pooling=pooling)
    out = export(str(ckpt), str(tmp_path / "st"), to="sentence-transformers", prompts={"shape": SHAPE})
    mode = json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode"]
    assert mode == {"mean": "mean", "last_token": "lasttoken"}[pooling]
    assert "is_causal: false" in (out / "README.md").read_text()
    module_ = load_retriever(ckpt)
    cases = served_inputs()
    with torch.no_grad():
        ours = module_.embed(module_.collator().encode([item for item, _ in cases]))
    theirs = st_user(out, cases, tmp_path)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_the_peft_adapter_keeps_the_attention_and_says_how_to_set_it(tiny_backbone, tmp_path):
    ckpt = bidirectional_checkpoint(tiny_backbone, tmp_path, pooling="mean", exclude_instruction=True)
    out = export(str(ckpt), str(tmp_path / "adapter"))
    settings = json.loads((out / SETTINGS_FILE).read_text())["init_args"]
    assert settings["backbone"]["attention"] == "bidirectional" and settings["exclude_instruction"] is True
    card = (out / "README.md").read_text()
    assert "is_causal = False" in card and "task instruction" in card


BIDIRECTIONAL = {"attention": "bidirectional"}
REFUSED = [
    ("vllm", BIDIRECTIONAL, {"pooling": "mean"}, ["bidirectional", "causally"]),
    ("sentence-transformers", BIDIRECTIONAL, {}, ["before <emb>", "bidirectional"]),
    ("sentence-transformers", {}, {"pooling": "mean", "exclude_instruction": True}, ["exclude_instruction"]),
    ("vllm", {}, {"pooling": "mean", "exclude_instruction": True}, ["exclude_instruction"]),
]


@pytest.mark.parametrize(("target", "backbone", "args", "needles"), REFUSED, ids=["vllm", "st_emb", "st_ex", "vllm_ex"])
def test_what_a_served_target_cannot_compute_is_refused_in_one_line(
    tiny_backbone, target, backbone, args, needles, tmp_path
):
    hparams = {
        "_class_path": "lamra_pl.models.embedding.EmbeddingModule",
        "backbone": {"path": str(tiny_backbone), **backbone},
        "lora": LORA,
        **args,
    }
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "model.ckpt")
    with pytest.raises(LamraError) as refused:
        export(str(tmp_path / "model.ckpt"), str(tmp_path / "out"), to=target)
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles), str(refused.value)
    assert not (tmp_path / "out").exists()


def test_vllm_serves_a_causal_mean_pooled_retriever_with_mean_pooling(tiny_backbone, tmp_path):
    ckpt = bidirectional_checkpoint(tiny_backbone, tmp_path, attention="causal", pooling="mean")
    out = export(str(ckpt), str(tmp_path / "vllm"), to="vllm")
    card = (out / "README.md").read_text()
    assert '"pooling_type": "MEAN"' in card and "pooling_type: MEAN" in card


def test_activation_checkpointing_recomputes_the_bidirectional_forward(tiny_backbone):
    """The recomputation in the backward attends as the forward did: the adapter's gradients are those of the
    plain backward."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = BackboneSpec(tiny_backbone, gradient_checkpointing=checkpointing, attention="bidirectional")
        m = EmbeddingModule(spec, lora=LoraSpec(r=4, alpha=8, dropout=0.0), pooling="mean")
        m.configure_model()
        m.train()
        with torch.no_grad():  # B = 0 would give the A matrices no gradient
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        embedded = m.embed(m.collator().encode(ITEMS))
        (embedded @ embedded.T).triu(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4)


def test_a_causal_lm_that_stays_causal_is_refused_in_one_line(tmp_path):
    """A recurrent causal LM (Mamba) has no mask to remove: `is_causal` changes nothing there, which the check on
    three tokens finds; the model is refused rather than trained as if bidirectional, and left as it was."""
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2)
    MambaForCausalLM(config).save_pretrained(tmp_path / "mamba")
    spec = {"gradient_checkpointing": False, "attn_implementation": "eager"}
    with pytest.raises(LamraError, match="MambaModel stays causal") as refused:
        load_backbone(BackboneSpec(tmp_path / "mamba", attention="bidirectional", **spec), 64)
    assert "\n" not in str(refused.value)
    assert not hasattr(load_backbone(BackboneSpec(tmp_path / "mamba", **spec), 64).config, "is_causal")
