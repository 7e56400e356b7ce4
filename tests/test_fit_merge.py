"""A tiny `lamra-pl fit` on shards end to end; `lamra-pl merge`; merged == unmerged embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import hparams_session, lamra, scalars
from lamra_pl.api import Retriever
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.checkpoints import load_module
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from test_embedding import ITEMS


def tiny_fit(backbone: Path, shards: Path, runs: Path, *overrides: str) -> Path:
    """`lamra-pl fit` of the tiny stage-2 config on `shards`; returns its run folder."""
    proc = lamra(
        "fit",
        "-c",
        "experiments/tiny/stage2_instruct.yaml",
        f"--model.init_args.backbone.path={backbone}",
        f"--data.init_args.train_shards={shards}",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={runs}",
        *overrides,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return runs / "tiny_stage2" / "version_0"


@pytest.fixture(scope="module")
def trained(tiny_backbone, shape_shards, tmp_path_factory) -> Path:
    overrides = ("--data.init_args.batch_size=12", "--data.init_args.num_negatives=1", "--trainer.max_steps=60")
    return tiny_fit(tiny_backbone, shape_shards, tmp_path_factory.mktemp("runs"), *overrides)


@pytest.mark.slow
def test_fit_runs_end_to_end_and_the_loss_falls(trained):
    assert (trained / "config.yaml").is_file()
    series = scalars(trained)
    losses = [v for _, v in series["train/loss"]]
    assert len(losses) == 60
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    # Counters of what never happened are not logged (no flat zero curves): nothing was skipped here.
    assert not [tag for tag in series if tag.startswith("data/skipped_") or tag == "train/nonfinite_steps"]
    # The learning-rate monitor of the config: 3% warmup of 60 steps (2 steps from 0), then cosine down to 0.
    lr = [v for _, v in series["lr-AdamW"]]
    assert len(lr) == 60 and lr[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and lr[3] < lr[2] and lr[-1] < 1e-5
    # A fit without validation is still a TensorBoard HParams session: its config's hyperparameters, flattened
    # as `lamra-pl report` reads them, beside its scalars' last values; not "finished" (no hp/* metrics).
    session = hparams_session(trained)
    assert session["model.class"] == "lamra_pl.EmbeddingModule" and session["model.lora.r"] == 32
    assert session["model.optimizer.lr"] == pytest.approx(1e-3) and session["data.batch_size"] == 12
    assert session["trainer.max_steps"] == 60 and session["model.instructions"] == "True"
    assert not any(tag.startswith("hp/") for tag in series)


@pytest.mark.slow
def test_checkpoint_holds_only_trainable_weights_and_loads_weights_only(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    keys = list(ckpt["state_dict"])
    assert len(keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert ckpt["hyper_parameters"]["lora"]["r"] == 32
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt  # what resume needs


@pytest.mark.slow
def test_merge_then_reload_gives_the_unmerged_embeddings(trained, tiny_backbone, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    out = tmp_path / "merged"
    proc = lamra("merge", f"--ckpt={ckpt}", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    adapter = load_module(ckpt)
    merged = EmbeddingModule(BackboneSpec(out, gradient_checkpointing=False))
    merged.configure_model()
    merged.eval()
    base = EmbeddingModule(BackboneSpec(tiny_backbone), lora=LoraSpec(r=32, alpha=64, dropout=0.0))
    base.configure_model()
    base.eval()
    assert merged.emb_token_id == adapter.emb_token_id
    with torch.no_grad():
        batch = EmbeddingCollator(adapter.processor).encode(ITEMS)
        e_adapter, e_merged, e_base = adapter.embed(batch), merged.embed(batch), base.embed(batch)
    torch.testing.assert_close(e_merged, e_adapter, atol=1e-4, rtol=0)
    assert (e_adapter - e_base).abs().max() > 1e-2, "training must have moved the embeddings"
    # The Retriever loads the checkpoint and the merged folder (with its saved pooling settings) alike.
    texts = [item.text for item in ITEMS if item.image is None]
    from_ckpt, from_dir = Retriever.from_checkpoint(ckpt).encode(texts), Retriever.from_checkpoint(out).encode(texts)
    np.testing.assert_allclose(from_dir, from_ckpt, atol=1e-4)
    np.testing.assert_allclose(
        from_ckpt, e_adapter[[i for i, item in enumerate(ITEMS) if item.image is None]], atol=1e-5
    )


@pytest.mark.slow
def test_merge_of_a_full_fine_tuning_checkpoint(tiny_backbone, shape_shards, tmp_path):
    out = tmp_path / "merged"
    run = tiny_fit(
        tiny_backbone,
        shape_shards,
        tmp_path / "runs",
        "--model.init_args.lora=null",
        "--model.init_args.backbone.train_vision_tower=true",
        "--model.init_args.backbone.train_projector=true",
        "--data.init_args.batch_size=6",
        "--trainer.max_steps=3",
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    assert any(".visual.blocks." in k for k in state) and not any("lora_" in k for k in state)
    assert lamra("merge", f"--ckpt={ckpt}", f"--out={out}").returncode == 0
    trained = load_module(ckpt)
    merged = EmbeddingModule(BackboneSpec(out, gradient_checkpointing=False))
    merged.configure_model()
    merged.eval()
    with torch.no_grad():
        batch = EmbeddingCollator(trained.processor).encode(ITEMS)
        torch.testing.assert_close(merged.embed(batch), trained.embed(batch), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_latent_attention_pooling_trains_is_saved_with_the_adapter_and_merged(tiny_backbone, shape_shards, tmp_path):
    """MM-Embed's pooling (NV-Embed latent attention): its own weights train, ride in the checkpoint beside the LoRA
    adapter, and `merge` writes them, so the merged folder embeds as the checkpoint does."""
    out = tmp_path / "merged"
    run = tiny_fit(
        tiny_backbone,
        shape_shards,
        tmp_path / "runs",
        "--model.init_args.pooling=latent_attention",
        "--model.init_args.latents=8",
        "--model.init_args.latent_heads=2",
        "--data.init_args.batch_size=6",
        "--trainer.max_steps=2",
    )
    assert all(np.isfinite(v) for _, v in scalars(run)["train/loss"])
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    fresh = EmbeddingModule(BackboneSpec(tiny_backbone), pooling="latent_attention", latents=8, latent_heads=2)
    fresh.configure_model()
    hidden = fresh.model.config.get_text_config().hidden_size
    assert state["latent_pool.latents"].shape == fresh.latent_pool.latents.shape == (8, hidden)
    assert any("lora_" in k for k in state)
    assert not torch.equal(state["latent_pool.latents"], fresh.latent_pool.latents.detach())  # it trained
    assert lamra("merge", f"--ckpt={ckpt}", f"--out={out}").returncode == 0
    texts = [item.text for item in ITEMS if item.image is None]
    from_ckpt, from_dir = Retriever.from_checkpoint(ckpt).encode(texts), Retriever.from_checkpoint(out).encode(texts)
    np.testing.assert_allclose(from_dir, from_ckpt, atol=1e-4)
