"""A shard sample: the record of one query with its candidates (training and evaluation shards), or one pool
candidate (pool shards); and the query an evaluation encodes from a record.

Layout version VERSION. One WebDataset sample is one query with its candidates. Its members share a key (no dots
in it):

* `<key>.json`, the record::

    {"qid": "9:17",                      # query id, unique in the data set
     "task_id": 0,                       # M-BEIR task id, or null
     "query": {"txt": "a dog", "img": null, "modality": "text"},   # items may carry "img_src": the image's
                                                                    # path in the original data set
     "instructions": ["Find an image that matches the caption."],   # choices; may be empty
     "positives": [{"id": "9:4410", "txt": null, "img": "pos0.jpg", "modality": "image"}],   # at least one
     "negatives": [{"id": "9:77", "txt": null, "img": "neg0.jpg", "modality": "image"}],    # optional
     "rerank": {...},                    # reranker samples only (`lamra-pl rerank-data`): see rerank_example
     "candidates": [{"id": "9:12", "txt": null, "img": "cand0.jpg", "modality": "image", "score": 0.93}]}
                                         # distillation samples only (`lamra-pl distill-data`, version 2): the
                                         # query's candidate list, best-ranked first (positives included, unlike
                                         # `negatives`), each with its teacher's score, a finite number

* one member per image, named by the record's `img` field (`<key>.query.png`, `<key>.pos0.jpg`, ...), holding
  the encoded image file as it was (never re-encoded).

* a video item (since version 2) has no `img` but `"vid": ["pos0.f000.jpg", "pos0.f001.jpg", ...]`, its frames in
  time order, one image member each (JPEG/PNG as stored), and optionally `"vid_fps"` (the frame rate the stored frames
  were taken at, for sampling by fps) and `"vid_src"` (the video's path in the original data set). A video is stored
  as decoded frames rather than a container file (MP4, AVI) so that reading it needs no video codec library; a
  converter decodes (and may thin) a set's videos once. Its modality is "video" or "video,text".

* the optional `candidates` field (since version 2; distillation samples, `lamra-pl distill-data`): the query's
  candidate list with the teacher's score of each.

* an interleaved item (since version 3: VIST's stories, multi-turn FashionIQ's sessions) has neither `txt` nor `img`
  but `"parts": [{"txt": "The family met."}, {"img": "query.p001.jpg", "img_src": "..."}, ...]`, its texts and
  images in reading order (at least one image; `img_src` optional), one image member each; its modality is
  "image,text" (or "image" when no part is a text). The model reads the parts in order, its instruction before them.

A pool candidate sample is `<key>.json` = {"id", "txt", "img", "modality"[, "img_src"]} (or "vid"[, "vid_fps",
"vid_src"] for a video) and its image or frame members.

`modality` is one of M-BEIR's "text", "image", "image,text", or "video", "video,text", and must agree with which of
`txt`/`img`/`vid`/`parts` is set; an item holds an image, a video or parts, not two of them. Version 1 shards (no
video) and version 2 shards (no parts) read unchanged.
Candidate ids are strings (M-BEIR's "dataset:n"); in-batch duplicates of a positive are masked by id.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from lamra_pl.errors import BadSampleError
from lamra_pl.formats.shards import expand_shards, read_samples

VERSION = 3  # 2: video items ("vid"), the optional `candidates` field; 3: interleaved items ("parts")
MODALITIES = ("text", "image", "image,text", "video", "video,text")
# The most frames a stored video may have: Qwen2-VL's processor's max_frames. A converter thins longer videos.
MAX_STORED_FRAMES = 768

# Reasons a training sample is skipped (counted, logged as `data/skipped_<reason>`, never silent). Fixed order: it
# indexes the count tensors (new reasons go last: checkpoints hold counts in this order). The `_shard` reasons count
# shards, the others samples (see lamra_pl.data.stream).
SKIP_REASONS = (
    "unreadable_image",
    "oversized_image",
    "bad_sample",
    "sample_error",
    "damaged_shard",
    "unreadable_shard",
    "empty_shard",
    "repeated_key",
)
# PIL's decompression-bomb bound: larger images are refused before they are decoded.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# The image formats PIL may open from data (a shard member, an M-BEIR image, a user's file): M-BEIR's and the
# demo's (JPEG, PNG), what web-crawled sets hold under those names, nothing else; PIL would otherwise open any format
# it knows (EPS among them, rendered by running Ghostscript on the file). Another format is an unreadable image.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass
class Item:
    """A query or candidate: text, an image or a video (its frames in time order), or text with either; or an
    interleaved item, `parts` (texts and images in reading order) after the optional `text` (its instruction)."""

    id: str
    text: str | None = None
    image: Image.Image | None = None
    source: str | None = None  # where the image or video came from (a path in the original data set), for display
    video: list[Image.Image] | None = None
    video_fps: float | None = None  # the frame rate of `video`'s frames, when known (sampling by fps needs it)
    # How many leading characters of `text` are a task instruction (`instructed_item`): what a pooling that leaves
    # the instruction out drops. 0: none.
    instruction_chars: int = 0
    parts: list[str | Image.Image] | None = None

    @property
    def modality(self) -> str:
        if self.parts is not None:
            return modality(self.text is not None or any(isinstance(p, str) for p in self.parts), True)
        return modality(self.text is not None, self.image is not None, self.video is not None)

    @property
    def images(self) -> list[Image.Image]:
        """The item's images in reading order: its image, or its parts' images."""
        if self.parts is not None:
            return [p for p in self.parts if not isinstance(p, str)]
        return [] if self.image is None else [self.image]


def modality(has_text: bool, has_image: bool, has_video: bool = False) -> str:
    """The modality name: M-BEIR's "text", "image" or "image,text", or "video", "video,text"."""
    visual = "video" if has_video else "image" if has_image else None
    if visual is None:
        return "text"
    return f"{visual},text" if has_text else visual


@dataclass
class Record:
    """A decoded shard sample: a query, its instruction choices, positives and hard negatives."""

    key: str
    qid: str
    query: Item
    positives: list[Item]
    negatives: list[Item] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    task_id: int | None = None
    rerank: dict[str, Any] | None = None  # reranker samples: lamra_pl.models.rerank_inputs.rerank_example
    candidates: list[Item] = field(default_factory=list)  # distillation samples: the query's list, best first
    teacher_scores: list[float] = field(default_factory=list)  # and the teacher's score of each, in that order


class UnreadableImage(Exception):
    def __init__(self, member: str, cause: Exception | str, oversized: bool = False) -> None:
        why = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(f"member {member!r} is not a readable image ({why})")
        self.member = member
        self.oversized = oversized


def format_text(text: str) -> str:
    """UniIR's `format_string`: strip, drop quotes and CRs, capitalise, end with punctuation."""
    text = text.replace("\r", "").strip().strip('"').strip()
    if text:
        text = text[0].upper() + text[1:]
        if text[-1] not in ".?!":
            text += "."
    return text


def with_instruction(instruction: str | None, text: str | None) -> str | None:
    """The query text the model sees: the task instruction prepended as LamRA/UniIR do."""
    if not instruction:
        return text
    return format_text(f"{instruction} {text or ''}")


def instruction_chars(instruction: str | None, text: str | None) -> int:
    """How many leading characters of `with_instruction(instruction, text)` are the instruction's: its text as
    `format_text` leaves it at the head (capitalised); all of it when there is no text after it."""
    if not instruction:
        return 0
    full = with_instruction(instruction, text) or ""
    body = instruction.replace("\r", "").lstrip().lstrip('"').lstrip().rstrip()
    if not body:
        return 0
    body = body[0].upper() + body[1:]
    if not full.startswith(body):  # quotes or whitespace format_text strips differently: no clear boundary
        return 0
    # Nothing of the text left after it (an image query's instruction-only text): all of it is the instruction.
    return len(full) if not full[len(body) :].strip(' ."?!') else len(body)


def instructed_item(
    id_: str, instruction: str | None, text: str | None, image: Image.Image | None = None, source: str | None = None
) -> Item:
    """The query Item the model sees: `instruction` prepended to `text` (`with_instruction`), its characters
    counted (`Item.instruction_chars`)."""
    return Item(
        id_, with_instruction(instruction, text), image, source, instruction_chars=instruction_chars(instruction, text)
    )


def evaluation_query(record: Record, instruction_seed: int | None = None, instructions: bool = True) -> Item:
    """The query an evaluation encodes, with its instruction chosen deterministically.

    `instruction_seed=None`: the task's first instruction (MM-Embed's fixed prompt). An int: one instruction drawn
    by a generator seeded with (seed, qid), so the choice depends on neither the order nor the rank that reads it.
    `instructions=False`: no instruction (a model trained without them).
    """
    instruction = None
    if record.instructions and instructions:
        if instruction_seed is None:
            instruction = record.instructions[0]
        else:
            instruction = random.Random(f"{instruction_seed}:{record.qid}").choice(record.instructions)
    q = record.query
    return replace(
        q,
        id=record.qid,
        text=with_instruction(instruction, q.text),
        instruction_chars=instruction_chars(instruction, q.text),
    )


def encode_record(
    key: str,
    *,
    qid: str,
    query: dict[str, Any],
    positives: list[dict[str, Any]],
    negatives: list[dict[str, Any]] = (),  # type: ignore[assignment]
    instructions: list[str] = (),  # type: ignore[assignment]
    task_id: int | None = None,
    extra: dict[str, Any] | None = None,
    candidates: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """A WebDataset sample dict from a record whose items carry `txt` and `image` (encoded bytes + extension).

    Each item is `{"id", "txt", "image": (bytes, "jpg") | None}`, or for a video `{"id", "txt", "video": [(bytes,
    "jpg"), ...], "fps": float | None, "vid_src": str | None}` (its frames, encoded, in time order), or for an
    interleaved item `{"id", "txt": None, "parts": [{"txt": str} | {"image": (bytes, "jpg"), "img_src": str |
    None}, ...]}`; the query needs no id. `extra` adds fields to the record (e.g. "rerank"). `candidates`
    (distillation samples) are items with a "score" each: the record's candidate list, in order; none: the record
    has no list.
    """
    if "." in key:
        raise BadSampleError(f"sample key {key!r} contains a dot; WebDataset splits keys at the first dot")
    if not positives:
        raise BadSampleError(f"sample {key!r} (qid {qid}) has no positive candidate")
    sample: dict[str, Any] = {"__key__": key}

    def item(entry: dict[str, Any], member: str, with_id: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"txt": entry.get("txt"), "img": None}
        if with_id:
            out["id"] = str(entry["id"])
        image = entry.get("image")
        if image is not None:
            data, ext = image
            out["img"] = f"{member}.{ext}"
            sample[out["img"]] = data
            if entry.get("img_src"):
                out["img_src"] = entry["img_src"]
        if entry.get("video") is not None:
            video_fields(sample, out, member, entry)
        if entry.get("parts") is not None:
            parts_fields(sample, out, member, entry["parts"])
        out["modality"] = modality_of(out["txt"], out["img"], out.get("vid"), out.get("parts"))
        return out

    record = {
        "qid": qid,
        "task_id": task_id,
        "query": item(query, "query", with_id=False),
        "instructions": list(instructions),
        "positives": [item(p, f"pos{i}", True) for i, p in enumerate(positives)],
        "negatives": [item(n, f"neg{i}", True) for i, n in enumerate(negatives)],
        **(extra or {}),
    }
    if candidates:
        record["candidates"] = [
            {**item(c, f"cand{i}", True), "score": float(c["score"])} for i, c in enumerate(candidates)
        ]
    sample["json"] = json.dumps(record, ensure_ascii=False).encode()
    return sample


def decode_record(sample: dict[str, Any], max_image_pixels: int | None = None) -> Record:
    """A Record from a raw WebDataset sample (bytes members). Raises BadSampleError or UnreadableImage (also for
    an image of more than `max_image_pixels`, default MAX_IMAGE_PIXELS, which is never decoded)."""
    where = sample_location(sample)
    record = _json_member(sample, where)
    for required in ("qid", "query", "positives"):
        if required not in record:
            raise BadSampleError(f"{where}: the record has no {required!r} field")
    if not record["positives"]:
        raise BadSampleError(f"{where}: qid {record['qid']} has no positive candidate ('positives' is empty)")

    def item(entry: dict[str, Any], default_id: str, field_name: str) -> Item:
        txt, img, vid, parts = entry.get("txt"), entry.get("img"), entry.get("vid"), entry.get("parts")
        if img is not None and vid is not None:
            raise BadSampleError(f"{where}: {field_name} has both an image and a video; an item holds one")
        if parts is not None and (txt, img, vid) != (None, None, None):
            raise BadSampleError(f"{where}: {field_name} mixes parts with a text, an image or a video beside them")
        modality = entry.get("modality", modality_of(txt, img, vid, parts))
        if modality not in MODALITIES:
            raise BadSampleError(f"{where}: {field_name} has unknown modality {modality!r}; use {MODALITIES}")
        if img is None and vid is None and parts is None and not (txt or "").strip():
            raise BadSampleError(f"{where}: {field_name} has an empty text and no image")
        if modality != modality_of(txt, img, vid, parts):
            visual = "a video" if vid is not None else "an image" if img else "parts" if parts else "no image"
            raise BadSampleError(
                f"{where}: {field_name} says modality {modality!r} but has "
                f"{'text' if txt is not None else 'no text'} and {visual}"
            )
        image = None
        if img is not None:
            if img not in sample:
                raise BadSampleError(f"{where}: {field_name} names image member {img!r}, which is missing")
            image = _open_image(sample[img], img, max_image_pixels)
        video, fps = _open_video(sample, entry, f"{where}: {field_name}", max_image_pixels)
        return Item(
            id=str(entry.get("id", default_id)),
            text=txt,
            image=image,
            source=image_source(sample, entry),
            video=video,
            video_fps=fps,
            parts=_open_parts(sample, entry, f"{where}: {field_name}", max_image_pixels),
        )

    qid = str(record["qid"])
    listed = record.get("candidates") or []
    return Record(
        key=str(sample.get("__key__")),
        qid=qid,
        query=item(record["query"], qid, "query"),
        positives=[item(p, "", f"positives[{i}]") for i, p in enumerate(record["positives"])],
        negatives=[item(n, "", f"negatives[{i}]") for i, n in enumerate(record.get("negatives") or [])],
        instructions=list(record.get("instructions") or []),
        task_id=record.get("task_id"),
        rerank=record.get("rerank"),
        candidates=[item(c, "", f"candidates[{i}]") for i, c in enumerate(listed)],
        teacher_scores=[_score(c, f"{where}: candidates[{i}]") for i, c in enumerate(listed)],
    )


def _score(entry: Any, where: str) -> float:
    """A list candidate's teacher score: a finite number (a bool, a string or NaN is a bad sample)."""
    value = entry.get("score") if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadSampleError(f"{where} has no finite teacher 'score' (got {value!r})")
    return float(value)


def sample_location(sample: dict[str, Any]) -> str:
    return f"shard {sample.get('__url__', '?')}, sample {sample.get('__key__', '?')!r}"


def _json_member(sample: dict[str, Any], where: str) -> dict[str, Any]:
    raw = sample.get("json")
    if raw is None:
        raise BadSampleError(f"{where}: no .json member (see lamra_pl.formats.sample for the sample layout)")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadSampleError(f"{where}: .json member is not valid JSON ({err})") from err


def modality_of(
    txt: str | None, img: str | None, vid: list[str] | None = None, parts: list[dict[str, Any]] | None = None
) -> str:
    if parts is not None:  # an interleaved item: its parts' texts and images (validated by `_open_parts`)
        has_text = any(isinstance(p, dict) and "txt" in p for p in parts) if isinstance(parts, list) else False
        return modality(has_text, True)
    if txt is None and img is None and vid is None:
        raise BadSampleError("an item has neither text nor image")
    return modality(txt is not None, img is not None, vid is not None)


def parts_fields(sample: dict[str, Any], out: dict[str, Any], member: str, parts: list[dict[str, Any]]) -> None:
    """Write an interleaved entry's parts into `sample` (each image as `<member>.pNNN.<ext>`) and the JSON item
    `out` ("parts"). `parts`: `{"txt": str}` or `{"image": (bytes, ext), "img_src": str | None}`, in order."""
    if not any(p.get("image") is not None for p in parts):
        raise BadSampleError(f"item {member!r}: an interleaved item needs at least one image among its parts")
    written: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        if part.get("image") is not None:
            data, ext = part["image"]
            name = f"{member}.p{j:03d}.{ext}"
            sample[name] = data
            written.append({"img": name, **({"img_src": part["img_src"]} if part.get("img_src") else {})})
        elif isinstance(part.get("txt"), str) and part["txt"].strip():
            written.append({"txt": part["txt"]})
        else:
            raise BadSampleError(f"item {member!r}: part {j} is neither a non-empty text nor an image")
    out["parts"] = written


def _open_parts(
    sample: dict[str, Any], entry: dict[str, Any], where: str, max_pixels: int | None = None
) -> list[str | Image.Image] | None:
    """An interleaved item's parts, texts as they are and images decoded (RGB); None for an item without parts."""
    parts = entry.get("parts")
    if parts is None:
        return None
    if not isinstance(parts, list) or not parts:
        raise BadSampleError(f"{where}: 'parts' must be a non-empty list of {{'txt': ...}} or {{'img': ...}}")
    out: list[str | Image.Image] = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or ("txt" in part) == ("img" in part):
            raise BadSampleError(f"{where}: parts[{j}] must have exactly one of 'txt' and 'img'")
        if "txt" in part:
            if not isinstance(part["txt"], str) or not part["txt"].strip():
                raise BadSampleError(f"{where}: parts[{j}] has an empty or non-string 'txt'")
            out.append(part["txt"])
            continue
        name = part["img"]
        if not isinstance(name, str) or name not in sample:
            raise BadSampleError(f"{where}: parts[{j}] names image member {name!r}, which is missing")
        out.append(_open_image(sample[name], name, max_pixels))
    if all(isinstance(p, str) for p in out):
        raise BadSampleError(f"{where}: an interleaved item needs at least one image among its parts")
    return out


def video_fields(sample: dict[str, Any], out: dict[str, Any], member: str, entry: dict[str, Any]) -> None:
    """Write a video entry's frames into `sample` as `<member>.fNNN.<ext>` and its fields into the JSON item `out`.

    `entry["video"]` is a list of (bytes, extension) frames in time order; `entry["fps"]` their frame rate or None;
    `entry["vid_src"]` the video's original path or None."""
    frames = list(entry["video"])
    if not frames:
        raise BadSampleError(f"item {member!r}: a video needs at least one frame")
    if len(frames) > MAX_STORED_FRAMES:
        raise BadSampleError(f"item {member!r}: {len(frames)} frames, over {MAX_STORED_FRAMES}; thin the video first")
    names = []
    for j, (data, ext) in enumerate(frames):
        names.append(f"{member}.f{j:03d}.{ext}")
        sample[names[-1]] = data
    out["vid"] = names
    if entry.get("fps") is not None:
        out["vid_fps"] = float(entry["fps"])
    if entry.get("vid_src"):
        out["vid_src"] = entry["vid_src"]


def _open_video(
    sample: dict[str, Any], entry: dict[str, Any], where: str, max_pixels: int | None = None
) -> tuple[list[Image.Image] | None, float | None]:
    """An item's video frames (decoded, RGB) and frame rate; (None, None) for an item without a video."""
    vid = entry.get("vid")
    if vid is None:
        return None, None
    if not isinstance(vid, list) or not vid or not all(isinstance(name, str) for name in vid):
        raise BadSampleError(f"{where}: 'vid' must be a non-empty list of frame member names")
    if len(vid) > MAX_STORED_FRAMES:
        raise BadSampleError(f"{where}: the video has {len(vid)} frames, over {MAX_STORED_FRAMES}")
    fps = entry.get("vid_fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise BadSampleError(f"{where}: 'vid_fps' must be a positive number, not {fps!r}")
    missing = [name for name in vid if name not in sample]
    if missing:
        raise BadSampleError(f"{where}: names video frame member {missing[0]!r}, which is missing")
    return [_open_image(sample[name], name, max_pixels) for name in vid], None if fps is None else float(fps)


def _open_image(data: bytes, member: str, max_pixels: int | None = None) -> Image.Image:
    limit = max_pixels or MAX_IMAGE_PIXELS
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        if image.width * image.height > limit:
            raise UnreadableImage(member, f"{image.width}x{image.height} is over {limit} pixels", oversized=True)
        image.load()
        return image.convert("RGB")
    except UnreadableImage:
        raise
    except Exception as err:  # PIL raises many types for corrupt files
        raise UnreadableImage(member, err) from err


def encode_candidate(
    key: str,
    *,
    id: str,
    txt: str | None,
    image: tuple[bytes, str] | None,
    img_src: str | None = None,
    video: list[tuple[bytes, str]] | None = None,
    fps: float | None = None,
    vid_src: str | None = None,
) -> dict[str, Any]:
    """A candidate-pool sample: `<key>.json` = {"id", "txt", "img", "modality"[, "img_src"]} and the image member;
    a video candidate (`video`: its encoded frames in time order) has "vid" (and "vid_fps", "vid_src") instead."""
    if image is not None and video is not None:
        raise BadSampleError(f"candidate {id!r}: an item holds an image or a video, not both")
    sample: dict[str, Any] = {"__key__": key}
    img = None
    if image is not None:
        img = f"img.{image[1]}"
        sample[img] = image[0]
    record: dict[str, Any] = {"id": id, "txt": txt, "img": img}
    if video is not None:
        video_fields(sample, record, "vid", {"video": video, "fps": fps, "vid_src": vid_src})
    record["modality"] = modality_of(txt, img, record.get("vid"))
    if img is not None and img_src:
        record["img_src"] = img_src
    sample["json"] = json.dumps(record, ensure_ascii=False).encode()
    return sample


def decode_candidate(sample: dict[str, Any]) -> Item:
    record = _json_member(sample, sample_location(sample))
    img = record.get("img")
    if img is not None and img not in sample:
        raise BadSampleError(f"{sample_location(sample)}: names image member {img!r}, which is missing")
    image = _open_image(sample[img], img) if img else None
    video, fps = _open_video(sample, record, sample_location(sample))
    source = image_source(sample, record)
    if record.get("parts") is not None and (record.get("txt"), img, record.get("vid")) != (None, None, None):
        raise BadSampleError(f"{sample_location(sample)}: parts with a text, an image or a video beside them")
    parts = _open_parts(sample, record, sample_location(sample))
    text = record.get("txt")
    return Item(id=str(record["id"]), text=text, image=image, source=source, video=video, video_fps=fps, parts=parts)


def member_image(sample: dict[str, Any], img: str | None, where: str) -> tuple[bytes, str] | None:
    """An item's image as stored, (bytes, extension), from the sample member `img` names (never re-encoded)."""
    if img is None:
        return None
    if img not in sample:
        raise BadSampleError(f"{where}: names image member {img!r}, which is missing")
    return sample[img], img.rsplit(".", 1)[-1]


def image_source(sample: dict[str, Any], entry: dict[str, Any]) -> str | None:
    """Where an item's image (or video) came from: its `img_src` (`vid_src`), else the shard member
    (`shard.tar#key.member`; a video's first frame)."""
    if entry.get("vid"):
        return entry.get("vid_src") or f"{sample.get('__url__', '?')}#{sample.get('__key__')}.{entry['vid'][0]}"
    if isinstance(entry.get("parts"), list):  # an interleaved item: its first image's
        first = next((p for p in entry["parts"] if isinstance(p, dict) and isinstance(p.get("img"), str)), None)
        if first is not None:
            return first.get("img_src") or f"{sample.get('__url__', '?')}#{sample.get('__key__')}.{first['img']}"
    if not entry.get("img"):
        return None
    return entry.get("img_src") or f"{sample.get('__url__', '?')}#{sample.get('__key__')}.{entry['img']}"


def member_item(sample: dict[str, Any], entry: dict[str, Any], where: str) -> dict[str, Any]:
    """An item of a query record as `encode_record` takes it, its image (or video frame) bytes taken from the sample
    as they are."""
    image = member_image(sample, entry.get("img"), where)
    out = {"id": str(entry.get("id", "")), "txt": entry.get("txt"), "image": image, "img_src": entry.get("img_src")}
    if entry.get("vid"):
        out["video"] = [member_image(sample, name, where) for name in entry["vid"]]
        out["fps"], out["vid_src"] = entry.get("vid_fps"), entry.get("vid_src")
    if isinstance(entry.get("parts"), list):
        out["parts"] = []
        for j, p in enumerate(entry["parts"]):
            if not isinstance(p, dict) or not isinstance(p.get("img", p.get("txt")), str):
                raise BadSampleError(f"{where}: parts[{j}] must be {{'txt': text}} or {{'img': member name}}")
            image = member_image(sample, p["img"], where) if "img" in p else None
            out["parts"].append({"image": image, "img_src": p.get("img_src")} if image else {"txt": p["txt"]})
    return out


def query_samples(queries: str | Path) -> Iterator[tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]]:
    """(raw sample, its JSON record, its positives as `encode_record` takes them) for each query sample of a shard
    folder, for tools that rewrite records (`rerank-data`, `mine`) without decoding their images."""
    for sample in read_samples(expand_shards(str(queries))):
        where = sample_location(sample)
        try:
            record = json.loads(sample["json"])
            if "qid" not in record:
                raise KeyError("qid")
            positives = [member_item(sample, p, where) for p in record["positives"]]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise BadSampleError(f"{where}: not a query record ({err!r})") from None
        yield sample, record, positives


def rewritten_record(
    sample: dict[str, Any],
    record: dict[str, Any],
    *,
    positives: list[dict[str, Any]],
    negatives: list[dict[str, Any]],
    instructions: list[str] | None = None,
    candidates: list[dict[str, Any]] = (),  # type: ignore[assignment]
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A query record of `query_samples` written again by a tool (`mine`, `rerank-data`, `distill-data`): its key,
    qid, task id and query as they were (the query's image bytes as stored), its instructions unless given, and
    the tool's positives, negatives, candidate list and extra fields (`encode_record`'s)."""
    where = sample_location(sample)
    return encode_record(
        sample["__key__"],
        qid=str(record["qid"]),
        task_id=record.get("task_id"),
        query=member_item(sample, record["query"], where),
        instructions=record.get("instructions") or [] if instructions is None else instructions,
        positives=positives,
        negatives=negatives,
        candidates=candidates,
        extra=extra,
    )
