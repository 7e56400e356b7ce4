"""The Python API: a trained retriever, and `lamra-pl search` on top of it.

    from lamra_pl import Retriever
    retriever = Retriever.from_checkpoint("runs/stage2/version_0/checkpoints/last.ckpt")   # or a merged folder
    vectors = retriever.encode(texts=["a red apple"])                                       # [1, D] float32
    for hit in retriever.search("indexes/pool", query_text="a red apple", k=5):
        print(hit.rank, hit.id, hit.score, hit.txt, hit.img)

The modules, their checkpoints and model folders are `lamra_pl.models.checkpoints`' (`load_module`,
`load_retriever`, `load_reranker`); the command-line jobs are in `lamra_pl.pipelines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lamra_pl.errors import LamraError
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.sample import IMAGE_FORMATS, Item, with_instruction
from lamra_pl.models.checkpoints import caller_settings, load_retriever
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.ranking.search import Backend
from lamra_pl.ranking.search import search as search_embeddings

ImageInput = Image.Image | str | Path


@dataclass
class Hit:
    rank: int
    id: str
    score: float
    txt: str | None
    img: str | None


class Retriever:
    """Encode texts and images with a trained retriever and search an index built by the same model."""

    def __init__(self, module: ContrastiveSteps) -> None:
        self.module = module.eval()
        self._checked: set[Path] = set()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", backbone: str | Path | None = None, trust_remote_code: bool = False
    ) -> Retriever:
        """The retriever of a `fit` checkpoint or a model folder. `backbone`: where a checkpoint's backbone is now,
        when not where the checkpoint says; `trust_remote_code`: run code the backbone folder ships (never taken
        from a file)."""
        settings = caller_settings(None if backbone is None else str(backbone), trust_remote_code)
        return cls(load_retriever(path, backbone=settings).to(device))

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
            index.check_model(self.module.probe_embeddings())
            self._checked.add(index.path)
        query = self.encode([query_text], [query_image], instruction=instruction)
        found = search_embeddings(index.embeddings, query.astype(np.float16), k, tie_key=index.id_rank, backend=backend)
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
        with Image.open(path, formats=IMAGE_FORMATS) as opened:
            return opened.convert("RGB")
    except Exception as err:  # PIL raises many types for unreadable files
        raise LamraError(f"image file {str(image)!r} is not a readable image ({err})") from err


def search(
    model: str,
    index: str,
    text: str | None = None,
    image: str | None = None,
    k: int = 10,
    instruction: str | None = None,
    backend: Backend = "auto",
    backbone: str | None = None,
    trust_remote_code: bool = False,
) -> list[Hit]:
    """Search an index for a text, an image or both, and print the ranked candidates.

    Args:
        model: the checkpoint that built the index.
        index: an index folder written by `lamra-pl index`.
        text: the query text.
        image: the query image file.
        k: results to print.
        instruction: a task instruction prepended to the query text (e.g. "Find the emoji image with this name.").
        backend: faiss, torch or auto.
        backbone: the backbone folder of a checkpoint whose backbone is no longer where it says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
    """
    if text is None and image is None:
        raise LamraError("give --text, --image or both")
    retriever = Retriever.from_checkpoint(model, backbone=backbone, trust_remote_code=trust_remote_code)
    hits = retriever.search(index, query_text=text, query_image=image, k=k, instruction=instruction, backend=backend)
    print(f"{'rank':>4}  {'score':>7}  {'id':<16} text | image")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.id:<16} {hit.txt or ''} | {hit.img or ''}")
    return hits
