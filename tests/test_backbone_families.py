"""Every backbone family trains, embeds, reranks and judges: Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-Next (MM-Embed's)
and text-only causal LMs, beside Qwen2-VL (whose tests are everywhere else). Each is a tiny random checkpoint
written by `lamra-pl tiny-backbone` (or its builder) and loaded by path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import COLORS, SHAPES, shape_image
from helpers import embeds_alone_as_in_a_batch, lamra_here, ok, scalars
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item, encode_record, instructed_item
from lamra_pl.formats.shards import write_shards
from lamra_pl.models.backbone import BackboneSpec, LoraSpec, hf_model, load_backbone, load_processor, render_chats
from lamra_pl.models.checkpoints import load_module, load_reranker
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator, embedding_messages
from lamra_pl.models.export_templates import base_template, embedding_template, rerank_template
from lamra_pl.models.rerank_inputs import IGNORE, JudgePrompt, RerankCollator, RerankExample, pointwise_messages
from lamra_pl.models.reranker import RerankModule
from lamra_pl.testing.tiny import QWEN_VL_BUILDERS, write_gguf

TEXTS = [Item("t0", "red circle"), Item("t1", "a blue square on white"), Item("t2", "green"), Item("t3", "a triangle")]
IMAGES = [
    Item("i0", None, shape_image("red", "circle")),
    Item("i1", "a square", shape_image("blue", "square", 84)),
    Item("i2", None, shape_image("green", "triangle", 40)),
]


# The Qwen-VL families besides Qwen2-VL, as the fixtures below name them.
QWEN_FAMILIES = ["tiny_qwen2_5_vl", "tiny_qwen3_vl", "tiny_qwen3_5"]
# Every family this file covers, with the items it can read.
FAMILY_ITEMS = [(name, TEXTS + IMAGES) for name in [*QWEN_FAMILIES, "tiny_llava_next"]] + [("tiny_text_lm", TEXTS)]


def _tiny(model_type: str, factory: pytest.TempPathFactory) -> Path:
    return QWEN_VL_BUILDERS[model_type](factory.mktemp("backbone") / model_type)


@pytest.fixture(scope="module")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("qwen2_5_vl", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("qwen3_vl", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_qwen3_5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny("qwen3_5", tmp_path_factory)


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
        ("qwen2_5_vl", "stage2_instruct", "shape_shards", TEXTS + IMAGES, "model.language_model.layers."),
        ("qwen3_vl", "stage2_instruct", "shape_shards", TEXTS + IMAGES, "model.language_model.layers."),
        ("qwen3_5", "stage2_instruct", "shape_shards", TEXTS + IMAGES, "model.language_model.layers."),
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
@pytest.mark.parametrize(("backbone", "items"), FAMILY_ITEMS)
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


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("backbone", "items"), FAMILY_ITEMS)
def test_padding_never_changes_an_embedding_on_any_family(backbone, items, padding_side, request):
    """A batch embeds as its items do one by one, padded on either side (Qwen3.5's linear-attention layers carry
    a recurrent state that padding must not reach)."""
    _, together = embeds_alone_as_in_a_batch(embedding_module(request.getfixturevalue(backbone), padding_side), items)
    assert len({tuple(row.round(decimals=4).tolist()) for row in together}) == len(items)  # nothing constant


@pytest.mark.parametrize("backbone", QWEN_FAMILIES)
def test_mrope_positions_are_each_qwen_familys_own(backbone, request):
    """`rope: model` gives an image row the model's own 3-D positions (`get_rope_index`), `rope: 1d` sequential
    ones; a text row embeds the same under both."""
    embedded, positions = {}, {}
    for rope in ("model", "1d"):
        spec = BackboneSpec(request.getfixturevalue(backbone), gradient_checkpointing=False, rope=rope)
        module = EmbeddingModule(spec, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
        module.configure_model()
        module.eval()
        batch = EmbeddingCollator(module.processor).encode([TEXTS[1], IMAGES[1]])
        positions[rope] = module.backbone.position_ids(module.model, batch)
        with torch.no_grad():
            embedded[rope] = module.embed(batch)
        if rope == "model":
            reference, _ = module.trunk.get_rope_index(
                batch["input_ids"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"],
                attention_mask=batch["attention_mask"],
            )
    ours = positions["model"]
    assert torch.equal(ours, reference) and ours.shape[0] == 3 and not torch.equal(ours[1], ours[2])
    assert positions["1d"].ndim == 2
    diff = (embedded["model"] - embedded["1d"]).abs().max(-1).values
    assert diff[0] < 1e-6 and diff[1] > 1e-5, diff


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


@pytest.mark.parametrize(
    ("backbone", "items"), [(name, IMAGES) for name in [*QWEN_FAMILIES, "tiny_llava_next"]] + [("tiny_text_lm", TEXTS)]
)
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


@pytest.mark.parametrize(("backbone", "items"), FAMILY_ITEMS)
def test_rerank_scores_pointwise_and_listwise_do_not_depend_on_the_batch(backbone, items, request):
    """P(Yes) of each pair and the listwise distribution of each list are the same in a padded batch as alone, and
    every chat's labels are exactly its answer and end of turn (no thinking block: Qwen3.5 renders its
    non-thinking form)."""
    reranker = RerankModule(BackboneSpec(request.getfixturevalue(backbone), gradient_checkpointing=False))
    reranker.configure_model()
    reranker.eval()
    collator = reranker.collator()
    tokenizer = collator.processor.tokenizer
    query = Item("q", "find this one")
    example = RerankExample(query, [(items[0], True), (items[-1], False)], [items[1], items[0]], 2)
    batch = collator([example])
    answers = [tokenizer.decode(row[row != IGNORE]).strip() for row in batch["labels"]]
    assert [a.removesuffix(tokenizer.eos_token) for a in answers] == ["Yes", "No", "Ans: (2)"], answers
    pairs = [(query, items[0]), (Item("q2", "a longer query about shapes"), items[-1]), (items[1], items[2])]
    inputs = collator.pointwise_inputs(pairs)
    assert (inputs["attention_mask"] == 0).any()
    p_yes = reranker.score_pointwise(inputs)
    alone = torch.cat([reranker.score_pointwise(collator.pointwise_inputs([pair])) for pair in pairs])
    torch.testing.assert_close(p_yes, alone, atol=1e-5, rtol=0)
    lists = [(query, items[:3]), (items[-1], items[1:3])]
    scores = reranker.score_listwise(collator.listwise_inputs(lists), [3, 2])
    torch.testing.assert_close(scores.sum(-1), torch.ones(2))
    assert scores[1, 2] == 0
    single = reranker.score_listwise(collator.listwise_inputs(lists[1:]), [2])
    torch.testing.assert_close(scores[1, :2], single[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", QWEN_FAMILIES)
def test_zero_shot_p_true_is_the_first_generated_step_on_each_qwen_family(backbone, request):
    """As `rerank --zero_shot true` loads a folder: P(True) from one forward equals `generate`'s first step, on
    image, text and image+text candidates, after the non-thinking generation prompt (Qwen3.5's empty thinking
    block, which its default prompt would leave open)."""
    judge = load_reranker(request.getfixturevalue(backbone), judge=JudgePrompt())
    collator = judge.collator()
    pairs = [(Item("q0", "Find the red circle."), IMAGES[0]), (Item("q1", "a shape", IMAGES[1].image), TEXTS[1])]
    pairs.append((Item("q2", "text only"), IMAGES[1]))
    inputs = collator.pointwise_inputs(pairs)
    prompts = collator.processor.tokenizer.batch_decode(inputs["input_ids"])
    for prompt, words in zip(prompts, ("image", "text", "image and text"), strict=True):
        assert f"Does the above {words} match the query? True or False" in prompt
        assert prompt.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if "3_5" in backbone else ""))
    p_true = judge.score_pointwise(inputs)
    out = hf_model(judge.model).generate(
        **inputs, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    first = out.logits[0][:, [collator.yes_id, collator.no_id]].float().softmax(-1)[:, 0]
    torch.testing.assert_close(p_true, first, atol=1e-5, rtol=0)
    assert len(set(p_true.tolist())) == 3


def test_a_template_that_thinks_before_answering_is_refused(tiny_qwen3_5, tmp_path):
    """A thinking-only template (its generation prompt always opens a thinking block) would have every answer
    scored inside the block: the reranker refuses it rather than train or score the wrong position."""
    folder = tmp_path / "thinking-only"
    shutil.copytree(tiny_qwen3_5, folder)
    template = folder / "chat_template.jinja"
    text = template.read_text()
    assert "enable_thinking is defined and enable_thinking is false" in text
    template.write_text(text.replace("enable_thinking is defined and enable_thinking is false", "false"))
    processor = load_processor(BackboneSpec(folder), add_emb_token=False)
    with pytest.raises(LamraError, match=r"does not write the assistant's answer where its generation prompt ends"):
        RerankCollator(processor)


def test_qwen3_5_exported_chat_templates_render_the_collators_non_thinking_chats(tiny_qwen3_5):
    """The templates `lamra-pl export` writes (for sentence-transformers and vLLM) render Qwen3.5's chats as the
    collators do: the embedding chat up to `<emb>`, and LamRA-Rank's pointwise prompt after the empty thinking
    block, not inside an open one."""
    processor = load_processor(BackboneSpec(tiny_qwen3_5))
    base = base_template(processor)
    image, text = IMAGES[1], TEXTS[1]
    embedding = embedding_template(base, "before_emb", text_only=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": image.text}]}]
    served = processor.apply_chat_template(messages, chat_template=embedding, tokenize=False)
    [ours] = render_chats(processor, [embedding_messages(image)], generation_prompt=False)
    assert served == ours.split("<emb>")[0] and served.endswith("</think>\n\n")
    rerank = rerank_template(base, text_only=False)
    messages = [{"role": "query", "content": [{"type": "text", "text": text.text}]}]
    messages.append({"role": "document", "content": [{"type": "image"}, {"type": "text", "text": image.text}]})
    served = processor.apply_chat_template(messages, chat_template=rerank, tokenize=False)
    [ours] = render_chats(processor, [pointwise_messages(text, image)], generation_prompt=True)
    assert served == ours and served.endswith("<think>\n\n</think>\n\n")


def test_qwen3_vl_projector_includes_its_deepstack_mergers(tiny_qwen3_vl):
    """`train_projector` opens the merger and every DeepStack merger; `train_vision_tower` alone keeps them frozen."""
    vocab = len(load_processor(BackboneSpec(tiny_qwen3_vl)).tokenizer)

    def trainable(**flags: bool) -> set[str]:
        model = load_backbone(BackboneSpec(tiny_qwen3_vl, gradient_checkpointing=False, **flags), vocab, LoraSpec(r=4))
        return {n.split(".")[4] for n, p in model.named_parameters() if p.requires_grad and ".visual." in n}

    assert trainable(train_projector=True) == {"merger", "deepstack_merger_list"}
    assert trainable(train_vision_tower=True) == {"patch_embed", "pos_embed", "blocks"}


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


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize(("backbone", "items"), FAMILY_ITEMS)
def test_bidirectional_mean_pooling_on_every_family(backbone, items, padding_side, request):
    """`backbone.attention: bidirectional` with `pooling: mean` and the instruction left out: the states of the
    tokens before the last move (Qwen3.5's full-attention layers attend both ways; its linear-attention layers stay a
    left-to-right recurrence), and a batch padded on either side embeds as its items do alone."""
    path = request.getfixturevalue(backbone)
    query = instructed_item("q", "Find the picture of this shape.", "a blue square")
    inputs = [*items, query]
    modules = {}
    for attention in ("causal", "bidirectional"):
        spec = BackboneSpec(path, gradient_checkpointing=False, padding_side=padding_side, attention=attention)
        lora = LoraSpec(r=4, alpha=8, dropout=0.0)
        modules[attention] = EmbeddingModule(spec, lora=lora, pooling="mean", exclude_instruction=True)
        modules[attention].configure_model()
        modules[attention].eval()
    both = modules["bidirectional"]
    collate = both.collator()
    batch = collate.encode(inputs)
    assert (batch["attention_mask"] == 0).any() and batch["instruction_mask"][-1].sum() > 0
    with torch.no_grad():
        states = {a: m.backbone.hidden_states(m.model, batch) for a, m in modules.items()}
        together = both.embed(batch)
        alone = torch.cat([both.embed(collate.encode([item])) for item in inputs])
    real = batch["attention_mask"].bool()
    first = real.long().argmax(-1)  # each row's first real token: it reads later ones only when bidirectional
    rows = torch.arange(len(inputs))
    assert ((states["bidirectional"] - states["causal"])[rows, first].abs().amax(-1) > 1e-5).all()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert len({tuple(row.round(decimals=4).tolist()) for row in together}) == len(inputs)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("backbone", QWEN_FAMILIES)
def test_videos_and_interleaved_items_embed_alone_as_in_a_padded_batch_on_each_qwen_family(
    backbone, padding_side, request
):
    """Each Qwen-VL family's own video processor and chat template (Qwen3-VL's timestamps included): a video, a
    video with text and an interleaved item (several images between texts) embed alone as in a batch padded on
    either side, beside texts and images; a video is not its frames given as images."""
    frames = [shape_image(c, "circle", 56) for c in ("red", "green", "blue", "yellow")]
    items = [
        TEXTS[1],
        Item("v", video=frames, video_fps=4.0),
        IMAGES[0],
        Item("vt", "a ball changing colour", video=frames[:2], video_fps=2.0),
        Item("s", "Find the last image.", parts=["first .", frames[0], "then .", frames[2], "last ."]),
    ]
    module = embedding_module(request.getfixturevalue(backbone), padding_side)
    batch, together = embeds_alone_as_in_a_batch(module, items)
    assert len(batch["video_grid_thw"]) == 2 and len(batch["image_grid_thw"]) == 3
    with torch.no_grad():
        as_images = module.embed(EmbeddingCollator(module.processor).encode([Item("f", image=f) for f in frames]))
    assert torch.isfinite(together).all()
    assert ((as_images - together[1]).abs().max(-1).values > 1e-4).all()


def embedding_module(path: Path, padding_side: str) -> EmbeddingModule:
    spec = BackboneSpec(path, gradient_checkpointing=False, padding_side=padding_side)
    module = EmbeddingModule(spec, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module.configure_model()
    return module.eval()
