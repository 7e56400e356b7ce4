"""`lamra-pl export`: each target's folder, loaded by the real library (transformers + peft, sentence-transformers) in a
process that never imports lamra_pl, computes the checkpoint's own embeddings (and a reranker's scores); the vLLM
folder's chat templates give lamra-pl's token ids (rendered by transformers: vLLM is not installed); what a target
cannot express is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import shape_image
from helpers import ROOT
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item, with_instruction
from lamra_pl.formats.settings import ModelSettings
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.checkpoints import load_reranker, load_retriever
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.pooling import pooling_index
from lamra_pl.models.reranker import RerankModule
from lamra_pl.pipelines.export import export
from test_checkpoints import LORA, PAIRS, perturbed, save
from test_embedding import ITEMS

LEGACY = Path("tests/fixtures/legacy_4ccdac6")  # relative: the checkpoint names its backbone so
CKPT = LEGACY / "retriever.ckpt"
QUERIES = [*ITEMS, Item("q", with_instruction("Find the picture of this shape.", "a blue square"))]

# Run in a fresh interpreter: transformers + peft only, as a user of the adapter would.
PEFT_USER = r"""
import sys
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoTokenizer

base_path, adapter, inputs_path, rope, kind, out_path = sys.argv[1:]
inputs = dict(torch.load(inputs_path))
tokenizer = AutoTokenizer.from_pretrained(adapter)
base = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
if len(tokenizer) > base.get_input_embeddings().num_embeddings:
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
model = PeftModel.from_pretrained(base, adapter).eval()
mask = inputs["attention_mask"]
if rope == "1d":
    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    output = model(**inputs, output_hidden_states=True)
rows = torch.arange(mask.shape[0])
if kind == "embed":  # the last layer's state just before <emb>, L2-normalised
    emb = tokenizer.convert_tokens_to_ids("<emb>")
    before = (inputs["input_ids"] == emb).int().argmax(-1) - 1
    result = F.normalize(output.hidden_states[-1][rows, before], dim=-1)
else:  # P(Yes) at the last real token
    last = mask.cumsum(-1).argmax(-1)
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    result = output.logits[rows, last][:, [yes, no]].softmax(-1)[:, 0]
assert not any(name.startswith("lamra_pl") for name in sys.modules)
torch.save(result, out_path)
"""


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the legacy checkpoint names its backbone by a path relative to the repository root


def peft_user(base: Path, adapter: Path, inputs: dict, rope: str, kind: str, tmp_path: Path) -> torch.Tensor:
    """What transformers + peft compute on `inputs` (a processor batch) with the adapter, in a fresh process."""
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    args = [
        str(base.resolve()),
        str(adapter.resolve()),
        str(tmp_path / "inputs.pt"),
        rope,
        kind,
        str(tmp_path / "result.pt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_USER, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "result.pt")


def with_hparams(tmp_path: Path, **changes) -> Path:
    """The legacy checkpoint with some hyper-parameters changed."""
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"], **changes}
    torch.save(ckpt, tmp_path / "changed.ckpt")
    return tmp_path / "changed.ckpt"


def without_spare_rows(out: Path) -> Path:
    """The legacy backbone with exactly as many embedding rows as its tokenizer has tokens: `<emb>` needs a resize."""
    processor = AutoProcessor.from_pretrained(LEGACY / "backbone")
    model = AutoModelForImageTextToText.from_pretrained(LEGACY / "backbone", dtype=torch.float32)
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.mark.parametrize("case", ["legacy", "rope_1d", "resized_vocabulary"])
def test_the_peft_adapter_embeds_as_the_checkpoint_does(case, tmp_path):
    ckpt, base, settings = CKPT, LEGACY / "backbone", {}
    if case == "rope_1d":
        ckpt = with_hparams(tmp_path, rope="1d")
    if case == "resized_vocabulary":
        base = without_spare_rows(tmp_path / "base")
        settings = {"backbone": str(base)}
    out = export(str(ckpt), str(tmp_path / "adapter"), **settings)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base)
    assert (out / "adapter_model.safetensors").is_file() and (out / "lamra_pl.json").is_file()
    assert "<emb>" in (out / "README.md").read_text()
    module = load_retriever(ckpt, backbone={"path": str(base)} if settings else None)
    rope = "1d" if case == "rope_1d" else "model"
    assert module.backbone.spec.rope == rope
    rows = module.model.get_input_embeddings().num_embeddings  # the tiny backbone has 400, its tokenizer 393 tokens
    assert rows == (len(module.processor.tokenizer) if case == "resized_vocabulary" else 400)
    inputs = module.collator().encode(QUERIES)
    with torch.no_grad():
        ours = module.embed(inputs)
        with module.model.disable_adapter():
            plain = module.embed(inputs)
    assert (plain - ours).abs().max() > 1e-3  # the tolerance below tells the adapter's embeddings from the base's
    theirs = peft_user(base, out, inputs, rope, "embed", tmp_path)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs * ours).sum(-1).min() >= 0.9999


def test_the_peft_adapter_of_a_reranker_scores_as_the_checkpoint_does(tmp_path):
    backbone = LEGACY / "backbone"
    trained = RerankModule(BackboneSpec(str(backbone), gradient_checkpointing=False), lora=LoraSpec(**LORA))
    trained.configure_model()
    hparams = {
        "_class_path": "lamra_pl.models.reranker.RerankModule",
        "backbone": {"path": str(backbone), "gradient_checkpointing": False},
        "lora": LORA,
    }
    save(tmp_path / "reranker.ckpt", perturbed(trained), hparams)
    out = export(str(tmp_path / "reranker.ckpt"), str(tmp_path / "adapter"))
    module = load_reranker(tmp_path / "reranker.ckpt")
    inputs = module.collator().pointwise_inputs(PAIRS)
    ours = module.score_pointwise(inputs)
    theirs = peft_user(backbone, out, inputs, "model", "score", tmp_path)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert "P(Yes)" in (out / "README.md").read_text()


def hparams_only(tmp_path: Path, hparams: dict) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "model.ckpt")
    return tmp_path / "model.ckpt"


BACKBONE = {"path": str(LEGACY / "backbone")}


@pytest.mark.parametrize(
    ("hparams", "needles"),
    [
        ({"backbone": BACKBONE, "lora": None}, ["fully fine-tuned", "lamra-pl merge"]),
        ({"backbone": {**BACKBONE, "train_projector": True}, "lora": LORA}, ["train_projector", "lamra-pl merge"]),
        ({"clip_model": "openai/clip-vit-base-patch32"}, ["CLIPModule", "no LoRA adapter"]),
    ],
    ids=["full_fine_tuning", "trained_projector", "clip"],
)
def test_a_checkpoint_an_adapter_cannot_reproduce_is_refused_in_one_line(hparams, needles, tmp_path):
    with pytest.raises(LamraError) as refused:
        export(str(hparams_only(tmp_path, hparams)), str(tmp_path / "adapter"))
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles)
    assert not (tmp_path / "adapter").exists()


def test_a_model_folder_is_refused_as_having_no_adapter(tmp_path):
    with pytest.raises(LamraError, match="model folder"):
        export(str(LEGACY / "merged"), str(tmp_path / "adapter"))


# ------------------------------------------------------------------------------------- sentence-transformers
# Run in a fresh interpreter: sentence-transformers only, as a user of the exported folder would.
ST_USER = r"""
import json
import sys
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer

folder, specs_path, out_path = sys.argv[1:]
specs = json.load(open(specs_path))
model = SentenceTransformer(folder, device="cpu", model_kwargs={"dtype": torch.float32})


def value(spec):
    image = Image.open(spec["image"]).convert("RGB") if spec["image"] else None
    if image is not None and spec["text"] is not None:
        return {"image": image, "text": spec["text"]}
    return spec["text"] if image is None else image


rows = {}
plain = [i for i, spec in enumerate(specs) if not spec["prompt"] and not spec["prompt_name"]]
# One padded batch of mixed modalities, as a user encodes a pool.
rows.update(zip(plain, model.encode([value(specs[i]) for i in plain], batch_size=16, convert_to_tensor=True)))
for i, spec in enumerate(specs):
    if spec["prompt"]:
        rows[i] = model.encode([value(spec)], prompt=spec["prompt"], convert_to_tensor=True)[0]
    if spec["prompt_name"]:
        rows[i] = model.encode_query([value(spec)], prompt_name=spec["prompt_name"], convert_to_tensor=True)[0]
assert not any(name.startswith("lamra_pl") for name in sys.modules)
torch.save(torch.stack([rows[i] for i in range(len(specs))]), out_path)
"""
SHAPE = "Find the picture of this shape."


def served_inputs(text_only: bool = False) -> list[tuple[Item, dict]]:
    """(the Item lamra-pl embeds, how a library user passes it: text, image, prompt or prompt name)."""
    square, triangle = shape_image("blue", "square"), shape_image("red", "triangle", size=84)
    cases = [
        (ITEMS[0], {"text": ITEMS[0].text}),
        (ITEMS[3], {"text": ITEMS[3].text}),
        (Item("q", with_instruction(SHAPE, "a blue square")), {"text": "a blue square", "prompt": SHAPE}),
        (Item("n", with_instruction(SHAPE, "a red circle")), {"text": "a red circle", "prompt_name": "shape"}),
    ]
    if not text_only:
        cases += [
            (Item("i", image=square), {"image": square}),
            (Item("it", "make it green", triangle), {"image": triangle, "text": "make it green"}),
            (Item("iq", with_instruction(SHAPE, None), square), {"image": square, "prompt": SHAPE}),
        ]
    return cases


def st_user(folder: Path, cases: list[tuple[Item, dict]], tmp_path: Path) -> torch.Tensor:
    """What sentence-transformers computes for `cases` with the exported folder, in a fresh process."""
    specs = []
    for n, (_, given) in enumerate(cases):
        image = None
        if given.get("image") is not None:
            image = str(tmp_path / f"image{n}.png")
            given["image"].save(image)
        specs.append(
            {"text": given.get("text"), "image": image, **{k: given.get(k) for k in ("prompt", "prompt_name")}}
        )
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # lamra_pl is not importable there, let alone imported
    args = [str(folder.resolve()), str(tmp_path / "specs.json"), str(tmp_path / "st.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", ST_USER, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp_path / "st.pt")


def text_only_checkpoint(backbone: Path, tmp_path: Path) -> Path:
    """A trained-looking (perturbed LoRA) retriever checkpoint on a text-only causal LM."""
    trained = EmbeddingModule(BackboneSpec(str(backbone), gradient_checkpointing=False), lora=LoraSpec(**LORA))
    trained.configure_model()
    hparams = {
        "_class_path": "lamra_pl.models.embedding.EmbeddingModule",
        "backbone": {"path": str(backbone), "gradient_checkpointing": False},
        "lora": LORA,
    }
    save(tmp_path / "text.ckpt", perturbed(trained), hparams)
    return tmp_path / "text.ckpt"


@pytest.mark.parametrize("case", ["legacy", "merged_folder", "last_token", "text_only"])
def test_the_sentence_transformers_folder_embeds_as_the_checkpoint_does(case, request, tmp_path):
    ckpt = CKPT
    if case == "last_token":
        ckpt = with_hparams(tmp_path, pooling="last_token")
    if case == "text_only":
        ckpt = text_only_checkpoint(request.getfixturevalue("tiny_text_lm"), tmp_path)
    given = LEGACY / "merged" if case == "merged_folder" else ckpt  # `lamra-pl merge` of CKPT
    out = export(str(given), str(tmp_path / "st"), to="sentence-transformers", prompts={"shape": SHAPE})

    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "2_Normalize/config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode"] == "lasttoken"
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["shape"] == SHAPE and config["similarity_fn_name"] == "cosine"
    card = (out / "README.md").read_text()
    assert all(n in card for n in ("prompt=", "lasttoken", "L2-normalised", "How it was trained", "Summarize above"))

    module = load_retriever(ckpt)
    cases = served_inputs(text_only=case == "text_only")
    items = [item for item, _ in cases]
    with torch.no_grad():
        ours = module.embed(module.collator().encode(items))
        with module.model.disable_adapter():
            plain = module.embed(module.collator().encode(items))
    assert (plain - ours).abs().max() > 1e-3  # the tolerance below tells the trained embeddings from the base's
    theirs = st_user(out, cases, tmp_path)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (theirs * ours).sum(-1).min() >= 0.9999


# ------------------------------------------------------------------------------------------------ vllm
def rendered_ids(folder: Path, template: str, messages: list[dict], images: list) -> list[int]:
    """The token ids of `messages` rendered with `template` by transformers (as vLLM renders a chat template) and
    tokenized with the folder's processor, which expands image placeholders as vLLM's processor does."""
    processor = AutoProcessor.from_pretrained(folder)
    text = processor.apply_chat_template(messages, chat_template=template, tokenize=False)
    batch = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    return batch["input_ids"][0].tolist()


def vllm_messages(given: dict) -> list[dict]:
    """An /v1/embeddings chat as vLLM hands it to the template (`--chat-template-content-format openai`: the image
    parts become {"type": "image"} placeholders)."""
    content = ([{"type": "image"}] if given.get("image") is not None else []) + (
        [{"type": "text", "text": given["text"]}] if given.get("text") is not None else []
    )
    system = given.get("prompt") or (SHAPE if given.get("prompt_name") else None)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def test_the_vllm_folder_of_a_retriever_renders_the_collators_token_ids(tmp_path):
    out = export(str(CKPT), str(tmp_path / "vllm"), to="vllm")

    template_file = out / "additional_chat_templates" / "lamra_embedding.jinja"
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "lamra_pl.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    command = card.split("```bash")[1].split("```")[0]
    for flag in ("vllm serve", "--runner pooling", "--convert embed", "--chat-template-content-format openai"):
        assert flag in command
    assert str(template_file.relative_to(out)) in command
    assert json.loads(command.split("--pooler-config '")[1].split("'")[0]) == {
        "pooling_type": "LAST",
        "use_activation": True,
    }

    module = load_retriever(CKPT)
    collator = module.collator()
    template = template_file.read_text()
    for item, given in served_inputs():
        ours = collator.encode([item])
        pooled = pooling_index(ours["input_ids"], ours["attention_mask"], module.emb_token_id, module.pooling)
        images = [given["image"]] if given.get("image") is not None else []
        theirs = rendered_ids(out, template, vllm_messages(given), images)
        assert theirs == ours["input_ids"][0, : int(pooled) + 1].tolist(), item.id  # ends at the pooled token


def test_the_vllm_folder_of_a_reranker_scores_p_yes_from_its_template_and_classifier_tokens(tmp_path):
    backbone = LEGACY / "backbone"
    trained = RerankModule(BackboneSpec(str(backbone), gradient_checkpointing=False), lora=LoraSpec(**LORA))
    trained.configure_model()
    hparams = {
        "_class_path": "lamra_pl.models.reranker.RerankModule",
        "backbone": {"path": str(backbone), "gradient_checkpointing": False},
        "lora": LORA,
    }
    save(tmp_path / "reranker.ckpt", perturbed(trained), hparams)
    out = export(str(tmp_path / "reranker.ckpt"), str(tmp_path / "vllm"), to="vllm")

    command = (out / "README.md").read_text().split("```bash")[1].split("```")[0]
    assert "--convert classify" in command and "lamra_rerank.jinja" in command
    overrides = json.loads(command.split("--hf-overrides '")[1].split("'")[0])
    assert overrides["method"] == "from_2_way_softmax"

    module = load_reranker(tmp_path / "reranker.ckpt")
    collator = module.collator()
    circle, triangle = shape_image("red", "circle"), shape_image("green", "triangle")
    pairs = [*PAIRS, (Item("q3", "Find the red circle."), Item("c", image=circle))]
    pairs.append((Item("q4", "make it green", triangle), Item("d", "a green triangle", triangle)))
    template = (out / "additional_chat_templates" / "lamra_rerank.jinja").read_text()
    processor = AutoProcessor.from_pretrained(out)
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    no, yes = processor.tokenizer.convert_tokens_to_ids(overrides["classifier_from_token"])
    assert [yes, no] == [collator.yes_id, collator.no_id]
    for query, candidate in pairs:
        ours = collator.pointwise_inputs([(query, candidate)])
        messages = [{"role": "query", "content": served_content(query)}]
        messages.append({"role": "document", "content": served_content(candidate)})
        images = [i.image for i in (query, candidate) if i.image is not None]
        text = processor.apply_chat_template(messages, chat_template=template, tokenize=False)
        theirs = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
        assert theirs["input_ids"][0].tolist() == ours["input_ids"][0].tolist(), query.id
        # vLLM's from_2_way_softmax classifier: sigmoid((W[yes] - W[no]) . h) at the last token.
        with torch.no_grad():
            logits = merged(**theirs).logits[0, -1]
        score = torch.sigmoid(logits[yes] - logits[no])
        torch.testing.assert_close(score, module.score_pointwise(ours)[0], atol=1e-5, rtol=0)


def served_content(item: Item) -> list[dict]:
    return ([{"type": "image"}] if item.image is not None else []) + (
        [{"type": "text", "text": item.text}] if item.text is not None else []
    )


def test_several_targets_go_into_a_folder_each_the_adapter_before_the_merge(tmp_path):
    out = export(str(CKPT), str(tmp_path / "out"), to=["vllm", "peft"])
    assert sorted(p.name for p in out.iterdir()) == ["peft", "vllm"]
    adapter = load_file(out / "peft" / "adapter_model.safetensors")
    trained = {k: v for k, v in torch.load(CKPT, weights_only=True)["state_dict"].items() if "lora_B" in k}
    assert trained and sum(v.abs().sum() for k, v in adapter.items() if "lora_B" in k) > 0
    assert (out / "vllm" / "additional_chat_templates" / "lamra_embedding.jinja").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))


# --------------------------------------------------------------------------------------------- refusals
RETRIEVER = {"_class_path": "lamra_pl.models.embedding.EmbeddingModule", "backbone": BACKBONE, "lora": LORA}
RERANKER = {"_class_path": "lamra_pl.models.reranker.RerankModule", "backbone": BACKBONE, "lora": LORA}
REFUSED = [
    ("sentence-transformers", {**RETRIEVER, "pooling": "latent_attention"}, {}, ["latent attention", "sentence-"]),
    ("vllm", {**RETRIEVER, "pooling": "latent_attention"}, {}, ["latent attention", "vllm"]),
    ("sentence-transformers", {**RETRIEVER, "backbone": {**BACKBONE, "rope": "1d"}}, {}, ["rope: 1d", "mRoPE"]),
    ("vllm", {**RERANKER, "backbone": {**BACKBONE, "rope": "1d"}}, {}, ["rope: 1d", "mRoPE"]),
    ("sentence-transformers", {**RETRIEVER, "instructions": False}, {"prompts": {"a": "b"}}, ["without task"]),
    ("vllm", RETRIEVER, {"prompts": {"a": "b"}}, ["--prompts", "--to sentence-transformers"]),
    ("sentence-transformers", RERANKER, {}, ["RerankModule", "--to vllm"]),
    ("vllm", {**RERANKER, "pointwise_weight": 0.0}, {}, ["listwise only", "P(Yes)"]),
    ("sentence-transformers", {"clip_model": "ViT-B-32"}, {}, ["CLIPModule"]),
]
IDS = ["st_latent", "vllm_latent", "st_rope_1d", "vllm_rope_1d", "st_prompts", "vllm_prompts", "st_reranker"]


@pytest.mark.parametrize(("target", "hparams", "settings", "needles"), REFUSED, ids=[*IDS, "vllm_listwise", "st_clip"])
def test_what_a_served_target_cannot_express_is_refused_in_one_line(target, hparams, settings, needles, tmp_path):
    with pytest.raises(LamraError) as refused:
        export(str(hparams_only(tmp_path, hparams)), str(tmp_path / "out"), to=target, **settings)
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles), str(refused.value)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_with_files_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(LamraError, match="not an empty folder"):
        export(str(CKPT), str(tmp_path / "out"), to="vllm")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------- Matryoshka dimensions
DIM = 16  # of the legacy checkpoint's 32


def test_the_sentence_transformers_folder_at_a_dim_embeds_at_it(tmp_path):
    """`--settings.dim`: sentence-transformers cuts to `truncate_dim` after its Normalize, which is lamra-pl's
    embedding at that dim times a positive factor; normalised, the same vectors."""
    settings = ModelSettings(dim=DIM)
    out = export(
        str(CKPT), str(tmp_path / "st"), to="sentence-transformers", prompts={"shape": SHAPE}, settings=settings
    )
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert config["truncate_dim"] == DIM and config["similarity_fn_name"] == "cosine"
    assert f"truncate_dim: {DIM}" in (out / "README.md").read_text()
    assert json.loads((out / "lamra_pl.json").read_text())["init_args"]["dim"] == DIM  # a lamra-pl folder too
    assert load_retriever(out).dim == DIM

    module = load_retriever(CKPT, module={"dim": DIM})
    cases = served_inputs()
    with torch.no_grad():
        ours = module.embed(module.collator().encode([item for item, _ in cases]))
    theirs = st_user(out, cases, tmp_path)
    assert ours.shape == theirs.shape == (len(cases), DIM)
    cosine = (theirs * ours).sum(-1) / theirs.norm(dim=-1)
    assert cosine.min() >= 0.9999
    torch.testing.assert_close(F.normalize(theirs, dim=-1), ours, atol=1e-5, rtol=0)
    full = load_retriever(CKPT)
    with torch.no_grad():
        whole = full.embed(full.collator().encode([item for item, _ in cases]))
    assert (F.normalize(whole[:, :DIM], dim=-1) - ours).abs().max() < 1e-5  # the full embedding, cut


def test_the_vllm_and_peft_folders_at_a_dim_say_it(tmp_path):
    out = export(str(CKPT), str(tmp_path / "out"), to=["peft", "vllm"], settings=ModelSettings(dim=DIM))
    command = (out / "vllm" / "README.md").read_text().split("```bash")[1].split("```")[0]
    pooler = json.loads(command.split("--pooler-config '")[1].split("'")[0])
    assert pooler == {"pooling_type": "LAST", "use_activation": True, "dimensions": DIM}
    assert json.loads(command.split("--hf-overrides '")[1].split("'")[0]) == {"matryoshka_dimensions": [DIM]}
    assert "--convert embed" in command
    for target in ("peft", "vllm"):
        assert json.loads((out / target / "lamra_pl.json").read_text())["init_args"]["dim"] == DIM
    assert f"first {DIM} values (of 32) are L2-normalised again" in (out / "peft" / "README.md").read_text()
    # Without a dim, the command is as before: no dimensions, no overrides.
    plain = export(str(CKPT), str(tmp_path / "plain"), to="vllm")
    assert "dimensions" not in (plain / "README.md").read_text()


@pytest.mark.parametrize(
    ("hparams", "dim", "needles"),
    [
        (RETRIEVER, 33, ["--settings.dim", "33", "at most 32"]),
        (RETRIEVER, 0, ["--settings.dim", "whole number >= 1"]),
        (RERANKER, DIM, ["RerankModule", "'dim'"]),
    ],
    ids=["wider_than_the_model", "zero", "reranker"],
)
def test_a_dim_an_export_cannot_give_is_refused_in_one_line(hparams, dim, needles, tmp_path):
    with pytest.raises(LamraError) as refused:
        export(str(hparams_only(tmp_path, hparams)), str(tmp_path / "out"), to="vllm", settings=ModelSettings(dim=dim))
    assert "\n" not in str(refused.value) and all(n in str(refused.value) for n in needles), str(refused.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
