"""Turn a training checkpoint (retriever or reranker) into a full Hugging Face checkpoint directory.

LamRA's stage 2 starts from the merged stage-1 model. A LoRA adapter is merged into its base weights in
float32 (merging in fp16, as the reference does, loses small weights); a fully fine-tuned checkpoint has its
trained weights written over the base. Either way the result is saved in the base checkpoint's dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import checkpoint
from lamra_pl.models.base import BackboneModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.rerank import RerankModule

SETTINGS_FILE = "lamra_pl_embedding.json"
EMBEDDING_SETTINGS = (
    "pooling",
    "rope",
    "max_text_tokens",
    "min_pixels",
    "max_pixels",
    "padding_side",
    "instructions",
    "latents",
    "latent_heads",
)
RERANK_SETTINGS_FILE = "lamra_pl_rerank.json"
RERANK_SETTINGS = ("rope", "max_text_tokens", "min_pixels", "max_pixels", "padding_side")


def base_dtype(path: str | Path) -> torch.dtype:
    config = checkpoint(path).config()
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def merge(ckpt: str, out: str) -> Path:
    """Merge a training checkpoint's LoRA adapter (or trained weights) into its base and save a full checkpoint.

    Args:
        ckpt: a Lightning checkpoint written by `lamra-pl fit` (adapter weights + hyperparameters).
        out: directory for the merged model, its processor (a retriever's with `<emb>`) and chat template.
    """
    if not Path(ckpt).is_file():
        raise LamraError(f"checkpoint {ckpt!r} does not exist")
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    if "clip_model" in hparams:
        raise LamraError(
            f"{ckpt} is a CLIPModule checkpoint: it holds every weight and has no adapter to merge; "
            "index, retrieve and search read it as it is"
        )
    # A reranker's hyperparameters name its loss; everything else is a retriever's.
    cls: type[BackboneModule] = RerankModule if "loss_reduction" in hparams else EmbeddingModule
    module = cls.load_from_checkpoint(
        ckpt, map_location="cpu", weights_only=True, dtype="float32", gradient_checkpointing=False
    )
    dtype = base_dtype(module.hparams.backbone)
    merged = module.model.merge_and_unload() if module.lora is not None else module.model
    out_dir = Path(out)
    merged.to(dtype).save_pretrained(out_dir)
    module.processor.save_pretrained(out_dir)
    # How this model reads its inputs (pooling, positions, input limits): read back by Retriever.from_checkpoint
    # and load_rerank_module, so the merged model computes what the checkpoint did.
    name, keys = (
        (SETTINGS_FILE, EMBEDDING_SETTINGS) if cls is EmbeddingModule else (RERANK_SETTINGS_FILE, RERANK_SETTINGS)
    )
    (out_dir / name).write_text(json.dumps({k: module.hparams[k] for k in keys if k in module.hparams}, indent=1))
    if getattr(module, "latent_pool", None) is not None:  # trained latent-attention pooling: not part of the HF model
        module.latent_pool.save(out_dir)
    return out_dir
