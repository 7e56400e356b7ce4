"""`lamra-pl merge`: a training checkpoint (retriever or reranker) -> a model folder (`lamra_pl.formats.settings`).

LamRA's stage 2 starts from the merged stage-1 model. A LoRA adapter is merged into its base weights in float32
(merging in fp16, as the reference does, loses small weights); a fully fine-tuned checkpoint has its trained weights
written over the base. Either way the result is saved in the base checkpoint's dtype, with the processor, the chat
template and the settings file that make a module built on the folder compute what the checkpoint did.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import checkpoint
from lamra_pl.models.checkpoints import caller_settings, load_module, save_merged
from lamra_pl.models.clip import CLIPModule


def base_dtype(path: str | Path) -> torch.dtype:
    config = checkpoint(path).config()
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def merge(ckpt: str, out: str, backbone: str | None = None, trust_remote_code: bool = False) -> Path:
    """Merge a LoRA adapter into its base weights (float32) and save a full checkpoint in the base dtype.

    Args:
        ckpt: Lightning checkpoint written by `lamra-pl fit`.
        out: output directory (model, processor, chat template, settings).
        backbone: the backbone folder, when it is no longer where the checkpoint says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
    """
    if not Path(ckpt).is_file():
        raise LamraError(f"checkpoint {ckpt!r} does not exist")
    module = load_module(ckpt, backbone={"dtype": "float32", **caller_settings(backbone, trust_remote_code)})
    if isinstance(module, CLIPModule):
        raise LamraError(
            f"{ckpt} is a CLIPModule checkpoint: it holds every weight and has no adapter to merge; "
            "index, retrieve and search read it as it is"
        )
    written = save_merged(module, out, base_dtype(module.backbone.spec.path))
    print(f"merged checkpoint written to {written}")
    return written
