"""`lamra-pl export --to peft`: the adapter folder, loaded by plain transformers + peft in a process that never imports
lamra_pl, computes the checkpoint's own embeddings (and a reranker's scores); checkpoints an adapter cannot
reproduce are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from helpers import ROOT
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item, with_instruction
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.checkpoints import load_reranker, load_retriever
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
