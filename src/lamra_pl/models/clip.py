"""The CLIP dual-encoder baseline (UniIR's CLIP-SF) on open_clip, trained and evaluated like the LMM retriever.

An input is encoded by the image tower, the text tower, or both; for an image+text input the two L2-normalised
embeddings are summed (UniIR's score-level fusion: the dot product of two fused vectors is the sum of the
image-image, image-text, text-image and text-text scores), and every embedding is L2-normalised last, so the
index and the InfoNCE see unit vectors as they do for `EmbeddingModule`. The steps, the loss and the evaluation
are `ContrastiveSteps`, shared with the LMM retriever.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from transformers import BatchFeature

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Item
from lamra_pl.models.base import ScheduleSpec, TrainingModule
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.models.matryoshka import check_dim, truncate

# Configs whose towers or tokenizer come from the Hugging Face hub would be fetched at creation.
HUB_KEYS = ("hf_model_name", "hf_tokenizer_name", "timm_model_name")


def open_clip_name(clip_model: str) -> str:
    """The open_clip model name of `clip_model`: a built-in name (`open_clip.list_models()`), or a model config
    JSON file (`{"embed_dim", "vision_cfg", "text_cfg"}`, registered under its file stem)."""
    if clip_model.endswith(".json"):
        path = Path(clip_model)
        if not path.is_file():
            raise LamraError(f"model.clip_model: config file {clip_model!r} does not exist")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LamraError(f"model.clip_model: {clip_model} is not valid JSON ({err})") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise LamraError(f"model.clip_model: {clip_model} lacks the open_clip config keys {missing}")
        open_clip.add_model_config(path)
        name = path.stem
    else:
        name = clip_model
    config = open_clip.get_model_config(name)
    if config is None:
        raise LamraError(
            f"model.clip_model: {clip_model!r} is neither an open_clip model name nor a config .json file "
            f"(names: {', '.join(open_clip.list_models()[:8])}, ...)"
        )
    hub = [k for tower in ("vision_cfg", "text_cfg") for k in HUB_KEYS if k in config.get(tower, {})]
    if hub:
        raise LamraError(
            f"model.clip_model: {clip_model!r} builds its towers or tokenizer from the Hugging Face hub ({hub}); "
            "nothing is downloaded here: use a config with open_clip's own towers"
        )
    return name


class CLIPCollator(EmbeddingCollator):
    """Examples -> {"query", "candidates": BatchFeature, ids}, as `EmbeddingCollator` lays them out.

    A batch of n items is `input_ids` [texts, context] with `text_rows` (which item each text is), `pixel_values`
    [images, 3, S, S] with `image_rows`, and `num_rows` = n. Texts are cut to the tokenizer's context length.
    """

    def __init__(self, tokenizer: Any, preprocess: Any, instructions: bool = True) -> None:
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.chunk_size = None
        self.instructions = instructions

    def encode(self, items: list[Item]) -> BatchFeature:
        unread = next((item for item in items if item.video is not None or item.parts is not None), None)
        if unread is not None:  # CLIP reads one image and one text: the rest would be dropped unseen
            kind = "a video" if unread.video is not None else "interleaved parts"
            raise LamraError(f"{unread.id}: a CLIP model reads one image and one text per item, not {kind}")
        texts = [(row, item.text) for row, item in enumerate(items) if item.text is not None]
        images = [(row, item.image) for row, item in enumerate(items) if item.image is not None]
        data: dict[str, torch.Tensor] = {"num_rows": torch.tensor(len(items))}
        if texts:
            data["text_rows"] = torch.tensor([row for row, _ in texts])
            data["input_ids"] = self.tokenizer([text for _, text in texts])
        if images:
            data["image_rows"] = torch.tensor([row for row, _ in images])
            data["pixel_values"] = torch.stack([self.preprocess(image.convert("RGB")) for _, image in images])
        return BatchFeature(data)

    def length(self, item: Item) -> int:
        return 0  # every text is padded to the context length and every image resized alike: nothing to bucket


class CLIPModule(ContrastiveSteps, TrainingModule):
    """A CLIP dual encoder trained with the retriever's InfoNCE on the same shards; every weight trains.

    Args:
        clip_model: an open_clip model name ("ViT-B-32", ...) or a model config .json file (e.g.
            `experiments/clip/tiny_clip.json`); randomly initialised unless `checkpoint` is given.
        checkpoint: a local open_clip weights file (.pt, .bin or .safetensors) for that config; nothing is ever
            downloaded. Its `logit_scale` is not used: the temperature is this module's, as for the LMM.
        temperature: InfoNCE temperature (as `EmbeddingModule`'s).
        learnable_temperature: train the temperature.
        precision: open_clip's weight precision ("fp32", "bf16", ...); Trainer precision still applies.
        instructions: prepend each query's task instruction (UniIR's CLIP-SF trains with them; as for
            `EmbeddingModule`).
        optimizer: built from every parameter but open_clip's own logit scale.
        schedule: the learning-rate schedule (`ScheduleSpec`: warmup_ratio, lr_schedule).
        dim: embed at this Matryoshka dimension: each fused embedding cut to its first `dim` values and
            L2-normalised again (`lamra_pl.models.matryoshka`); null: the full width (the config's `embed_dim`).
        loss: the InfoNCE's options (`LossSpec`, as `EmbeddingModule`'s); null: the plain InfoNCE.
    """

    def __init__(
        self,
        clip_model: str = "ViT-B-32",
        checkpoint: str | None = None,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        precision: str = "fp32",
        instructions: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleSpec | None = None,
        dim: int | None = None,
        loss: LossSpec | None = None,
    ) -> None:
        check_dim(dim)
        if temperature <= 0:
            raise LamraError(f"model.temperature must be positive, got {temperature}")
        super().__init__(optimizer=optimizer, schedule=schedule)
        self.instructions = instructions
        name = open_clip_name(clip_model)
        if checkpoint is not None and not Path(checkpoint).is_file():
            # open_clip would read any other string as a pretrained tag and try to download it.
            raise LamraError(f"model.checkpoint: {checkpoint!r} is not a file")
        self.clip, _, self.preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=checkpoint,
            precision=precision,
            pretrained_image=False,
            pretrained_text=False,
            weights_only=True,
        )
        self.clip.logit_scale.requires_grad_(False)  # unused (see `checkpoint`): not trained, not checkpointed
        self.tokenizer = open_clip.get_tokenizer(name)
        self.init_temperature(temperature, learnable_temperature)
        self.full_dim = int(open_clip.get_model_config(name)["embed_dim"])  # both towers project to it
        check_dim(dim, self.full_dim)
        self.dim = dim
        self.init_loss(loss)

    def collator(self) -> CLIPCollator:
        return CLIPCollator(self.tokenizer, self.preprocess, self.instructions)

    def embed(self, inputs: BatchFeature | dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit vectors: each item's normalised text and/or image embedding, summed, normalised (cut to `dim`
        values first when it is set)."""
        parts = []
        if "input_ids" in inputs:
            parts.append((inputs["text_rows"], self.clip.encode_text(inputs["input_ids"])))
        if "pixel_values" in inputs:
            pixels = inputs["pixel_values"].to(next(self.clip.visual.parameters()).dtype)
            parts.append((inputs["image_rows"], self.clip.encode_image(pixels)))
        if not parts:
            raise LamraError("a CLIP batch with neither texts nor images")
        dim = parts[0][1].shape[-1]
        fused = torch.zeros(int(inputs["num_rows"]), dim, device=self.device, dtype=torch.float32)
        for rows, embeddings in parts:
            fused = fused.index_add(0, rows, F.normalize(embeddings.float(), dim=-1))
        return truncate(fused, self.dim)
