"""The settings file of a model folder: which lamra-pl module a folder of weights is, and how it reads its inputs.

A folder written by `lamra-pl merge` is a Hugging Face checkpoint folder (config.json, weights, processor files,
chat template) plus, layout version VERSION:

    MODEL/
      lamra_pl.json                  {"format": "lamra-pl-settings", "version": 2, "class_path": CLASS,
                                      "init_args": {...}}: the module's own arguments (its typed groups, as its
                                      checkpoint's hyperparameters hold them) that say how the weights read their
                                      inputs; `lamra_pl.models.checkpoints` builds the module from them
      lamra_pl_pooling.safetensors   trained pooling weights that are not part of the Hugging Face model (NV-Embed's
                                      latent attention), when the module has them
      merge_models.json              in a folder `lamra-pl merge-models` wrote: how it was made (the models, their
                                      weights, the method, the base); a record, read by nothing

Version 1 folders (before the re-layout) carry `lamra_pl_embedding.json` (a retriever) or `lamra_pl_rerank.json`
(a reranker) instead: a flat mapping of the module's arguments of that time; they read as version 1 with the class
their name says. A folder with no settings file is a plain checkpoint, read with the module's defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats import read_json

FORMAT, VERSION = "lamra-pl-settings", 2
SETTINGS_FILE = "lamra_pl.json"
POOLING_FILE = "lamra_pl_pooling.safetensors"
# Version 1 file name -> the class it names.
LEGACY_FILES = {
    "lamra_pl_embedding.json": "lamra_pl.models.embedding.EmbeddingModule",
    "lamra_pl_rerank.json": "lamra_pl.models.rerank.RerankModule",
}


@dataclass
class ModelSettings:
    """How a model's weights read their inputs, as the user gives them to a tool (`--settings.rope 1d`) or to the
    Python API (`settings=ModelSettings(rope="1d")`): for a folder without this project's settings file (a
    released LamRA or Qwen-VL folder, which would otherwise be read with the defaults), or to change what a folder or
    checkpoint records. Each unset field keeps what the model records, or the default.

    Args:
        rope: positions: "model" (the backbone's own, mRoPE for the Qwen-VL families) or "1d" (plain sequential
            positions, as LamRA trained and evaluated).
        min_pixels: the fewest pixels an image is resized to (LamRA: 3136 = 4*28*28).
        max_pixels: the most pixels an image is resized to (LamRA: 235200 = 300*28*28; a Qwen2-VL-Instruct folder's
            own processor allows up to about 16k image tokens).
        pooling: a retriever's pooling: "before_emb" (LamRA), "last_token", "latent_attention" or "mean".
        max_text_tokens: texts are cut to this many tokens (LamRA: 480 for the retriever, 256 for the reranker).
        system_prompt: the chats' system turn: "default" (the chat template's own, as LamRA), "none" (no system
            turn) or a text.
        dim: a retriever's Matryoshka dimension: each embedding cut to its first `dim` values and L2-normalised
            again (`lamra_pl.models.matryoshka`); an index records it, and is searched only at the dimension it
            was built at. Unset: what the model records, else the full width.
        video_fps: sample a video at this many frames per second (when its frame rate is known), at most
            video_max_frames (LamRA's MSR-VTT evaluation: 2.0); unset: video_max_frames frames spread evenly.
        video_max_frames: the most frames of a video the model reads (LamRA: 12 for the retriever, 8 for the
            reranker).
        video_min_pixels: the fewest pixels a video frame is resized to (Qwen2-VL: 128*28*28).
        video_max_pixels: the most pixels a video frame is resized to (Qwen2-VL: 768*28*28).
        attention: the language model's attention: "causal" (the checkpoint's own) or "bidirectional" (a retriever
            trained without the causal mask: U-MARVEL, NV-Embed, MM-Embed).
        exclude_instruction: a retriever's mean pooling leaves out the query's instruction tokens (NV-Embed's,
            MM-Embed's).
    """

    rope: Literal["model", "1d"] | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    pooling: Literal["before_emb", "last_token", "latent_attention", "mean"] | None = None
    max_text_tokens: int | None = None
    system_prompt: str | None = None
    dim: int | None = None
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    attention: Literal["causal", "bidirectional"] | None = None
    exclude_instruction: bool | None = None

    def backbone_args(self) -> dict[str, Any]:
        """The set fields that are the backbone's (`BackboneSpec`)."""
        names = ("rope", "min_pixels", "max_pixels", "system_prompt")
        names += ("attention", "video_fps", "video_max_frames", "video_min_pixels", "video_max_pixels")
        return {k: v for k in names if (v := getattr(self, k)) is not None}

    def module_args(self) -> dict[str, Any]:
        """The set fields that are the module's own arguments."""
        names = ("pooling", "max_text_tokens", "dim", "exclude_instruction")
        return {k: v for k in names if (v := getattr(self, k)) is not None}


def module_args(settings: ModelSettings | None) -> dict[str, Any]:
    """`settings.module_args()`, or nothing when the caller gave no settings."""
    return {} if settings is None else settings.module_args()


def write_settings(folder: str | Path, class_path: str, init_args: dict[str, Any]) -> Path:
    return atomic_write(
        Path(folder) / SETTINGS_FILE,
        json.dumps({"format": FORMAT, "version": VERSION, "class_path": class_path, "init_args": init_args}, indent=1),
    )


@dataclass
class Settings:
    """A model folder's settings file, read."""

    class_path: str
    init_args: dict[str, Any]
    version: int
    path: Path  # the file they were read from (lamra_pl.json, or a version 1 file)


def read_settings(folder: str | Path) -> Settings | None:
    """The settings of a model folder; None when it has none."""
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if path.is_file():
        data = read_json(path, "a lamra-pl settings file")
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise LamraError(f"{path}: not a {FORMAT} file of version {VERSION}")
        if not isinstance(data.get("class_path"), str) or not isinstance(data.get("init_args"), dict):
            raise LamraError(f"{path}: needs a 'class_path' string and an 'init_args' mapping")
        return Settings(data["class_path"], data["init_args"], VERSION, path)
    for name, class_path in LEGACY_FILES.items():
        if (folder / name).is_file():
            data = read_json(folder / name, "a lamra-pl settings file")
            if not isinstance(data, dict):
                raise LamraError(f"{folder / name}: expected a mapping of settings")
            return Settings(class_path, data, 1, folder / name)
    return None
