"""Every backbone family trains: LLaVA-Next (MM-Embed's) and text-only causal LMs, beside Qwen2-VL (whose tests
are everywhere else). Each is a tiny random checkpoint written by `lamra-pl tiny-backbone` and loaded by path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import COLORS, SHAPES, shape_image
from helpers import lamra_here, ok, scalars
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item, encode_record
from lamra_pl.formats.shards import write_shards
from lamra_pl.models.backbone import BackboneSpec, LoraSpec, load_backbone, load_processor
from lamra_pl.models.checkpoints import load_module, load_reranker
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.rerank_inputs import IGNORE, JudgePrompt, RerankExample
from lamra_pl.models.reranker import RerankModule
from lamra_pl.testing.tiny import write_gguf

TEXTS = [Item("t0", "red circle"), Item("t1", "a blue square on white"), Item("t2", "green"), Item("t3", "a triangle")]
IMAGES = [
    Item("i0", None, shape_image("red", "circle")),
    Item("i1", "a square", shape_image("blue", "square", 84)),
    Item("i2", None, shape_image("green", "triangle", 40)),
]


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Text-to-text training shards (name -> description), what a text-only backbone trains on."""
    samples = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        other = next(c for c in COLORS if c != color)
        samples.append(
            encode_record(
                f"t{i:03d}",
                qid=f"t:{i}",
                query={"txt": f"{color} {shape}"},
                positives=[{"id": f"txt:{color}-{shape}", "txt": f"a {shape} coloured {color}"}],
                negatives=[{"id": f"txt:{other}-{shape}", "txt": f"a {shape} coloured {other}"}],
            )
        )
    out = tmp_path_factory.mktemp("shards") / "text"
    write_shards(samples, out, maxcount=6)
    return out


@pytest.mark.parametrize(
    ("model_type", "stage", "shards", "items", "decoder"),
    [
        ("llava_next", "stage2_instruct", "shape_shards", TEXTS + IMAGES, "model.language_model.layers."),
        ("qwen2", "stage1_text", "text_shards", TEXTS, "model.layers."),
        ("llama", "stage1_text", "text_shards", TEXTS, "model.layers."),
    ],
)
def test_each_family_trains_with_a_finite_loss_and_merges(model_type, stage, shards, items, decoder, request, tmp_path):
    """`tiny-backbone`, then the tiny stage config's `fit` for two steps, then `merge`: the loss is finite, LoRA sits
    in the decoder only, and the merged folder embeds as the checkpoint does (stage 2 starts from a merged stage 1)."""
    backbone, runs, merged = tmp_path / model_type, tmp_path / "runs", tmp_path / "merged"
    ok(lamra_here("tiny-backbone", f"--out={backbone}", f"--model_type={model_type}"))
    ok(
        lamra_here(
            "fit",
            "-c",
            f"experiments/tiny/{stage}.yaml",
            f"--model.init_args.backbone.path={backbone}",
            f"--data.init_args.train_shards={request.getfixturevalue(shards)}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_negatives=1",
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={runs}",
        )
    )
    run = next(runs.glob("*/version_0"))
    losses = [v for _, v in scalars(run)["train/loss"]]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert saved and all(decoder in k and ".lora_" in k for k in saved), list(saved)[:4]

    ok(lamra_here("merge", f"--ckpt={ckpt}", f"--out={merged}"))
    assert json.loads((merged / "config.json").read_text())["model_type"] == model_type
    adapter = load_module(ckpt)
    reloaded = EmbeddingModule(BackboneSpec(merged, gradient_checkpointing=False))
    reloaded.configure_model()
    reloaded.eval()
    with torch.no_grad():
        batch = EmbeddingCollator(adapter.processor).encode(items)
        torch.testing.assert_close(reloaded.embed(batch), adapter.embed(batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pooling", ["before_emb", "last_token", "latent_attention"])
@pytest.mark.parametrize(("backbone", "items"), [("tiny_llava_next", TEXTS + IMAGES), ("tiny_text_lm", TEXTS)])
def test_every_pooling_embeds_and_backpropagates_on_every_family(backbone, items, pooling, request):
    module = EmbeddingModule(
        BackboneSpec(request.getfixturevalue(backbone), gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        pooling=pooling,
        latents=8,
        latent_heads=2,
    )
    module.configure_model()
    batch = EmbeddingCollator(module.processor).encode(items)
    embeddings = module.embed(batch)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
    assert torch.isfinite(embeddings).all()
    n = len(items) // 2
    loss = F.cross_entropy(embeddings[:n] @ embeddings[n : 2 * n].T / 0.05, torch.arange(n))
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_llava_next_chat_carries_one_bos_and_one_placeholder_run_per_image(tiny_llava_next):
    """The Mistral-style template writes <s> and the tokenizer would add another: the collator must not."""
    processor = load_processor(BackboneSpec(tiny_llava_next))
    batch = EmbeddingCollator(processor).encode(TEXTS[:1] + IMAGES)
    tokenizer = processor.tokenizer
    bos, image = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<image>")
    real = batch["attention_mask"].bool()
    assert ((batch["input_ids"] == bos) & real).sum(-1).tolist() == [1, 1, 1, 1]
    placeholder = batch["input_ids"] == image
    runs = (placeholder[:, 1:] & ~placeholder[:, :-1]).sum(-1) + placeholder[:, 0]  # contiguous placeholder runs
    assert runs.tolist() == [0, 1, 1, 1] and len(batch["image_sizes"]) == 3


@pytest.mark.parametrize(("backbone", "items"), [("tiny_llava_next", IMAGES), ("tiny_text_lm", TEXTS)])
def test_a_reranker_trains_on_every_family(backbone, items, request):
    """LamRA-Rank's joint pointwise + listwise loss, with its answer-token labels found from each chat template."""
    reranker = RerankModule(
        BackboneSpec(request.getfixturevalue(backbone), gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
    )
    reranker.configure_model()
    query = Item("q", "find this one")
    example = RerankExample(query, [(items[0], True), (items[1], False)], [items[1], items[0], items[2]], 2)
    batch = reranker.collator()([example])
    assert ((batch["labels"] != IGNORE).sum(-1) > 0).all()  # every chat's answer was located
    loss, stats = reranker.lm_loss(batch)
    assert torch.isfinite(loss) and loss > 0 and {"loss_pointwise", "loss_listwise"} <= set(stats)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in reranker.parameters() if p.requires_grad)


def test_a_gguf_causal_lm_loads_as_its_checkpoint_folder_and_trains(tiny_text_lm, text_shards, tmp_path):
    """A .gguf file (alone in its folder: config, tokenizer and weights all come from it) embeds and judges exactly
    as the checkpoint folder it was written from, and `fit` trains it and `merge` makes a folder of it."""
    gguf_path = write_gguf(tiny_text_lm, tmp_path / "gguf" / "tiny-qwen2-f32.gguf")
    assert sorted(p.name for p in gguf_path.parent.iterdir()) == [gguf_path.name]
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    paths = (gguf_path, tiny_text_lm)
    modules = [EmbeddingModule(BackboneSpec(path, gradient_checkpointing=False), lora=lora) for path in paths]
    batches = [EmbeddingCollator(m.processor).encode(TEXTS) for m in modules]
    # The same tokenizer, rebuilt from the file (its padding side and `<emb>` id may differ: GGUF stores neither).
    texts = [
        [m.processor.tokenizer.decode(r[k.bool()]) for r, k in zip(b["input_ids"], b["attention_mask"], strict=True)]
        for m, b in zip(modules, batches, strict=True)
    ]
    assert texts[0] == texts[1] and all("red circle" in t for t in texts[0][:1])
    with torch.no_grad():
        for m in modules:
            m.configure_model()
        torch.testing.assert_close(modules[0].embed(batches[0]), modules[1].embed(batches[1]), atol=1e-5, rtol=0)
        pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3])]
        judged = [load_reranker(path, judge=JudgePrompt()) for path in (gguf_path, tiny_text_lm)]
        scores = [j.score_pointwise(j.collator().pointwise_inputs(pairs)) for j in judged]
        torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=0)

    runs, merged = tmp_path / "runs", tmp_path / "merged"
    ok(
        lamra_here(
            "fit",
            "-c",
            "experiments/tiny/stage1_text.yaml",
            f"--model.init_args.backbone.path={gguf_path}",
            f"--data.init_args.train_shards={text_shards}",
            "--data.init_args.batch_size=4",
            "--trainer.max_steps=1",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={runs}",
        )
    )
    run = next(runs.glob("*/version_0"))
    [(_, loss)] = scalars(run)["train/loss"]
    assert math.isfinite(loss) and loss > 0
    ok(lamra_here("merge", f"--ckpt={run / 'checkpoints' / 'last.ckpt'}", f"--out={merged}"))
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "quantization_config" not in config  # an ordinary folder now


def test_family_mismatches_are_clear_errors(tiny_text_lm, tiny_llava_next, tmp_path):
    processor = load_processor(BackboneSpec(tiny_text_lm))
    with pytest.raises(LamraError, match="text-only causal LM: it reads no images"):
        EmbeddingCollator(processor).encode(TEXTS[:1] + IMAGES[:1])
    with pytest.raises(LamraError, match="no vision tower or projector"):
        load_backbone(BackboneSpec(tiny_text_lm, train_vision_tower=True), vocab_size=len(processor.tokenizer))
    with pytest.raises(LamraError, match="min_pixels/max_pixels apply to Qwen2-VL"):
        load_processor(BackboneSpec(tiny_llava_next, max_pixels=112 * 112))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(LamraError, match=r"model_type 't5' is not supported.*any text-only causal LM"):
        load_processor(BackboneSpec(tmp_path))
    with pytest.raises(LamraError, match="GGUF file .* does not exist"):
        load_processor(BackboneSpec(tmp_path / "missing.gguf"))
    base = tmp_path / "base-lm"  # a base (not instruct) model: no chat template
    shutil.copytree(tiny_text_lm, base)
    (base / "chat_template.jinja").unlink()
    with pytest.raises(LamraError, match="has no chat template"):
        load_processor(BackboneSpec(base))
