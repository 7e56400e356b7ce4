"""The one loader (`lamra_pl.models.checkpoints`): each module class from a checkpoint, whatever version of the
hyperparameters it holds; model folders with today's and earlier settings files; class paths outside the project
refused."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ROOT
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.checkpoints import load_module, load_reranker, load_retriever, save_merged
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.gradcache import GradCacheSpec
from lamra_pl.models.reranker import RerankModule
from test_embedding import ITEMS

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
PAIRS = [(Item("q", "Find the red circle."), Item("a", "a red circle")), (Item("q2", "x"), Item("b", "y"))]


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its trainable tensors moved off their initial values, so loading them is visible."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return module.eval()


def save(path, module: torch.nn.Module, hparams: dict) -> None:
    """A checkpoint as `lamra-pl fit` writes one: trainable tensors and the given hyperparameters."""
    state = {k: v for k, v in module.state_dict().items() if k in module.trainable_names()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)


def flat_backbone(path, **settings) -> dict:
    """The backbone settings of a checkpoint written before the typed groups: flat module arguments."""
    return {
        "backbone": str(path),
        "rope": "model",
        "min_pixels": None,
        "max_pixels": None,
        "padding_side": None,
        "train_vision_tower": False,
        "train_projector": False,
        "dtype": "float32",
        "attn_implementation": "sdpa",
        "gradient_checkpointing": False,
        "trust_remote_code": False,
        **settings,
    }


def test_an_earlier_reranker_checkpoint_loads_as_it_was_trained(tiny_backbone, tmp_path):
    trained = RerankModule(BackboneSpec(tiny_backbone, gradient_checkpointing=False), lora=LoraSpec(**LORA))
    trained.configure_model()
    trained = perturbed(trained)
    hparams = {
        "_class_path": "lamra_pl.models.rerank.RerankModule",  # the class path of that version
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        **flat_backbone(tiny_backbone, train_lm_head=False),
        "lora": LORA,
        "pointwise_weight": 1.0,
        "listwise_weight": 0.5,
        "loss_reduction": "kinds",
        "max_text_tokens": 256,
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4}},  # never built when loading
        "warmup_ratio": 0.1,
        "lr_schedule": "constant",
        "max_nonfinite_steps": 5,
    }
    save(tmp_path / "old.ckpt", trained, hparams)
    loaded = load_reranker(tmp_path / "old.ckpt")
    assert loaded.weights == (1.0, 0.5) and loaded.loss_reduction == "kinds"
    assert (loaded.schedule.warmup_ratio, loaded.schedule.lr_schedule) == (0.1, "constant")
    expected = trained.score_pointwise(trained.collator().pointwise_inputs(PAIRS))
    got = loaded.score_pointwise(loaded.collator().pointwise_inputs(PAIRS))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_an_earlier_clip_checkpoint_loads_by_its_keys(tmp_path):
    trained = perturbed(CLIPModule(str(ROOT / "experiments/clip/tiny_clip.json"), temperature=0.07))
    hparams = {  # no class path: a module built in Python; `clip_model` says which class it is
        "clip_model": str(ROOT / "experiments/clip/tiny_clip.json"),
        "checkpoint": None,
        "temperature": 0.07,
        "learnable_temperature": False,
        "precision": "fp32",
        "warmup_ratio": 0.03,
        "lr_schedule": "cosine",
        "max_nonfinite_steps": 5,
        "instructions": True,
    }
    save(tmp_path / "clip.ckpt", trained, hparams)
    loaded = load_retriever(tmp_path / "clip.ckpt")
    assert isinstance(loaded, CLIPModule) and abs(1 / loaded.logit_scale.item() - 0.07) < 1e-6
    items = [Item("t", text="a red circle"), ITEMS[1]]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.embed(loaded.collator().encode(items)),
            trained.embed(trained.collator().encode(items)),
            atol=0,
            rtol=0,
        )


def test_an_earlier_gradcache_checkpoint_keeps_its_chunks(tiny_backbone, tmp_path):
    trained = EmbeddingModule(BackboneSpec(tiny_backbone, gradient_checkpointing=False), lora=LoraSpec(**LORA))
    trained.configure_model()
    old = {**flat_backbone(tiny_backbone), "lora": LORA, "gradcache_chunk_size": 4, "gradcache_clip_norm": 1.0}
    save(tmp_path / "gc.ckpt", trained, {**old, "pooling": "last_token", "temperature": 0.1})
    loaded = load_module(tmp_path / "gc.ckpt")
    assert loaded.gradcache == GradCacheSpec(chunk_size=4, clip_norm=1.0) and loaded.pooling == "last_token"


def test_a_class_path_outside_the_project_is_refused(tiny_backbone, tmp_path):
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"_class_path": "os.system", "backbone": "x"}}, tmp_path / "x.ckpt"
    )
    with pytest.raises(LamraError, match=r"_class_path names 'os.system', which lamra-pl does not load"):
        load_module(tmp_path / "x.ckpt")
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"backbone": str(tiny_backbone), "shell": 1}}, tmp_path / "y.ckpt"
    )
    with pytest.raises(LamraError, match=r"\['shell'\] are not arguments of EmbeddingModule"):
        load_module(tmp_path / "y.ckpt")


def test_merged_folders_read_their_settings_of_either_version(tiny_backbone, tmp_path):
    trained = RerankModule(BackboneSpec(tiny_backbone, rope="1d", gradient_checkpointing=False), max_text_tokens=32)
    trained.configure_model()
    merged = save_merged(perturbed(trained), tmp_path / "merged", torch.float32)
    settings = json.loads((merged / "lamra_pl.json").read_text())
    assert settings["class_path"] == "lamra_pl.models.reranker.RerankModule" and "path" not in settings["init_args"]
    loaded = load_reranker(merged)
    assert (loaded.backbone.spec.rope, loaded.max_text_tokens, loaded.backbone.lora) == ("1d", 32, None)
    # The same folder as an earlier version wrote it: the reranker's flat settings file.
    (merged / "lamra_pl.json").unlink()
    (merged / "lamra_pl_rerank.json").write_text(json.dumps({"rope": "1d", "max_text_tokens": 32}))
    earlier = load_reranker(merged)
    assert (earlier.backbone.spec.rope, earlier.max_text_tokens) == ("1d", 32)
    expected = trained.score_pointwise(trained.collator().pointwise_inputs(PAIRS))
    for module in (loaded, earlier):
        torch.testing.assert_close(
            module.score_pointwise(module.collator().pointwise_inputs(PAIRS)), expected, atol=1e-5, rtol=0
        )
    # Read as a retriever (another kind of module), the folder's weights get the retriever's defaults.
    assert isinstance(load_retriever(merged), EmbeddingModule)
