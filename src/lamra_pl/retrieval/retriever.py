"""The Python API of a trained retriever.

retriever = Retriever.from_checkpoint("runs/stage2/version_0/checkpoints/last.ckpt")   # or a merged folder
vectors = retriever.encode(texts=["a red apple"])                                       # [1, D] float32
for hit in retriever.search("indexes/pool", query_text="a red apple", k=5):
    print(hit.rank, hit.id, hit.score, hit.txt, hit.img)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lamra_pl.data.schema import Item, with_instruction
from lamra_pl.errors import LamraError
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.merge import SETTINGS_FILE
from lamra_pl.retrieval.index import EmbeddingIndex, probe_embeddings
from lamra_pl.retrieval.search import Backend, search

ImageInput = Image.Image | str | Path


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    txt: str | None
    img: str | None


def load_embedding_module(path: str | Path) -> ContrastiveSteps:
    """A retriever in eval mode from a `lamra-pl fit` checkpoint (.ckpt: an EmbeddingModule's or a CLIPModule's)
    or a merged checkpoint folder (an EmbeddingModule's)."""
    p = Path(path)
    if p.is_file():
        hparams = torch.load(p, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
        if "clip_model" in hparams:  # the CLIP baseline's (its only model argument)
            return CLIPModule.load_from_checkpoint(p, map_location="cpu", weights_only=True).eval()
        module = EmbeddingModule.load_from_checkpoint(
            p, map_location="cpu", weights_only=True, gradient_checkpointing=False
        )
    elif p.is_dir():
        settings_file = p / SETTINGS_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        module = EmbeddingModule(str(p), lora=None, gradient_checkpointing=False, **settings)
        module.configure_model()
    else:
        raise LamraError(f"model {str(path)!r} is neither a checkpoint file nor a checkpoint folder")
    return module.eval()


class Retriever:
    """Encode texts and images with a trained retriever and search an index built by the same model."""

    def __init__(self, module: ContrastiveSteps) -> None:
        self.module = module.eval()
        self._checked: set[Path] = set()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> Retriever:
        return cls(load_embedding_module(path).to(device))

    @torch.no_grad()
    def encode(
        self,
        texts: list[str | None] | None = None,
        images: list[ImageInput | None] | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
    ) -> np.ndarray:
        """[n, D] float32 unit vectors of n texts, n images, or n (image, text) pairs; `instruction` is prepended
        to each text, as for queries in training."""
        n = len(texts if texts is not None else images or [])
        texts = list(texts) if texts is not None else [None] * n
        images = list(images) if images is not None else [None] * n
        if len(texts) != len(images) or n == 0:
            raise LamraError("encode needs texts, images, or both with the same length (at least one)")
        items = []
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            if text is None and image is None:
                raise LamraError(f"input {i} has neither text nor image")
            text = with_instruction(instruction, text) if instruction else text
            items.append(Item(str(i), text, _image(image) if image is not None else None))
        collator = self.module.collator()
        parts = [
            self.module.embed(collator.encode(items[s : s + batch_size]).to(self.module.device)).float().cpu()
            for s in range(0, n, batch_size)
        ]
        return torch.cat(parts).numpy()

    def search(
        self,
        index: EmbeddingIndex | str | Path,
        query_text: str | None = None,
        query_image: ImageInput | None = None,
        k: int = 10,
        instruction: str | None = None,
        backend: Backend = "auto",
    ) -> list[Hit]:
        """The top k candidates of `index` for one query (text, image or both), best first."""
        index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
        if index.path not in self._checked:
            index.check_model(probe_embeddings(self.module))
            self._checked.add(index.path)
        query = self.encode([query_text], [query_image], instruction=instruction)
        found = search(index.embeddings, query.astype(np.float16), k, tie_key=index.id_rank, backend=backend)
        rows = [int(r) for r in found.rows[0] if r >= 0]
        return [
            Hit(rank, item["id"], float(score), item.get("txt"), item.get("img"))
            for rank, (item, score) in enumerate(zip(index.items(rows), found.scores[0], strict=False), start=1)
        ]


def _image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise LamraError(f"image file {str(image)!r} does not exist")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except Exception as err:  # PIL raises many types for unreadable files
        raise LamraError(f"image file {str(image)!r} is not a readable image ({err})") from err
