"""MSR-VTT (1k-A test) and MSVD (test), text <-> video, from the files LamRA's loaders read.

MSR-VTT, as LamRA's `scripts/eval/eval_msrvtt.sh` lays it out (the CSV from CLIP4Clip's `msrvtt_data.zip`, the
videos from MSR-VTT's own release, `MSRVTT/videos/all/`)::

    <root>/annotations/MSRVTT_JSFUSION_test.csv   header `key,vid_key,video_id,sentence`, 1000 rows:
                                                  `ret0,msr7579,video7579,a girl wearing red top ...`
    <root>/videos/<video_id>.mp4

LamRA's `MSRVTTDataset` reads `video_id` and `sentence` (pandas, the header row named); row i's caption belongs to
row i's video (1k-A: one caption per video). MSVD, as `scripts/eval/eval_msvd.sh` lays it out (CLIP4Clip's
`msvd_data.zip`, the videos from `YouTubeClips.tar`)::

    <root>/test_list.txt        one video id per line (670): `-4wsuPCjDBc_5_15`
    <root>/raw-captions.pkl     a pickled dict {video id: [[token, ...], ...]} (every video's captions, tokenised)
    <root>/YouTubeClips/<video id>.avi

LamRA's `MSVDDataset` takes the videos of `test_list.txt` in order and, per video, each of its captions in order
(`' '.join(tokens)`), the caption's ground truth being that video. The pickle is read as data only: a pickle that
names any class or function (the only way a pickle runs code) is refused before anything of it is built.

Tasks (`<set>_task0`, `<set>_task3`: M-BEIR's ids of text -> visual and visual -> text; M-BEIR has no video task):

* text -> video (what LamRA reports): the caption with LamRA's instruction "Find an everyday video match with
  caption." (its loaders prepend it to the text, `formats.sample.with_instruction` does here); the pool is the
  split's videos, embedded bare ("Summarize above video in one word:").
* video -> text (not in LamRA's table): the video, bare; the pool is the split's captions, bare.

Metrics: R@1/5/10 (hit rate, LamRA's `recall_at_k(...) > 0`); reported R@1. LamRA's frame budget: MSR-VTT is read
at 2 frames per second (qwen-vl-utils' default; `--settings.video_fps=2 --settings.video_max_frames=768`), MSVD at
12 frames spread evenly (`nframes` 12, this project's default). The converter stores about 2 frames per second
(`formats.video_file`); the model samples its budget from those.
"""

from __future__ import annotations

import csv
import io
import pickle
from pathlib import Path
from typing import Any

from lamra_pl.errors import LamraError
from lamra_pl.recipes.mbeir import Problems
from lamra_pl.recipes.zeroshot.layout import Layout, Task, entry_problem, query, video_query

T2V = "Find an everyday video match with caption."  # LamRA's MSRVTTDataset / MSVDDataset text instruction
METRICS, REPORTED = ["R@1", "R@5", "R@10"], "R@1"
MSRVTT_CSV = "annotations/MSRVTT_JSFUSION_test.csv"
MSVD_CAPTIONS = "raw-captions.pkl"


def tasks() -> tuple[Task, Task]:
    return Task(0, "text", "video", T2V, METRICS, REPORTED), Task(3, "video", "text", None, METRICS, REPORTED)


def plain_id(value: Any) -> bool:
    """A video id usable in candidate ids and file names: a non-empty string without white space."""
    return isinstance(value, str) and bool(value) and value == "".join(value.split())


def read_msrvtt(root: Path, split: str, problems: Problems) -> Layout:
    if split != "test":
        raise LamraError(f"msrvtt: only the 1k-A test split ({MSRVTT_CSV}) is converted, not {split!r}")
    path = root / MSRVTT_CSV
    if not path.is_file():
        raise LamraError(f"{path} does not exist: MSR-VTT's 1k-A test captions (CLIP4Clip's msrvtt_data.zip)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LamraError(f"{path} is not UTF-8 text (byte {err.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("video_id", "sentence") if c not in (reader.fieldnames or [])]
    if missing:
        raise LamraError(f"{path}: no {missing[0]!r} column (expected the header key,vid_key,video_id,sentence)")
    layout = Layout("msrvtt", split, inputs=[MSRVTT_CSV])
    t2v, v2t = tasks()
    by_video: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(reader):
        layout.count("captions")
        video_id, sentence = row.get("video_id"), (row.get("sentence") or "").strip()
        if not plain_id(video_id) or not sentence:
            entry_problem(problems, layout, path, n + 2, "a row needs a video_id (no spaces) and a sentence")
            continue
        did = layout.video(f"msrvtt:{video_id}", f"{video_id}.mp4")
        if did not in t2v.pool:
            t2v.pool.append(did)
        cap = layout.text(f"msrvtt:cap{n}", sentence)
        v2t.pool.append(cap)
        t2v.queries.append(query_row(f"msrvtt:t2v{n}", sentence, did))
        by_video.setdefault(video_id, {"did": did, "captions": []})["captions"].append(cap)
    layout.count("videos", len(by_video))
    v2t.queries = [video_query(f"msrvtt:v2t{v}", None, f"{v}.mp4", e["captions"], 3) for v, e in by_video.items()]
    layout.tasks = [t2v, v2t]
    return layout


def query_row(qid: str, text: str, video: str) -> dict[str, Any]:
    """A text -> video query row: the caption, its video the positive."""
    return query(qid, text, None, [video], 0)


def read_msvd(root: Path, split: str, problems: Problems) -> Layout:
    listing, captions_path = root / f"{split}_list.txt", root / MSVD_CAPTIONS
    for path, what in ((listing, f"MSVD's {split} video ids"), (captions_path, "MSVD's captions")):
        if not path.is_file():
            raise LamraError(f"{path} does not exist: {what} (CLIP4Clip's msvd_data.zip)")
    captions = read_captions(captions_path)
    try:
        ids = listing.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise LamraError(f"{listing} is not UTF-8 text (byte {err.start})") from None
    layout = Layout("msvd", split, inputs=[listing.name, MSVD_CAPTIONS])
    t2v, v2t = tasks()
    sentence = 0
    for number, line in enumerate(ids, start=1):
        video_id = line.strip()
        if not video_id:
            continue
        layout.count("videos")
        texts = captions.get(video_id)
        if not plain_id(video_id) or not texts:
            entry_problem(problems, layout, listing, number, f"video {video_id!r} has no captions in {MSVD_CAPTIONS}")
            continue
        did = layout.video(f"msvd:{video_id}", f"{video_id}.avi")
        t2v.pool.append(did)
        caption_ids = []
        for text in texts:
            caption_ids.append(layout.text(f"msvd:cap{sentence}", text))
            t2v.queries.append(query_row(f"msvd:t2v{sentence}", text, did))
            sentence += 1
        layout.count("captions", len(texts))
        v2t.pool.extend(caption_ids)
        v2t.queries.append(video_query(f"msvd:v2t{len(v2t.queries)}", None, f"{video_id}.avi", caption_ids, 3))
    layout.skip("video_not_in_split", len(captions.keys() - {i.strip() for i in ids}))
    layout.tasks = [t2v, v2t]
    return layout


class DataOnly(pickle.Unpickler):
    """An unpickler that builds plain data only: any class or function a pickle names is refused, unbuilt."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}; a captions pickle holds only dicts, lists, strings")


def read_captions(path: Path) -> dict[str, list[str]]:
    """`raw-captions.pkl`: {video id: [caption, ...]}, each caption its tokens joined by spaces (as LamRA)."""
    try:
        data = DataOnly(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # UnpicklingError, EOFError, ValueError, ... on a damaged or hostile file
        raise LamraError(f"{path} is not a pickle of plain data ({type(err).__name__}: {err}); not read") from None
    if not isinstance(data, dict):
        raise LamraError(f"{path}: expected a dict {{video id: [caption tokens, ...]}} at the top level")
    captions: dict[str, list[str]] = {}
    for video_id, entries in data.items():
        if not isinstance(entries, list):
            raise LamraError(f"{path}: the captions of {video_id!r} are not a list")
        texts = []
        for entry in entries:
            tokens = entry.split() if isinstance(entry, str) else entry
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise LamraError(f"{path}: a caption of {video_id!r} is not a list of tokens")
            if " ".join(tokens).strip():
                texts.append(" ".join(tokens))
        captions[str(video_id)] = texts
    return captions
