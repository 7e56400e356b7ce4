"""What every zero-shot set's reader returns, and the M-BEIR layout it is written as (for `recipes.mbeir`).

A set's reader (`karpathy`, `long_captions`, `circo`, `genecis`) turns the set's published annotation files into a
`Layout`: the candidates (M-BEIR pool rows), and per task its queries (M-BEIR query rows), its pool, its instruction
and its metrics. `write_mbeir` writes that as an M-BEIR folder (query/, cand_pool/, instructions/, and `images`, a
link to the user's image folder) that `recipes.mbeir.run_conversion` converts with every check of convert-mbeir
(image paths inside the image folder, images decodable, ids, duplicates), counting each skip by reason.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.recipes.mbeir import Problems, json_type

IMAGES = "images"  # the link, inside the M-BEIR folder, to the user's image folder: image paths are "images/<rel>"
# LamRA's instructions of its zero-shot evaluation (its dataset/datasets_*.py loaders).
I2T = "Find an image caption describing the following everyday image."
CHANGES = "I'm looking for a similar everyday image with the described changes."
SAME_ATTRIBUTES = "I'm looking for an image with the same attributes as described."


@dataclass
class Task:
    """One evaluation task of a set, in M-BEIR terms."""

    task_id: int  # M-BEIR's task id: 0 text -> image, 3 image -> text, 7 image+text -> image
    query_modality: str
    cand_modality: str
    instruction: str | None  # None: the query is encoded bare, as LamRA does (its t2i captions)
    metrics: list[str]  # beyond nothing: the task.json metric spec (lamra_pl.formats.task)
    reported: str
    queries: list[dict[str, Any]] = field(default_factory=list)  # M-BEIR query rows
    pool: list[str] = field(default_factory=list)  # candidate ids, in order
    galleries: dict[str, list[str]] | None = None  # qid -> its own gallery (GeneCIS)
    excluded: dict[str, list[str]] | None = None  # qid -> candidates its ranking leaves out (VIST's seen images)


@dataclass
class Layout:
    """A set read from its published files: the dataset name (the task folders' prefix), the split, the candidates
    and the tasks; what was read, kept and skipped."""

    dataset: str
    split: str
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # did -> M-BEIR pool row
    tasks: list[Task] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # annotation files read (relative to the set's root)
    read: dict[str, int] = field(default_factory=dict)  # entries read per kind (images, captions, queries)
    skipped: dict[str, int] = field(default_factory=dict)  # entries not used, per reason (problems and by design)

    def count(self, kind: str, n: int = 1) -> None:
        self.read[kind] = self.read.get(kind, 0) + n

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def image(self, did: str, rel: str, txt: str | None = None) -> str:
        """Add an image candidate (with a text: an image+text one) and return its id."""
        row = {"did": did, "txt": txt, "img_path": f"{IMAGES}/{rel}", "modality": "image,text" if txt else "image"}
        self.candidates.setdefault(did, row)
        return did

    def video(self, did: str, rel: str, txt: str | None = None) -> str:
        """Add a video candidate (the video file `rel` under the video folder; with a text: video+text)."""
        row = {"did": did, "txt": txt, "img_path": None, "vid_path": f"{IMAGES}/{rel}"}
        self.candidates.setdefault(did, {**row, "modality": "video,text" if txt else "video"})
        return did

    def text(self, did: str, txt: str) -> str:
        self.candidates.setdefault(did, {"did": did, "txt": txt, "img_path": None, "modality": "text"})
        return did


def query(qid: str, txt: str | None, rel: str | None, positives: list[str], task_id: int) -> dict[str, Any]:
    """An M-BEIR query row (image path `rel` under the image folder)."""
    modality = "image,text" if txt and rel else ("image" if rel else "text")
    return {
        "qid": qid,
        "query_txt": txt,
        "query_img_path": f"{IMAGES}/{rel}" if rel else None,
        "query_modality": modality,
        "pos_cand_list": positives,
        "neg_cand_list": [],
        "task_id": task_id,
    }


def interleaved_query(qid: str, parts: list[tuple[str, str]], positives: list[str], task_id: int) -> dict[str, Any]:
    """An M-BEIR query row whose query is texts and images in reading order ("query_parts"; `parts`: ("txt",
    text) or ("img", path under the image folder)); empty texts are left out (they render as nothing)."""
    rows = [{"txt": v} if kind == "txt" else {"img_path": f"{IMAGES}/{v}"} for kind, v in parts if v.strip()]
    return {
        **query(qid, None, None, positives, task_id),
        "query_parts": rows,
        "query_modality": "image,text" if any("txt" in r for r in rows) else "image",
    }


def video_query(qid: str, txt: str | None, rel: str, positives: list[str], task_id: int) -> dict[str, Any]:
    """An M-BEIR query row whose visual part is the video file `rel` under the video folder ("query_vid_path")."""
    return {
        **query(qid, txt, None, positives, task_id),
        "query_vid_path": f"{IMAGES}/{rel}",
        "query_modality": "video,text" if txt else "video",
    }


def read_json(path: Path, expected: type, what: str) -> Any:
    """A set's annotation file: refused with one line when it is missing, not JSON or not of the expected type."""
    if not path.is_file():
        raise LamraError(f"{path} does not exist: {what}")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise LamraError(f"{path} is not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(data, expected):
        name = "a list" if expected is list else "an object"
        raise LamraError(f"{path}: expected {name} at the top level, found {json_type(data)} ({what})")
    return data


def entry_problem(problems: Problems, layout: Layout, path: Path, number: int, detail: str) -> None:
    """An annotation entry that cannot be used: counted (`malformed_entry`) and logged, or the run stops (--strict).
    `number` is the entry's position in the file (1-based; JSON files have no useful line numbers)."""
    problems("malformed_entry", path, number, detail)
    layout.skip("malformed_entry")


def write_mbeir(layouts: list[Layout], folder: Path, images: Path) -> None:
    """The layouts as one M-BEIR folder at `folder` (rewritten from scratch), its `images` a link to `images`."""
    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)
    (folder / "instructions").mkdir(parents=True)
    os.symlink(os.path.realpath(images), folder / IMAGES, target_is_directory=True)
    head = "query_modality\tcand_modality\tdataset\tdataset_id\tprompt_1"
    rows = [
        f"{t.query_modality}\t{t.cand_modality}\t{layout.dataset}\t{layout.dataset}\t{t.instruction or ''}"
        for layout in layouts
        for t in layout.tasks
    ]
    atomic_write(folder / "instructions" / "query_instructions.tsv", "\n".join([head, *rows]) + "\n")
    for layout in layouts:
        for t in layout.tasks:
            name = f"mbeir_{layout.dataset}_task{t.task_id}_{layout.split}"
            lines = (json.dumps(q, ensure_ascii=False) for q in t.queries)
            atomic_write(folder / "query" / layout.split / f"{name}.jsonl", "".join(f"{line}\n" for line in lines))
            pool = (json.dumps(layout.candidates[did], ensure_ascii=False) for did in t.pool)
            atomic_write(folder / "cand_pool" / "local" / f"{name}_cand_pool.jsonl", "".join(f"{c}\n" for c in pool))
