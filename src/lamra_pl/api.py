"""The Python API, in the style of sentence-transformers: a trained retriever (`Retriever`), a reranker
(`Reranker`), and `lamra-pl search` on top of them.

    from lamra_pl import Reranker, Retriever

    retriever = Retriever.from_checkpoint("runs/stage2/version_0/checkpoints/last.ckpt")   # or a merged folder
    queries = retriever.encode_queries(["a red apple"], instruction="Find the emoji image with this name.")
    documents = retriever.encode_documents(texts=["apple", None], images=[None, "emoji/1f34e.png"])
    scores = queries @ documents.T                                    # float32 unit vectors: cosine similarity
    retriever.build_index(texts=names, images=files, ids=ids, out="indexes/mine")   # what `lamra-pl index` writes
    hits = retriever.search("indexes/mine", query_text=["red apple", "green pear"], k=5)    # a list per query

    reranker = Reranker.from_checkpoint("runs/rerank/version_0/checkpoints/last.ckpt")
    p_yes = reranker.score("a red apple", ["a green pear", Path("apple.png"), {"text": "apple", "image": image}])
    best = reranker.rank("a red apple", candidates, top_k=3, mode="listwise")

Everything here computes what the command-line tools compute for the same items: `encode_queries` and
`encode_documents` the vectors `lamra-pl retrieve` and `lamra-pl index` store (before their float16 rounding),
`build_index` the index `lamra-pl index` writes (through the same chunk writer, `formats.index.ChunkStore`), `search`
the ranking of `lamra-pl search` and `retrieve`, `Reranker.score` and `rank` the scores `lamra-pl rerank` writes
(through the same prompts and one-forward scores, `models.rerank_inputs` and `models.reranker`).

The modules, their checkpoints and model folders are `lamra_pl.models.checkpoints`' (`load_module`,
`load_retriever`, `load_reranker`); the command-line jobs are in `lamra_pl.pipelines`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from lamra_pl.data.items import batch_rows
from lamra_pl.errors import LamraError
from lamra_pl.formats import shard_fingerprint
from lamra_pl.formats.index import ChunkStore, EmbeddingIndex, finished, inputs_fingerprint
from lamra_pl.formats.sample import IMAGE_FORMATS, MAX_STORED_FRAMES, Item, instructed_item, with_instruction
from lamra_pl.formats.settings import ModelSettings, module_args
from lamra_pl.formats.video_file import read_video
from lamra_pl.models.checkpoints import caller_settings, load_reranker, load_retriever
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.rerank_inputs import MAX_LIST, JudgePrompt
from lamra_pl.models.reranker import RerankModule
from lamra_pl.progress import progress
from lamra_pl.ranking.search import Backend
from lamra_pl.ranking.search import search as search_embeddings


@dataclass(frozen=True)
class Video:
    """A video input: a video file (MP4, AVI, ... decoded with PyAV, `lamra_pl.formats.video_file`: about 2 frames
    per second, at most 768 frames of at most 768*28*28 pixels), a folder of its frames (image files, read in name
    order) or a list of PIL images, and the frames' rate if known (a file's is measured). It goes wherever an image
    may (`encode(images=[Video(...)])`, `search(query_image=Video(...))`, `build_index`, `Reranker.score`), and the
    model samples it to its frame budget (`lamra_pl.models.video`)."""

    frames: str | Path | Sequence[Image.Image]
    fps: float | None = None

    def read(self) -> tuple[list[Image.Image], float | None]:
        """The frames, in time order, and their rate (given, or measured from a video file)."""
        if isinstance(self.frames, (str, Path)) and Path(self.frames).is_file():
            frames, fps = read_video(self.frames)
            return frames, self.fps if self.fps is not None else fps
        return self.images(), self.fps

    def images(self) -> list[Image.Image]:
        if not isinstance(self.frames, (str, Path)):
            frames = [_image(f) for f in self.frames]
        elif Path(self.frames).is_file():
            frames = read_video(self.frames)[0]
        else:
            folder = Path(self.frames)
            if not folder.is_dir():
                raise LamraError(
                    f"video folder or file {str(folder)!r} does not exist (a video file or a folder of its frames)"
                )
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
            frames = [_image(p) for p in files]
        if not frames:
            raise LamraError(f"video {self.name()!r} has no frames")
        if len(frames) > MAX_STORED_FRAMES:
            raise LamraError(f"video {self.name()!r} has {len(frames)} frames, over {MAX_STORED_FRAMES}; thin it")
        return frames

    def name(self) -> str:
        return str(self.frames) if isinstance(self.frames, (str, Path)) else "<video>"


@dataclass(frozen=True)
class Interleaved:
    """An input of several texts and images in reading order (VIST's stories, multi-turn FashionIQ's sessions):
    each part a text (a str is always a text) or an image (a PIL image or a pathlib.Path). It goes where an image
    may in `encode`, `encode_queries`, `encode_documents`, `search` and `Reranker.score`, with no text beside it
    (the texts are parts); the model reads its instruction, then the parts in order (`formats.sample`'s `parts`)."""

    parts: Sequence[str | Image.Image | Path]

    def read(self) -> list[str | Image.Image]:
        if isinstance(self.parts, (str, Path, Image.Image)) or not self.parts:
            raise LamraError("Interleaved takes a list of texts and images, at least one of them an image")
        out: list[str | Image.Image] = []
        for i, part in enumerate(self.parts):
            if isinstance(part, str):
                if not part.strip():
                    raise LamraError(f"Interleaved part {i} is an empty text")
                out.append(part)
            elif isinstance(part, (Image.Image, Path)):
                out.append(_image(part))
            else:
                raise LamraError(f"Interleaved part {i} is a {type(part).__name__}: a str text, or a PIL image or Path")
        if all(isinstance(p, str) for p in out):
            raise LamraError("Interleaved takes at least one image among its parts")
        return out


VISUAL = (str, Path, Image.Image, Video, Interleaved)  # what the API takes where it takes an image
ImageInput = Image.Image | str | Path | Video | Interleaved
# A reranker's query or candidate, as sentence-transformers' CrossEncoder takes them: a text (a str is always a
# text, never guessed to be a file name), an image (a PIL image or a pathlib.Path), a Video, or text with either as
# a mapping {"text": ..., "image": PIL image, str, Path or Video}.
RerankInput = str | Image.Image | Path | Video | Interleaved | Mapping[str, Any]
Mode = Literal["pointwise", "listwise"]
CHUNK = 1024  # items whose images are open at once while encoding; each chunk is bucketed by length on its own


@dataclass
class Hit:
    """A search result: its rank (1 = best), the candidate's id, its score (inner product) and, for display, its
    text and image path as the index's items.jsonl holds them."""

    rank: int
    id: str
    score: float
    txt: str | None
    img: str | None
    vid: str | None = None  # a video candidate's source (items.jsonl's "vid")


@dataclass
class Ranked:
    """A reranked candidate: its rank (1 = best), its position in the candidates given, and its score."""

    rank: int
    index: int
    score: float


class Retriever:
    """Encode texts and images with a trained retriever, search an index built by the same model, or build one.

    Vectors are float32 numpy arrays of L2-normalised rows, one per input, in input order (inputs are batched by
    length, as `lamra-pl index` batches a shard, and put back in order).
    """

    def __init__(self, module: ContrastiveSteps, path: str | Path | None = None) -> None:
        self.module = module.eval()
        self.path = None if path is None else str(path)
        self._checked: set[Path] = set()
        self._probe: np.ndarray | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        backbone: str | Path | None = None,
        trust_remote_code: bool = False,
        settings: ModelSettings | None = None,
    ) -> Retriever:
        """The retriever of a `fit` checkpoint or a model folder. `backbone`: where a checkpoint's backbone is now,
        when not where the checkpoint says; `trust_remote_code`: run code the backbone folder ships (never taken
        from a file); `settings`: how the model reads its inputs (`ModelSettings(rope="1d", max_pixels=...)`), for a
        folder without lamra-pl's settings file (a released LamRA folder) or to change what the model records;
        `ModelSettings(dim=D)` embeds at a Matryoshka dimension (every vector cut to D values, normalised again)."""
        overrides = caller_settings(None if backbone is None else str(backbone), trust_remote_code, settings)
        return cls(load_retriever(path, backbone=overrides, module=module_args(settings)).to(device), path)

    @property
    def instructions(self) -> bool:
        """Whether this model reads task instructions (False for one trained without them: `encode_queries` then
        leaves them out, as `lamra-pl retrieve` does)."""
        return bool(self.module.collator().instructions)

    @torch.no_grad()
    def encode(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageInput | Sequence[ImageInput | None] | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """[n, D] float32 unit vectors of n texts, n images, or n (image, text) pairs (`texts[i]` with
        `images[i]`; None where an input has only the other). `instruction` is prepended to every text, whatever
        the model was trained with (`encode_queries` follows the model). A single text or image is one input.
        `show_progress_bar`: None shows it when the inputs span more than one batch."""
        _at_least_one(batch_size=batch_size)
        return self._encode(_inputs(texts, images), batch_size, show_progress_bar, instruction)

    def encode_queries(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageInput | Sequence[ImageInput | None] | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Query vectors, as `lamra-pl retrieve` computes them: the task `instruction` prepended to each query's text
        (an image query gets the instruction as its text), unless the model was trained without instructions
        (`instructions` False), which leaves it out, as `retrieve` does (with a warning when one is given)."""
        if instruction and not self.instructions:
            warnings.warn(
                "this retriever was trained without instructions (model.instructions: false): the instruction is "
                "left out, as `lamra-pl retrieve` leaves it out",
                stacklevel=2,
            )
            instruction = None
        return self.encode(texts, images, instruction, batch_size, show_progress_bar)

    def encode_documents(
        self,
        texts: str | Sequence[str | None] | None = None,
        images: ImageInput | Sequence[ImageInput | None] | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Candidate vectors, as `lamra-pl index` computes them for a pool: no instruction."""
        return self.encode(texts, images, None, batch_size, show_progress_bar)

    def search(
        self,
        index: EmbeddingIndex | str | Path,
        query_text: str | Sequence[str | None] | None = None,
        query_image: ImageInput | Sequence[ImageInput | None] | None = None,
        k: int = 10,
        instruction: str | None = None,
        backend: Backend = "auto",
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """The top k candidates of `index` (built by this model), best first, for one query (a text, an image or
        both: a list of Hit) or for many (lists of texts and/or images: a list of Hit lists, one per query).
        Queries are encoded by `encode_queries` (with `instruction`) and searched in float16, as `retrieve`
        searches its stored queries; equal scores are ordered by id."""
        many = _is_list(query_text) or _is_list(query_image)
        if many and any(v is not None and not _is_list(v) for v in (query_text, query_image)):
            raise LamraError(
                "search takes one query (a text and/or an image) or lists of them (texts and/or images, as many of "
                "each), not a list and a single value"
            )
        if query_text is None and query_image is None:
            raise LamraError("search needs a query: a text, an image or both (or lists of them)")
        index = index if isinstance(index, EmbeddingIndex) else EmbeddingIndex(index)
        if index.path not in self._checked:
            index.check_model(self._probe_embeddings())
            self._checked.add(index.path)
        texts = query_text if many else [query_text]
        images = query_image if many else [query_image]
        if many and all(len(v) == 0 for v in (query_text, query_image) if v is not None):
            return []
        queries = self.encode_queries(texts, images, instruction, batch_size, show_progress_bar)
        found = search_embeddings(
            index.embeddings, queries.astype(np.float16), k, tie_key=index.id_rank, backend=backend
        )
        rows = [[int(r) for r in row if r >= 0] for row in found.rows]
        wanted = sorted({r for row in rows for r in row})
        items = dict(zip(wanted, index.items(wanted), strict=True))
        hits = [
            [
                Hit(rank, items[r]["id"], float(score), items[r].get("txt"), items[r].get("img"), items[r].get("vid"))
                for rank, (r, score) in enumerate(zip(row, scores, strict=False), start=1)
            ]
            for row, scores in zip(rows, found.scores, strict=True)
        ]
        return hits if many else hits[0]

    @torch.no_grad()
    def build_index(
        self,
        texts: Sequence[str | None] | None = None,
        images: Sequence[ImageInput | None] | None = None,
        ids: Sequence[str] | None = None,
        *,
        out: str | Path,
        batch_size: int = 32,
        chunk_size: int = 4096,
        show_progress_bar: bool | None = None,
    ) -> EmbeddingIndex:
        """Encode candidates given as lists (texts, images or both, as `encode_documents` takes them) into an index
        folder `out` in `lamra-pl index`'s format (`lamra_pl.formats.index`), which `search`, `lamra-pl search` and
        `lamra-pl retrieve` read. `ids`: one per candidate, unique, without white space (run files are
        space-separated); default "0", "1", .... Its items.jsonl holds each text and image path (`<PIL image>` for
        an image given without a file name); it has no pool shards (`sources` is empty), so `lamra-pl rerank`,
        `mine` and `rerank-data`, which read candidates from them, cannot use it.

        Each chunk of `chunk_size` candidates is written to `out/parts/` once encoded: a call stopped midway,
        called again with the same candidates, goes on where it stopped; one over a finished index of the same
        candidates and model returns it as it is; other candidates or another model are refused, as by
        `lamra-pl index`."""
        _at_least_one(batch_size=batch_size, chunk_size=chunk_size)
        inputs = _inputs(texts, images)
        n = len(inputs)
        ids = [str(i) for i in range(n)] if ids is None else list(ids)
        _check_ids(ids, n)
        spans = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
        described = [_describe(f"items[{s}:{e}]", ids[s:e], inputs[s:e]) for s, e in spans]
        fingerprint = inputs_fingerprint("pool", described, None, None)
        probe = self._probe_embeddings()
        if not finished(out, [], fingerprint, probe):
            store = ChunkStore(out)
            model = {"path": self.path, "dim": self.module.dim, "full_dim": self.module.full_dim}
            manifest = {"kind": "pool", "sources": [], "chunks": len(spans), "instruction_seed": None}
            store.start({**manifest, "model": model, "inputs": fingerprint}, probe)
            done = store.done()
            todo = [c for c in range(len(spans)) if c not in done]
            total = sum(spans[c][1] - spans[c][0] for c in todo)
            with _progress(total, batch_size, show_progress_bar, "index") as bar:
                for c in todo:
                    s, e = spans[c]
                    chunk = inputs[s:e]
                    embeddings = self._embed([_item(text, image) for text, image in chunk], batch_size, bar)
                    records = [_item_row(i, text, image) for i, (text, image) in zip(ids[s:e], chunk, strict=True)]
                    store.write(c, embeddings.astype(np.float16), records)
            store.assemble(len(spans))
        return EmbeddingIndex(out)

    # ------------------------------------------------------------------------------------------ internals
    def _encode(
        self,
        inputs: list[tuple[str | None, ImageInput | None]],
        batch_size: int,
        show: bool | None,
        instruction: str | None = None,
    ) -> np.ndarray:
        """Embeddings of (text, image) inputs, `instruction` prepended to each text (`instructed_item`)."""
        parts = []
        with _progress(len(inputs), batch_size, show, "encode") as bar:
            for s in range(0, len(inputs), CHUNK):
                items = [_item(text, image, instruction=instruction) for text, image in inputs[s : s + CHUNK]]
                parts.append(self._embed(items, batch_size, bar))
        return np.concatenate(parts)

    def _embed(self, items: list[Item], batch_size: int, bar: Any) -> np.ndarray:
        """[len(items), D] float32 embeddings, batched as `lamra-pl index` batches a shard (`batch_rows`)."""
        collator = self.module.collator()
        out: np.ndarray | None = None
        for rows in batch_rows(items, collator, batch_size):
            batch = collator.encode([items[r] for r in rows]).to(self.module.device)
            embeddings = self.module.embed(batch).float().cpu().numpy()
            if out is None:
                out = np.empty((len(items), embeddings.shape[1]), dtype=np.float32)
            out[rows] = embeddings
            bar.update(len(rows))
        assert out is not None  # items is never empty here
        return out

    def _probe_embeddings(self) -> np.ndarray:
        if self._probe is None:
            self._probe = self.module.probe_embeddings()
        return self._probe


class Reranker:
    """Score and rank candidates for a query with a reranker (LamRA-Rank) or an off-the-shelf instruct model as a
    zero-shot judge (MM-Embed), as `lamra-pl rerank` does.

    A query or candidate is a text (a str), an image (a PIL image or a pathlib.Path), a video (`Video`) or text
    with either ({"text": ..., "image": ...}, the image may be a `Video`); `instruction` is prepended to the
    query's text, as the task instruction of an evaluation query.
    """

    def __init__(self, module: RerankModule) -> None:
        self.module = module.eval()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "cpu",
        backbone: str | Path | None = None,
        trust_remote_code: bool = False,
        zero_shot: bool = False,
        question: str | None = None,
        answers: tuple[str, str] = ("True", "False"),
        settings: ModelSettings | None = None,
    ) -> Reranker:
        """The reranker of a `fit` checkpoint or a model folder (a merged reranker; an off-the-shelf instruct model
        reranks with LamRA-Rank's prompt). `zero_shot`: a model folder (or .gguf file) judges with a yes/no
        question instead, asked after the query and the candidate: `question` ({candidate} names its modality), or
        by default "Does the above {candidate} match the query? True or False" (the API knows no task, so not
        MM-Embed's per-task wording, which `lamra-pl rerank` asks of M-BEIR tasks); the score
        being P(answers[0]) over the two answers, as `lamra-pl rerank --zero_shot true`. `backbone`: where a
        checkpoint's backbone is now; `trust_remote_code`: run code the backbone folder ships (never taken from a
        file); `settings`: how the model reads its inputs (`ModelSettings`: rope, pixels, max_text_tokens)."""
        judge = JudgePrompt(question, *answers) if zero_shot else None
        overrides = caller_settings(None if backbone is None else str(backbone), trust_remote_code, settings)
        return cls(load_reranker(path, judge=judge, backbone=overrides, module=module_args(settings)).to(device))

    @property
    def zero_shot(self) -> bool:
        """Whether this reranker asks a zero-shot judge question (pointwise only)."""
        return self.module.collator().judge is not None

    @torch.no_grad()
    def score(
        self,
        query: RerankInput,
        candidates: Sequence[RerankInput],
        instruction: str | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """[len(candidates)] float32 pointwise scores: P(Yes) of LamRA-Rank's prompt for each (query, candidate),
        or P(True) of the zero-shot judge's question; what `lamra-pl rerank --mode pointwise` writes."""
        _at_least_one(batch_size=batch_size)
        q = _rerank_item("query", query, instruction)
        items = [_rerank_item(f"candidates[{i}]", c) for i, c in enumerate(_candidates(candidates))]
        collator = self.module.collator()
        scores = []
        with _progress(len(items), batch_size, show_progress_bar, "score") as bar:
            for s in range(0, len(items), batch_size):
                pairs = [(q, c) for c in items[s : s + batch_size]]
                inputs = collator.pointwise_inputs(pairs).to(self.module.device)
                scores.append(self.module.score_pointwise(inputs).float().cpu().numpy())
                bar.update(len(pairs))
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    @torch.no_grad()
    def rank(
        self,
        query: RerankInput,
        candidates: Sequence[RerankInput],
        top_k: int | None = None,
        mode: Mode = "pointwise",
        instruction: str | None = None,
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
    ) -> list[Ranked]:
        """The candidates best first (the top_k of them; all by default), equal scores in the order given.
        pointwise: by `score`. listwise: one prompt numbering the candidates (at most 9), each scored by the
        probability that its number is the answer, as `lamra-pl rerank --mode listwise`."""
        if top_k is not None:
            _at_least_one(top_k=top_k)
        if mode == "pointwise":
            scores = self.score(query, candidates, instruction, batch_size, show_progress_bar)
        elif mode == "listwise":
            if self.zero_shot:
                raise LamraError("zero-shot reranking asks one candidate at a time: use mode='pointwise'")
            items = [_rerank_item(f"candidates[{i}]", c) for i, c in enumerate(_candidates(candidates))]
            if not 1 <= len(items) <= MAX_LIST:
                raise LamraError(
                    f"listwise reranking numbers candidates (1)..({MAX_LIST}): {len(items)} candidates given"
                )
            inputs = self.module.collator().listwise_inputs([(_rerank_item("query", query, instruction), items)])
            scores = self.module.score_listwise(inputs.to(self.module.device), [len(items)])[0].float().cpu().numpy()
        else:
            raise LamraError(f"mode must be 'pointwise' or 'listwise', got {mode!r}")
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:top_k]
        return [Ranked(rank, i, float(scores[i])) for rank, i in enumerate(order, start=1)]


# ------------------------------------------------------------------------------------------------ inputs
def _at_least_one(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise LamraError(f"{name} must be a whole number >= 1, got {value!r}")


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _inputs(
    texts: str | Sequence[str | None] | None, images: ImageInput | Sequence[ImageInput | None] | None
) -> list[tuple[str | None, ImageInput | None]]:
    """(text, image) pairs of parallel lists (a single text or image is a list of one); each has one or both."""
    texts = [texts] if isinstance(texts, str) else texts
    images = [images] if isinstance(images, VISUAL) else images
    n = len(texts) if texts is not None else len(images) if images is not None else 0
    text_list = list(texts) if texts is not None else [None] * n
    image_list = list(images) if images is not None else [None] * n
    if len(text_list) != len(image_list) or n == 0:
        raise LamraError(
            f"give texts, images, or both as lists of the same length (at least one input); got {len(text_list)} "
            f"texts and {len(image_list)} images"
        )
    for i, (text, image) in enumerate(zip(text_list, image_list, strict=True)):
        if text is None and image is None:
            raise LamraError(f"input {i} has neither text nor image")
        if text is not None and not isinstance(text, str):
            raise LamraError(f"input {i}: its text is a {type(text).__name__}, not a str")
        if image is not None and not isinstance(image, VISUAL):
            raise LamraError(
                f"input {i}: its image is a {type(image).__name__}, not a PIL image, a file path, a Video or "
                "Interleaved"
            )
        if isinstance(image, Interleaved) and text is not None:
            raise LamraError(f"input {i}: an Interleaved input holds its texts among its parts, give no text beside it")
    return list(zip(text_list, image_list, strict=True))


def _item(text: str | None, image: ImageInput | None, id_: str = "", instruction: str | None = None) -> Item:
    if isinstance(image, Interleaved):  # its instruction, if any, is its text: the parts follow it
        return replace(instructed_item(id_, instruction, text), parts=image.read())
    if isinstance(image, Video):
        frames, fps = image.read()
        item = instructed_item(id_, instruction, text, source=image.name())
        return replace(item, video=frames, video_fps=fps)
    return instructed_item(id_, instruction, text, None if image is None else _image(image))


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


def _item_row(did: str, text: str | None, image: ImageInput | None) -> dict[str, Any]:
    """A `build_index` candidate's items.jsonl row: a video under "vid" (its modality is read from that field)."""
    if isinstance(image, Video):
        return {"id": did, "txt": text, "img": None, "vid": image.name()}
    return {"id": did, "txt": text, "img": _image_name(image)}


def _image_name(image: ImageInput | None) -> str | None:
    """How an index's items.jsonl names an image given to `build_index`: its path, else its file name, else a
    placeholder (the row is still an image: its modality is read from this field)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "<PIL image>"
    return str(image)


def _check_ids(ids: list[str], n: int) -> None:
    if len(ids) != n:
        raise LamraError(f"build_index got {len(ids)} ids for {n} candidates")
    for i, did in enumerate(ids):
        if not isinstance(did, str) or not did or did != "".join(did.split()):
            raise LamraError(f"ids[{i}] is {did!r}: an id is a non-empty str without white space (run files split)")
    seen: set[str] = set()
    for did in ids:
        if did in seen:
            raise LamraError(f"the id {did!r} is given twice: every candidate needs its own id")
        seen.add(did)


def _describe(name: str, ids: list[str], inputs: list[tuple[str | None, ImageInput | None]]) -> list[Any]:
    """A chunk of `build_index`'s candidates as an index's inputs record a shard: [name, size in bytes, digest] of
    its ids, texts and images (a file by its name, size and the digest of its ends, as a shard; a PIL image by its
    pixels), so a resume or a re-run sees whether the candidates are the same."""
    digest, size = hashlib.sha256(), 0
    for did, (text, image) in zip(ids, inputs, strict=True):
        picture: Any = None
        if isinstance(image, Interleaved):  # (checked here, before anything is encoded)
            raise LamraError(
                f"candidate {did}: build_index takes texts, images and videos (an Interleaved input is a query)"
            )
        if isinstance(image, Video):
            frames, fps = image.read()
            pixels = b"".join(f.tobytes() for f in frames)
            picture = ["video", fps, [f.size for f in frames], hashlib.sha256(pixels).hexdigest()[:16]]
            size += len(pixels)
        elif isinstance(image, Image.Image):
            pixels = image.tobytes()
            picture = [image.mode, image.size, hashlib.sha256(pixels).hexdigest()[:16]]
            size += len(pixels)
        elif image is not None:
            if not Path(image).is_file():
                raise LamraError(f"image file {str(image)!r} does not exist")
            picture = shard_fingerprint(str(image), Path(image).parent)
            size += picture[1]
        entry = json.dumps([did, text, picture]).encode()
        digest.update(entry)
        size += len(entry)
    return [name, size, digest.hexdigest()[:16]]


def _rerank_item(where: str, value: RerankInput, instruction: str | None = None) -> Item:
    """A reranker's query or candidate as an Item: a str is a text, a PIL image or a Path an image, a `Video` a
    video, a mapping {"text", "image"} either or both (its image may be a `Video`); `instruction` prepended to the
    text (`with_instruction`)."""
    if isinstance(value, str):
        text, image = value, None
    elif isinstance(value, (Image.Image, Path, Video, Interleaved)):
        text, image = None, value
    elif isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - {"text", "image"})
        if unknown:
            raise LamraError(f"{where} has the keys {unknown}: a query or candidate mapping has 'text' and 'image'")
        text, image = value.get("text"), value.get("image")
        if text is not None and not isinstance(text, str):
            raise LamraError(f"{where}: its text is a {type(text).__name__}, not a str")
        if image is not None and not isinstance(image, VISUAL):
            raise LamraError(f"{where}: its image is a {type(image).__name__}, not a PIL image, a file path or a Video")
        if isinstance(image, Interleaved) and text is not None:
            raise LamraError(f"{where}: an Interleaved input holds its texts among its parts, give no text beside it")
    else:
        raise LamraError(
            f"{where} is a {type(value).__name__}: give a text (str), an image (PIL image or pathlib.Path), a Video "
            "or {'text': ..., 'image': ...}"
        )
    if text is None and image is None:
        raise LamraError(f"{where} has neither text nor image")
    return _item(with_instruction(instruction, text) if instruction else text, image)


def _candidates(candidates: Sequence[RerankInput]) -> Sequence[RerankInput]:
    if isinstance(candidates, (*VISUAL, Mapping)) or len(candidates) == 0:
        raise LamraError("candidates is a list of at least one text, image or {'text', 'image'} mapping")
    return candidates


def _progress(total: int, batch_size: int, show: bool | None, what: str) -> Any:
    """A progress report (count and rate: a bar on a terminal, lines in a log, `lamra_pl.progress`) over `total`
    inputs; `show` None shows it when they span several batches."""
    return progress(total=total, desc=what, unit="inputs", disable=not (total > batch_size if show is None else show))


def search(
    model: str,
    index: str,
    text: str | None = None,
    image: str | None = None,
    video: str | None = None,
    k: int = 10,
    instruction: str | None = None,
    backend: Backend = "auto",
    backbone: str | None = None,
    trust_remote_code: bool = False,
    settings: ModelSettings | None = None,
) -> list[Hit]:
    """Search an index for a text, an image or a video (or text with either), and print the ranked candidates.

    Args:
        model: the checkpoint that built the index.
        index: an index folder written by `lamra-pl index`.
        text: the query text.
        image: the query image file.
        video: the query video: a video file (MP4, AVI, ...) or a folder of its frames (image files, in name
            order); the model samples it to its frame budget.
        k: results to print.
        instruction: a task instruction prepended to the query text (e.g. "Find the emoji image with this name.");
            left out for a model trained without instructions, as `lamra-pl retrieve` does.
        backend: faiss, torch or auto.
        backbone: the backbone folder of a checkpoint whose backbone is no longer where it says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
        settings: how the model reads its inputs (`--settings.rope 1d`, `--settings.max_pixels N`, ...): for a
            folder without lamra-pl's settings file, or to change what the model records. `--settings.dim D`:
            the Matryoshka dimension the index was built at.
    """
    if text is None and image is None and video is None:
        raise LamraError("give --text, --image or --video (and --text with either)")
    if image is not None and video is not None:
        raise LamraError("give --image or --video, not both: a query holds one image or one video")
    retriever = Retriever.from_checkpoint(
        model, backbone=backbone, trust_remote_code=trust_remote_code, settings=settings
    )
    visual = Video(video) if video is not None else image
    hits = retriever.search(index, query_text=text, query_image=visual, k=k, instruction=instruction, backend=backend)
    assert isinstance(hits, list)
    print(f"{'rank':>4}  {'score':>7}  {'id':<16} text | image or video")
    for hit in hits:
        assert isinstance(hit, Hit)
        print(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.id:<16} {hit.txt or ''} | {hit.img or hit.vid or ''}")
    return hits
