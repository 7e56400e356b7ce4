"""M-BEIR folder -> training shards, evaluation sets and the global pool (specs/mmembed_mbeir.md section 5).

    lamra-pl convert-mbeir --root M_BEIR_DIR --out OUT_DIR [--strict] [--splits test] [--max_image_pixels N]
                           [--image_roots [DIR, ...]]

Reads the M-BEIR layout: `query/union_train/*.jsonl` (else `query/train/*.jsonl`), `query/<split>/
mbeir_<dataset>_task<N>_<split>.jsonl`, every pool under `cand_pool/`, `qrels/<split>/`,
`instructions/query_instructions.tsv` and the images (paths relative to the root). Writes:

    OUT_DIR/train/<dataset>_task<N>/shard-*.tar        training queries with positives, listed negatives and the
                                                        instructions of (dataset id, query modality, positive modality)
    OUT_DIR/train/<dataset>_task<N>/{qrels.txt,task.json,pool/ids.txt}   the same folder as an evaluation task on
                                                        the training pool (for `lamra-pl retrieve` + `rerank-data`)
    OUT_DIR/train_pool/                                M-BEIR's union training pool (else every candidate the
                                                        training queries list), with ids.txt
    OUT_DIR/eval/<split>/<dataset>_task<N>/queries/    evaluation queries (same sample schema)
    OUT_DIR/eval/<split>/<dataset>_task<N>/pool/       the task's local candidate pool, one candidate per sample,
                                                        and ids.txt (its ids, in shard order)
    OUT_DIR/eval/<split>/<dataset>_task<N>/qrels.txt   M-BEIR qrels; task.json: what the task is and its metric
    OUT_DIR/eval/<split>/global_pool/                  the union of the split's local pools
    OUT_DIR/report.json                                what was read, written and dropped, and why (below)

Every file read is untrusted. Each problem is logged with file:line and counted by reason in report.json; the
record (line) is skipped, or with `--strict` the first problem stops the run with a one-line error. Per kind of
line (candidates, train_queries, <split>_queries, <split>_qrels, instructions), read == written + dropped. Reasons:

    malformed_line         not JSON (or nested too deeply), not an object, a required field missing
    not_utf8               a line that is not UTF-8 (only that line is lost)
    bad_value              an id (qid, did, list member) not a string or an integer, empty or holding whitespace
                           (ids become lines of ids.txt and fields of qrels); a pos/neg_cand_list not a list; a
                           text not a string or null; an image path not a non-empty string or null; a modality not
                           a string; an empty text with no image; an id, text or path holding a lone surrogate
                           ("\\ud800" is valid JSON, not text)
    unknown_modality       a modality other than M-BEIR's "text", "image", "image,text"
    bad_task_id            a query's task_id other than null or an integer 0..8
    unsafe_path            an image path that is absolute or leads outside --root (by `..` or a symbolic link;
                           links into an --image_roots folder are allowed): never opened
    missing_image          an image path naming no file
    bad_image              not one of `formats.sample.IMAGE_FORMATS`, or an image PIL cannot decode or convert
                           to RGB (empty, truncated)
    bad_video              a video file PyAV cannot decode (`formats.video_file`); missing ones are missing_image
    oversized_image        more than --max_image_pixels pixels (default: the readers' bound), found from the header
    unsafe_name            an output folder name from the data that is not a plain name (SAFE_NAME, no `..`)
    duplicate_candidate    a candidate id twice in one pool file with the same content: kept once
    conflicting_candidate  a candidate id met again (in any pool file) with other content: the first is kept
    duplicate_query        a qid twice in one evaluation query file, or twice in training with another row
    duplicate_instruction  a (dataset id, query modality, candidate modality) twice, or a dataset id under two
                           names: the first row is kept
    unknown_positive / unknown_negative   a listed candidate id in no pool
    no_positive            a query left without a usable positive
    no_instruction         no instruction for the query's (dataset id, query modality, positive modality)
    unknown_query          a qrels line naming a qid the task's query file does not have

Rules:

* Candidate ids are global, as in M-BEIR, whose local pools repeat candidates of the union pools. Pool files are
  read in sorted path order (`cand_pool/global/` first). An id met again in another pool file with the same
  content (txt, img_path, modality) is the same candidate, also of that pool: counted under "repeated", not a
  problem. Otherwise the first line of an id wins.
* In training, a qid again with the identical row is M-BEIR's up-sampling (`mbeir_union_up_train.jsonl` repeats
  rows on purpose): kept, counted under "repeated".
* Output folders are `<dataset>_task<N>`, named from the instructions' dataset names (else the qid's dataset id)
  and the evaluation files' names. An evaluation query file not named `mbeir_<safe name>_task<0-8>_<split>.jsonl`
  and a `--splits` value that is not a safe name stop the run: they are the layout, not a record.
* Video items (modality "video" or "video,text", an extension of M-BEIR's rows: the file under "vid_path" /
  "query_vid_path" instead of an image path; such a query needs its task_id, M-BEIR has no video task) are
  decoded with `formats.video_file.read_video` (about 2 frames per second, at most 768 frames of at most
  768*28*28 pixels) and stored as JPEG frames with their frame rate; the path rules are the images'. A video is
  decoded when first named (to check it) and again each time it is written (nothing held in memory).
* Interleaved queries (another extension: "query_parts", a list of {"txt": text} and {"img_path": path} in reading
  order, instead of query_txt and query_img_path; modality "image,text", or "image" without a text part; a task_id
  needed) become sample items with `parts` (`formats.sample` version 3); each image path follows the images' rules.
* Images are checked once per path, when a record first names them: inside the root, a file, within the pixel
  budget (header), then decoded and converted to RGB as readers will; that decode makes a conversion cost about
  one pass of reading every image. They are stored byte for byte (never re-encoded).
* Atomic, fingerprinted output. From before its first write until after report.json (written last), OUT carries
  the shard folders' INCOMPLETE marker (`lamra_pl.formats.shards`), listing as `convert-mbeir <folder>` every
  folder before it is written; `expand_shards` refuses everything below it, so a killed conversion is never read.
  report.json records the arguments, every input file read (bytes, sha256), the images (count, bytes, a digest of
  paths and sizes), every file of the layout not read and why, the tasks left without queries or pool (written
  anyway), the folders written ("outputs") and those under OUT/train and OUT/eval it did not write.
* A run over an earlier conversion (its report.json, or its marker if it was killed) rewrites it from scratch:
  the folders that conversion listed are deleted, other tools' are left. A report.json of a lamra-pl that listed
  no outputs (no "format"; read/written/dropped counts) stands for train_pool, eval/<split>/<name> and the
  train/<name> folders with a task.json. An OUT whose report.json is none of these is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats import safe_name
from lamra_pl.formats.sample import IMAGE_FORMATS, MAX_IMAGE_PIXELS, MODALITIES, encode_candidate, encode_record
from lamra_pl.formats.shards import (
    INCOMPLETE,
    incomplete_entries,
    mark_incomplete,
    unmark_incomplete,
    write_pool_ids,
    write_shards,
)
from lamra_pl.formats.task import DEFAULT_METRICS, POOL, QUERIES, TASK_FILE, write_task
from lamra_pl.formats.video_file import read_video
from lamra_pl.progress import counted, progress

log = logging.getLogger(__name__)

# M-BEIR's task ids by (query modality, candidate modality) and its reported metric per dataset.
TASKS = {
    ("text", "image"): 0,
    ("text", "text"): 1,
    ("text", "image,text"): 2,
    ("image", "text"): 3,
    ("image", "image"): 4,
    ("image", "image,text"): 5,
    ("image,text", "text"): 6,
    ("image,text", "image"): 7,
    ("image,text", "image,text"): 8,
}
RECALL_AT_10 = {"fashion200k", "fashioniq"}  # M-BEIR reports R@10 for these, R@5 elsewhere
EVAL_FILE = re.compile(r"mbeir_(?P<dataset>.+)_task(?P<task>\d+)_(?P<split>[^_]+)\.jsonl")
ID = re.compile(r"\S+")  # ids are written one per line (ids.txt) and as space-separated fields (qrels.txt)
# A lone surrogate: `"\ud800"` is valid JSON, yet no UTF-8 text (nor a path) can hold it.
SURROGATE = re.compile("[\ud800-\udfff]")
REPORT, REPORT_FORMAT, REPORT_VERSION = "report.json", "lamra-pl-mbeir-conversion", 1
WRITER = "convert-mbeir"  # its name in the INCOMPLETE marker (lamra_pl.formats.shards)
WHERE_KEPT = 20  # problem locations report.json keeps per reason (the log has every one)
JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return JSON_TYPES.get(type(value), "an object")


def id_problem(value: Any) -> str | None:
    """Why `value` is not an M-BEIR id (a string or an integer, as one token), or None."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return f"is {json_type(value)}, not a string or an integer"
    if not ID.fullmatch(str(value)):
        return f"{str(value)!r} is empty or holds whitespace"
    if SURROGATE.search(str(value)):
        return f"{value!r} holds a lone surrogate, not Unicode text"
    return None


@dataclass
class Problems:
    """Counts problems by reason; raises on the first one when strict. Nothing is dropped without a count."""

    strict: bool
    counts: Counter[str] = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, reason: str, file: Path, line: int, detail: str) -> None:
        message = f"{file}:{line}: {detail}"
        if self.strict:
            raise LamraError(f"{message} (convert-mbeir --strict stops at the first problem)")
        self.counts[reason] += 1
        if len(self.where[reason]) < WHERE_KEPT:
            self.where[reason].append(message)
        log.warning("skipped (%s) %s", reason, message)


@dataclass(slots=True)
class Candidate:
    did: str
    txt: str | None
    img: str | None
    modality: str
    vid: str | None = None  # a video candidate's file (M-BEIR rows' "vid_path"), instead of an image


VIDEO_MODALITIES = ("video", "video,text")
VIDEO_FRAME_QUALITY = 95  # JPEG quality of a video's stored frames


class Output:
    """OUT as a conversion owns it: its entries in OUT's INCOMPLETE marker, and report.json, written last."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.outputs: list[str] = []

    @staticmethod
    def owned(rel: Any) -> bool:
        """A path a conversion writes: train/<name>, train_pool, eval/<split>/<name>."""
        if not isinstance(rel, str):
            return False
        parts = PurePosixPath(rel).parts
        if not parts or rel.startswith("/") or not all(safe_name(p) for p in parts):
            return False
        return (parts[0], len(parts)) in {("train", 2), ("train_pool", 1), ("eval", 3)}

    def begin(self) -> None:
        """Mark OUT and delete what an earlier conversion into it wrote (it is rewritten from scratch)."""
        if self.out.exists() and not self.out.is_dir():
            raise LamraError(f"--out {str(self.out)!r} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        stale = self.earlier()
        mark_incomplete(self.out, WRITER, *stale)  # first: a kill while they are deleted leaves them listed
        (self.out / REPORT).unlink(missing_ok=True)
        for rel in stale:
            self.remove(rel)

    def earlier(self) -> list[str]:
        """The folders an earlier conversion into OUT wrote: its marker entries (killed) and its report's outputs."""
        listed = [entry for writer, entry in incomplete_entries(self.out) if writer == WRITER]
        unknown = [rel for rel in listed if not self.owned(rel)]
        if unknown:
            raise LamraError(
                f"{self.out / INCOMPLETE} lists {unknown[0]!r}, not a folder convert-mbeir writes; delete {self.out} "
                "or give another --out"
            )
        report = self.out / REPORT
        if report.is_file():
            try:
                previous = json.loads(report.read_bytes())
            except (ValueError, RecursionError):
                previous = None
            outputs = previous.get("outputs") if isinstance(previous, dict) else None
            if isinstance(outputs, list) and previous.get("format") == REPORT_FORMAT and all(map(self.owned, outputs)):
                listed += outputs
            elif (
                isinstance(previous, dict)
                and "format" not in previous
                and all(isinstance(previous.get(key), dict) for key in ("read", "written", "dropped"))
            ):
                listed += self.legacy_outputs()
            else:
                raise LamraError(
                    f"{report} is not a report of a convert-mbeir conversion this lamra-pl can rewrite (format "
                    f"{REPORT_FORMAT!r} listing its outputs, or an earlier version's); delete {self.out} or give "
                    "another --out"
                )
        return list(dict.fromkeys(listed))

    def legacy_outputs(self) -> list[str]:
        """What a conversion of a lamra-pl whose report listed no outputs wrote: train_pool, eval/<split>/<name> and
        the train/<name> folders with a task.json (convert-nli's train/nli_task1 has none: it is left)."""
        found = [self.out / "train_pool", *(p for p in (self.out / "train").glob("*") if (p / TASK_FILE).is_file())]
        found += [p for split in (self.out / "eval").glob("*") for p in split.glob("*")]
        rels = [p.relative_to(self.out).as_posix() for p in found if p.is_dir() or p.is_symlink()]
        return [rel for rel in rels if self.owned(rel)]

    def remove(self, rel: str) -> None:
        path = self.out / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(self.out)):
                raise LamraError(f"{path} leads outside {self.out} (a link): not deleting it; delete it yourself")
            shutil.rmtree(path)

    def claim(self, rel: str) -> Path:
        """A folder this conversion is about to write: listed in the marker first, then emptied."""
        if not self.owned(rel):
            raise LamraError(f"{rel!r} is not a folder name convert-mbeir may write")
        if rel in self.outputs:
            raise LamraError(f"two parts of the data would both be written to {self.out / rel}")
        mark_incomplete(self.out, WRITER, rel)
        self.outputs.append(rel)
        self.remove(rel)
        return self.out / rel

    def others(self) -> list[str]:
        """Folders under OUT/train and OUT/eval/<split> that this conversion did not write."""
        found = [p for p in (self.out / "train").glob("*") if p.is_dir()]
        found += [p for split in (self.out / "eval").glob("*") if split.is_dir() for p in split.glob("*")]
        mine = set(self.outputs)
        return sorted(rel for p in found if (rel := p.relative_to(self.out).as_posix()) not in mine)

    def finish(self, report: dict[str, Any]) -> None:
        atomic_write(self.out / REPORT, json.dumps(report, indent=1))
        unmark_incomplete(self.out, WRITER)  # only now: report.json is complete


class Converter:
    def __init__(
        self,
        root: Path,
        problems: Problems,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        image_roots: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        # Where image paths may lead: the root and, through links, the user's --image_roots (never the data's word).
        self.allowed = [Path(os.path.realpath(r)) for r in (root, *image_roots)]
        self.problems = problems
        self.max_image_pixels = max_image_pixels
        # Every non-empty input line is read, then written or dropped: read == written + dropped, per kind.
        self.read: Counter[str] = Counter()
        self.written: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.repeated: Counter[str] = Counter()  # not problems: M-BEIR's own repeats (see the module's docstring)
        self.pool: dict[str, Candidate] = {}
        self.pool_files: dict[Path, list[str]] = defaultdict(list)  # valid ids, in file order
        self.instructions: dict[tuple[str, str, str], list[str]] = {}
        self.dataset_names: dict[str, str] = {}
        self.inputs: dict[str, dict[str, Any]] = {}  # every file read: bytes and sha256
        self.image_sizes: dict[str, int] = {}  # image path (as the data gives it) -> bytes, for usable images
        self.image_problems: dict[str, tuple[str, str]] = {}  # image path -> (reason, detail)
        self.video_sizes: dict[str, tuple[int, int]] = {}  # video path -> (bytes, frames stored), usable videos
        self.train_files: list[Path] = []
        self.train_tasks_seen: set[str] = set()  # training folders some query row was meant for
        self.empty: list[dict[str, Any]] = []
        # task folder name -> what its task.json says beyond `task_info` (a zero-shot set's metric spec) and its
        # per-query galleries ("galleries": {qid: [ids]}): `lamra_pl.recipes.zeroshot`
        self.task_specs: dict[str, dict[str, Any]] = {}
        # Progress (`lamra_pl.progress`): every input line read, every sample written; `convert` closes them.
        self.reading = progress(desc="convert-mbeir: reading", unit="lines")
        self.writing = progress(desc="convert-mbeir: writing", unit="samples")

    # ----------------------------------------------------------------------------------- reading
    def text_lines(self, path: Path, kind: str, header: bool = False) -> Iterator[tuple[int, str]]:
        """(line number, text) of each non-empty line, decoded one by one: a line that is not UTF-8 costs only
        itself. The file's bytes are hashed on the way (report.json's fingerprint)."""
        digest, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                digest.update(raw)
                size += len(raw)
                if (header and number == 1) or not raw.strip():
                    continue
                self.read[kind] += 1
                self.reading.update(1)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    self.problems("not_utf8", path, number, f"not UTF-8 (byte {err.start})")
                    self.dropped[kind] += 1
                    continue
                yield number, text.rstrip("\r\n")
        self.inputs[self.relative(path)] = {"bytes": size, "sha256": digest.hexdigest()}

    def lines(self, path: Path, kind: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for number, line in self.text_lines(path, kind):
            try:
                row = json.loads(line)
            except RecursionError:
                self.problems("malformed_line", path, number, "not valid JSON (nested too deeply)")
                self.dropped[kind] += 1
                continue
            except ValueError as err:  # JSONDecodeError, and an integer too long to convert
                self.problems("malformed_line", path, number, f"not valid JSON ({getattr(err, 'msg', err)})")
                self.dropped[kind] += 1
                continue
            if not isinstance(row, dict):
                self.problems("malformed_line", path, number, "a line must be a JSON object")
                self.dropped[kind] += 1
                continue
            yield number, row

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def resolve(self, rel: str) -> tuple[Path | None, str]:
        """The file an image path names, if it lies inside the root (links followed); else why not."""
        if "\x00" in rel:
            return None, "holds a NUL byte"
        if PurePosixPath(rel).is_absolute():
            return None, "is an absolute path; image paths are relative to the M-BEIR root"
        real = Path(os.path.realpath(self.root / rel))
        if not any(real.is_relative_to(allowed) for allowed in self.allowed):
            return None, (
                f"leads outside the M-BEIR root {self.root} (through '..' or a link), to {real} (a folder of images "
                "linked from elsewhere is allowed with --image_roots)"
            )
        return real, ""

    def check_image(self, rel: str) -> tuple[str, str] | None:
        """(reason, detail) if the image at `rel` may not be used; None if it may (its size is then known)."""
        real, why = self.resolve(rel)
        if real is None:
            return "unsafe_path", f"image path {rel!r} {why}: not read"
        try:
            size = real.stat().st_size if real.is_file() else None
        except OSError as err:  # a name too long, a permission: not an image we can use
            return "missing_image", f"image file {rel!r} cannot be looked up ({err.strerror})"
        if size is None:
            return "missing_image", f"image file {rel!r} does not exist under {self.root}"
        if size == 0:
            return "bad_image", f"image file {rel!r} is empty"
        limit = self.max_image_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(real, formats=IMAGE_FORMATS) as image:  # reads the header only
                    if image.width * image.height > limit:
                        return "oversized_image", f"image {rel!r} is {image.width}x{image.height}, over {limit} pixels"
                    image.load()  # decodes: a truncated file fails here
                    image.convert("RGB")  # what every reader does with it
        except Image.DecompressionBombError as err:
            return "oversized_image", f"image {rel!r}: {err}"
        except Exception as err:  # PIL raises many types for corrupt files
            return "bad_image", f"image {rel!r} cannot be decoded ({type(err).__name__}: {err})"
        self.image_sizes[rel] = size
        return None

    def image_ok(self, rel: str | None, path: Path, number: int) -> bool:
        """Whether a record's image may be used; each path is checked once, however many records name it."""
        if rel is None or rel in self.image_sizes:
            return True
        problem = self.image_problems.get(rel) or self.check_image(rel)
        if problem is None:
            return True
        self.image_problems[rel] = problem
        self.problems(problem[0], path, number, problem[1])
        return False

    def load_pools(self) -> None:
        files = sorted((self.root / "cand_pool").rglob("*.jsonl"))
        if not files:
            raise LamraError(f"{self.root}: no candidate pool files under cand_pool/")
        for path in files:
            in_file: set[str] = set()
            for number, row in self.lines(path, "candidates"):
                candidate = self.candidate(row, path, number, in_file)
                if candidate is None:
                    self.dropped["candidates"] += 1
                else:
                    self.written["candidates"] += 1
                    self.pool.setdefault(candidate.did, candidate)
                    self.pool_files[path].append(candidate.did)
                    in_file.add(candidate.did)

    def candidate(self, row: dict, path: Path, number: int, in_file: set[str]) -> Candidate | None:
        missing = [k for k in ("did", "modality") if k not in row]
        if missing:
            self.problems("malformed_line", path, number, f"candidate has no {missing[0]!r} field")
            return None
        if (why := id_problem(row["did"])) is not None:
            self.problems("bad_value", path, number, f"did {why}")
            return None
        did, modality = str(row["did"]), row["modality"]
        if not isinstance(modality, str):
            self.problems("bad_value", path, number, f"modality of {did} is {json_type(modality)}, not a string")
            return None
        if modality not in MODALITIES:
            self.problems("unknown_modality", path, number, f"modality {modality!r}; use {MODALITIES}")
            return None
        txt, img, vid = row.get("txt"), row.get("img_path"), row.get("vid_path")
        if (why := self.visual_problem(modality, img, vid, "img_path", "vid_path")) is not None:
            self.problems(why[0], path, number, f"candidate {did}: {why[1]}")
            return None
        visual, key = (vid, "vid_path") if modality in VIDEO_MODALITIES else (img, "img_path")
        if (why := self.content_problem(txt, visual, "txt", key)) is not None:
            self.problems(why[0], path, number, f"candidate {did}: {why[1]}")
            return None
        first = self.pool.get(did)
        if first is not None:
            if (first.txt, first.img, first.vid, first.modality) != (txt, img, vid, modality):
                self.problems(
                    "conflicting_candidate", path, number, f"candidate {did} was met before with other content"
                )
                return None
            if did in in_file:
                self.problems("duplicate_candidate", path, number, f"candidate {did} twice in this file")
                return None
            self.repeated["candidates_in_several_pools"] += 1
            return first
        usable = self.video_ok(vid, path, number) if vid is not None else self.image_ok(img, path, number)
        return Candidate(did, txt, img, modality, vid) if usable else None

    @staticmethod
    def visual_problem(modality: str, img: Any, vid: Any, img_key: str, vid_key: str) -> tuple[str, str] | None:
        """(reason, detail) if a row's image and video fields disagree with its modality (a video item has a
        video file and no image, any other item no video file)."""
        if modality in VIDEO_MODALITIES:
            if img is not None:
                return "bad_value", f"a {modality} item has an image ({img_key}); a video names its file in {vid_key}"
            if not (isinstance(vid, str) and vid):
                return "malformed_line", f"a {modality} item needs {vid_key}, a video file's path"
        elif vid is not None:
            return "bad_value", f"a {modality} item has a {vid_key}; only video items have one"
        return None

    @staticmethod
    def content_problem(txt: Any, img: Any, txt_key: str, img_key: str) -> tuple[str, str] | None:
        """(reason, detail) if an item's text and image path are not a usable pair; None if they are."""
        if txt is not None and not isinstance(txt, str):
            return "bad_value", f"{txt_key} is {json_type(txt)}, not a string or null"
        if img is not None and not (isinstance(img, str) and img):
            return "bad_value", f"{img_key} is {json_type(img) if img != '' else 'empty'}, not a path or null"
        for key, text in ((txt_key, txt), (img_key, img)):
            if text is not None and SURROGATE.search(text):
                return "bad_value", f"{key} {text!r} holds a lone surrogate, not Unicode text"
        if txt is None and img is None:
            return "malformed_line", f"neither {txt_key} nor {img_key}"
        if img is None and not txt.strip():
            return "bad_value", f"{txt_key} is empty and there is no image"
        return None

    def load_instructions(self) -> None:
        path = self.root / "instructions" / "query_instructions.tsv"
        if not path.is_file():
            raise LamraError(f"{path} does not exist: M-BEIR keeps the task instructions there")
        for number, line in self.text_lines(path, "instructions", header=True):
            cols = line.split("\t")
            if len(cols) < 5:
                self.problems(
                    "malformed_line", path, number, "expected query_modality, cand_modality, name, id, prompts"
                )
                self.dropped["instructions"] += 1
                continue
            qm, cm, name, dataset_id = (c.strip() for c in cols[:4])
            name = name.lower()
            key = (dataset_id, qm, cm)
            if not safe_name(name):
                self.problems("unsafe_name", path, number, f"dataset name {name!r} is not a plain folder name")
            elif key in self.instructions:
                self.problems("duplicate_instruction", path, number, f"a second row for {key}")
            elif self.dataset_names.get(dataset_id, name) != name:
                was = self.dataset_names[dataset_id]
                self.problems("duplicate_instruction", path, number, f"dataset {dataset_id} was named {was!r} before")
            else:
                self.instructions[key] = [p.strip() for p in cols[4:] if p.strip()]
                self.dataset_names[dataset_id] = name
                self.written["instructions"] += 1
                continue
            self.dropped["instructions"] += 1

    def query_problem(self, row: dict) -> tuple[str, str] | None:
        """(reason, detail) if a query row's values are not what M-BEIR's are; None if they are."""
        for key in ("qid", "query_modality", "pos_cand_list"):
            if key not in row:
                return "malformed_line", f"query has no {key!r} field"
        if (why := id_problem(row["qid"])) is not None:
            return "bad_value", f"qid {why}"
        modality = row["query_modality"]
        if not isinstance(modality, str):
            return "bad_value", f"query_modality is {json_type(modality)}, not a string"
        if modality not in MODALITIES:
            return "unknown_modality", f"query_modality {modality!r}; use {MODALITIES}"
        img, vid = row.get("query_img_path"), row.get("query_vid_path")
        if row.get("query_parts") is not None:
            if (why := self.parts_problem(row)) is not None:
                return why
        elif (why := self.visual_problem(modality, img, vid, "query_img_path", "query_vid_path")) is not None:
            return why
        else:
            visual, key = (vid, "query_vid_path") if modality in VIDEO_MODALITIES else (img, "query_img_path")
            if (why := self.content_problem(row.get("query_txt"), visual, "query_txt", key)) is not None:
                return why
        for key in ("pos_cand_list", "neg_cand_list"):
            listed = row.get(key)
            if listed is None and key == "neg_cand_list":
                continue
            if not isinstance(listed, list):
                return "bad_value", f"{key} is {json_type(listed)}, not a list of ids"
            for i, did in enumerate(listed):
                if (why := id_problem(did)) is not None:
                    return "bad_value", f"{key}[{i}] {why}"
        task = row.get("task_id")
        if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task not in range(9)):
            return "bad_task_id", f"task_id {task!r} is not an M-BEIR task id (an integer 0..8)"
        if task is None and modality in VIDEO_MODALITIES:
            return "bad_task_id", "a video query needs a task_id (M-BEIR's tasks have no video)"
        if task is None and row.get("query_parts") is not None:
            return "bad_task_id", "an interleaved query needs a task_id"
        return None

    @staticmethod
    def parts_problem(row: dict) -> tuple[str, str] | None:
        """(reason, detail) if an interleaved query row ("query_parts": texts and image paths in reading order,
        instead of query_txt and query_img_path) is not one; None if it is."""
        parts, modality = row["query_parts"], row["query_modality"]
        if any(row.get(key) is not None for key in ("query_txt", "query_img_path", "query_vid_path")):
            return "bad_value", "an interleaved query holds its texts and images in query_parts only"
        if not isinstance(parts, list) or not parts:
            return "bad_value", f"query_parts is {json_type(parts)}, not a non-empty list"
        for i, part in enumerate(parts):
            if not isinstance(part, dict) or len(part) != 1 or not {"txt", "img_path"} >= set(part):
                return "bad_value", f"query_parts[{i}] must be {{'txt': text}} or {{'img_path': path}}"
            [value] = part.values()
            if not isinstance(value, str) or not value.strip():
                return "bad_value", f"query_parts[{i}] is {json_type(value)}, not a non-empty string"
        kinds = {next(iter(p)) for p in parts}
        expected = "image,text" if "txt" in kinds else "image"
        if "img_path" not in kinds:
            return "bad_value", "query_parts holds no image"
        if modality != expected:
            return "bad_value", f"query_modality {modality!r}, but its parts make it {expected!r}"
        return None

    def query_record(
        self,
        row: dict,
        path: Path,
        number: int,
        pool: dict[str, Candidate],
        seen: dict[str, bytes],
        training: bool = False,
    ) -> dict[str, Any] | None:
        if (why := self.query_problem(row)) is not None:
            self.problems(why[0], path, number, why[1])
            return None
        qid = str(row["qid"])
        dataset_id = qid.split(":")[0]
        if training and row.get("task_id") is not None and safe_name(self.group(dataset_id, row["task_id"])):
            self.train_tasks_seen.add(self.group(dataset_id, row["task_id"]))
        content = hashlib.sha1(json.dumps(row, sort_keys=True).encode()).digest()
        if qid in seen:
            if not training or seen[qid] != content:
                self.problems("duplicate_query", path, number, f"query {qid} was met before; the first is kept")
                return None
            self.repeated["train_queries_upsampled"] += 1
        if not self.image_ok(row.get("query_img_path"), path, number):
            return None
        part_images = [p["img_path"] for p in row.get("query_parts") or () if "img_path" in p]
        if not all(self.image_ok(rel, path, number) for rel in part_images):
            return None
        if row.get("query_vid_path") is not None and not self.video_ok(row["query_vid_path"], path, number):
            return None
        positives = []
        for did in row["pos_cand_list"]:
            if str(did) in pool:
                positives.append(pool[str(did)])
            else:
                self.problems("unknown_positive", path, number, f"positive {did!r} of {qid} is in no pool")
        if not positives:
            self.problems("no_positive", path, number, f"query {qid} has no usable positive")
            return None
        negatives = []
        for did in row.get("neg_cand_list") or []:
            if str(did) in pool:
                negatives.append(pool[str(did)])
            else:
                self.problems("unknown_negative", path, number, f"negative {did!r} of {qid} is in no pool")
        task = row.get("task_id")
        if task is None and (row["query_modality"], positives[0].modality) not in TASKS:
            self.problems("bad_task_id", path, number, f"query {qid}: a video task needs its task_id")
            return None
        if task is None:
            task = TASKS[(row["query_modality"], positives[0].modality)]
        if training and not safe_name(self.group(dataset_id, task)):
            self.problems("unsafe_name", path, number, f"its folder name {self.group(dataset_id, task)!r} is unsafe")
            return None
        key = (dataset_id, row["query_modality"], positives[0].modality)
        instructions = self.instructions.get(key)
        if instructions is None:
            self.problems("no_instruction", path, number, f"no instruction for {key} in query_instructions.tsv")
            return None
        seen[qid] = content
        return {
            "qid": qid,
            "query_modality": row["query_modality"],
            "task_id": task,
            "query": {
                "txt": row.get("query_txt"),
                "image": self.image(row.get("query_img_path")),
                "img_src": row.get("query_img_path"),
                **self.video_fields(row.get("query_vid_path")),
                **self.parts_fields(row.get("query_parts")),
            },
            "positives": [self.item(c) for c in positives],
            "negatives": [self.item(c) for c in negatives],
            "instructions": instructions,
        }

    def parts_fields(self, parts: list[dict[str, str]] | None) -> dict[str, Any]:
        """An interleaved query's sample fields (`encode_record`'s "parts"): its texts, and its images as they are
        with their paths; {} for no parts."""
        if parts is None:
            return {}
        return {
            "parts": [
                {"image": self.image(p["img_path"]), "img_src": p["img_path"]} if "img_path" in p else {"txt": p["txt"]}
                for p in parts
            ]
        }

    def image(self, rel: str | None) -> tuple[bytes, str] | None:
        """The image's bytes as they are (checked by `image_ok`) and the extension its member is named with."""
        if rel is None:
            return None
        real, _ = self.resolve(rel)
        try:
            data = real.read_bytes() if real is not None else b""
        except OSError:
            data = b""
        if real is None or len(data) != self.image_sizes[rel]:
            raise LamraError(f"image {rel!r} under {self.root} changed while convert-mbeir ran; convert again")
        ext = PurePosixPath(rel).suffix.lstrip(".").lower()
        return data, ext if re.fullmatch(r"[a-z0-9]{1,8}", ext) else "jpg"

    def item(self, c: Candidate) -> dict[str, Any]:
        return {
            "id": c.did,
            "txt": c.txt,
            "image": self.image(c.img),
            "img_src": c.img,
            "modality": c.modality,
            **self.video_fields(c.vid),
        }

    def check_video(self, rel: str) -> tuple[str, str] | None:
        """(reason, detail) if the video file at `rel` may not be used; None if it may (decoded to check)."""
        real, why = self.resolve(rel)
        if real is None:
            return "unsafe_path", f"video path {rel!r} {why}: not read"
        try:
            size = real.stat().st_size if real.is_file() else None
        except OSError as err:
            return "missing_image", f"video file {rel!r} cannot be looked up ({err.strerror})"
        if size is None:
            return "missing_image", f"video file {rel!r} does not exist under {self.root}"
        try:
            frames, _ = read_video(real)
        except LamraError as err:
            return "bad_video", f"{rel!r}: {err}"
        self.video_sizes[rel] = (size, len(frames))
        return None

    def video_ok(self, rel: str, path: Path, number: int) -> bool:
        """Whether a record's video may be used; each path is checked once, however many records name it."""
        if rel in self.video_sizes:
            return True
        problem = self.image_problems.get(rel) or self.check_video(rel)
        if problem is None:
            return True
        self.image_problems[rel] = problem
        self.problems(problem[0], path, number, problem[1])
        return False

    def video_fields(self, rel: str | None) -> dict[str, Any]:
        """A video item's sample fields (`encode_record`'s / `encode_candidate`'s): its frames, decoded again and
        JPEG-encoded, their frame rate and its path; {} for no video."""
        if rel is None:
            return {}
        real, _ = self.resolve(rel)
        try:
            frames, fps = read_video(real) if real is not None else ([], None)
            size = real.stat().st_size if real is not None else -1
        except (LamraError, OSError):
            frames, fps, size = [], None, -1
        if (size, len(frames)) != self.video_sizes[rel]:
            raise LamraError(f"video {rel!r} under {self.root} changed while convert-mbeir ran; convert again")
        encoded = []
        for frame in frames:
            buffer = io.BytesIO()
            frame.save(buffer, format="JPEG", quality=VIDEO_FRAME_QUALITY)
            encoded.append((buffer.getvalue(), "jpg"))
        return {"video": encoded, "fps": fps, "vid_src": rel}

    def group(self, dataset_id: str, task: int) -> str:
        return f"{self.dataset_names.get(dataset_id, dataset_id)}_task{task}"

    # ----------------------------------------------------------------------------------- writing
    def train(self, output: Output) -> None:
        folder = self.root / "query" / "union_train"
        files = sorted(folder.glob("*.jsonl")) or sorted((self.root / "query" / "train").glob("*.jsonl"))
        self.train_files = files
        groups: dict[str, list[dict]] = defaultdict(list)
        seen: dict[str, bytes] = {}
        for path in files:
            for number, row in self.lines(path, "train_queries"):
                record = self.query_record(row, path, number, self.pool, seen, training=True)
                if record is None:
                    self.dropped["train_queries"] += 1
                else:
                    groups[self.group(record["qid"].split(":")[0], record["task_id"])].append(record)
        pool = self.train_pool(groups)
        self.write_pool(pool, output.claim("train_pool"))
        if not pool:
            self.empty.append({"task": "train_pool", "empty": ["pool"], "written": True})
        for name in sorted(self.train_tasks_seen - groups.keys()):
            self.empty.append({"task": f"train/{name}", "empty": ["queries"], "written": False})
        for name, records in sorted(groups.items()):
            task_dir = output.claim(f"train/{name}")
            self.write_queries(records, task_dir, "train_queries")
            self.train_task(task_dir, records, pool)

    def train_pool(self, groups: dict[str, list[dict]]) -> list[Candidate]:
        """M-BEIR's union training pool, else every candidate the training queries list (positive or negative)."""
        union = [p for p in self.pool_files if p.name.endswith("union_train_cand_pool.jsonl")]
        if union:
            return [self.pool[did] for did in self.pool_files[union[0]]]
        listed = {c["id"] for rs in groups.values() for r in rs for c in r["positives"] + r["negatives"]}
        return [c for did, c in self.pool.items() if did in listed]

    def train_task(self, task_dir: Path, records: list[dict], pool: list[Candidate]) -> None:
        """What makes a training folder an evaluation task too (`lamra-pl retrieve` runs its queries, as
        `lamra-pl rerank-data` needs): qrels, task.json and its local pool, the training-pool candidates of its
        dataset and of its positives' modalities (LamRA's per-task rerank pools, spec lamra.md section 4)."""
        dataset_id = records[0]["qid"].split(":")[0]
        modalities = {p["modality"] for r in records for p in r["positives"]}
        ids = [c.did for c in pool if c.modality in modalities and c.did.split(":")[0] == dataset_id]
        dataset = self.dataset_names.get(dataset_id, dataset_id)
        if not ids:
            self.empty.append({"task": f"train/{task_dir.name}", "empty": ["pool"], "written": True})
        info = task_info(dataset, records[0]["task_id"], "train", records, len(ids))
        write_task(task_dir, info, positive_qrels(records), pool=ids)

    def evaluation(self, output: Output, split: str) -> None:
        union: dict[str, Candidate] = {}
        files = sorted((self.root / "query" / split).glob("*.jsonl"))
        for path in files:
            match = EVAL_FILE.fullmatch(path.name)
            if match is None or not safe_name(match["dataset"]) or int(match["task"]) not in range(9):
                raise LamraError(
                    f"{path}: expected a name like mbeir_<dataset>_task<N>_{split}.jsonl, with N 0..8 and a dataset "
                    "name of letters, digits, '_', '.', '-'"
                )
            dataset, task = match["dataset"], int(match["task"])
            name = f"mbeir_{dataset}_task{task}"
            local = self.root / "cand_pool" / "local"
            pool_file = local / f"{name}_{split}_cand_pool.jsonl"
            pool_file = pool_file if pool_file.is_file() else local / f"{name}_cand_pool.jsonl"
            if not pool_file.is_file():
                raise LamraError(f"{path}: its local pool {pool_file} does not exist")
            pool = {did: self.pool[did] for did in self.pool_files[pool_file]}
            records = []
            seen: dict[str, bytes] = {}
            qids_read: set[str] = set()
            for number, row in self.lines(path, f"{split}_queries"):
                if id_problem(row.get("qid")) is None:
                    qids_read.add(str(row["qid"]))
                # M-BEIR's eval positives come from the whole union (OVEN/InfoSeek cross-reference); the local
                # pool is what is searched.
                record = self.query_record(row, path, number, self.pool, seen)
                if record is None:
                    self.dropped[f"{split}_queries"] += 1
                else:
                    records.append(record)
            task_dir = output.claim(f"eval/{split}/{dataset}_task{task}")
            self.write_queries(records, task_dir / QUERIES, f"{split}_queries")
            self.write_pool(pool.values(), task_dir / POOL)
            kept = {r["qid"] for r in records}
            qrels_path = self.root / "qrels" / split / f"{name}_{split}_qrels.txt"
            if qrels_path.is_file():
                lines = self.qrels(qrels_path, f"{split}_qrels", kept, qids_read, path)
            else:
                lines = positive_qrels(records)
            info = task_info(dataset, task, split, records, len(pool))
            spec = dict(self.task_specs.get(task_dir.name, {}))
            gallery, excluded = spec.pop("galleries", None), spec.pop("excluded", None)
            if gallery is not None:  # the kept queries' galleries (a dropped query's goes with it), of kept candidates
                gallery = {qid: [i for i in ids if i in pool] for qid, ids in gallery.items() if qid in kept}
            if excluded is not None:  # the kept queries' exclusions, of candidates in the pool (others never rank)
                excluded = {qid: [i for i in ids if i in pool] for qid, ids in excluded.items() if qid in kept}
            write_task(task_dir, {**info, **spec}, lines, galleries=gallery, excluded=excluded)
            empty = [part for part, n in (("queries", len(records)), ("pool", len(pool))) if n == 0]
            if empty:
                self.empty.append({"task": f"eval/{split}/{task_dir.name}", "empty": empty, "written": True})
            union.update(pool)
        if union:
            self.write_pool(union.values(), output.claim(f"eval/{split}/global_pool"))

    def qrels(self, path: Path, kind: str, kept: set[str], qids_read: set[str], queries: Path) -> list[str]:
        """The qrels lines of the kept queries; lines of dropped queries are dropped with them."""
        lines = []
        for number, line in self.text_lines(path, kind):
            fields = line.split()
            if len(fields) < 4 or not re.fullmatch(r"-?\d+", fields[3]):
                self.problems("malformed_line", path, number, "expected 'qid 0 did relevance task_id'")
            elif fields[0] in kept:
                lines.append(" ".join(fields))
                self.written[kind] += 1
                continue
            elif fields[0] not in qids_read:
                why = f"query {fields[0]!r} is not among the readable queries of {queries.name}"
                self.problems("unknown_query", path, number, why)
            self.dropped[kind] += 1
        return lines

    def write_queries(self, records: list[dict], folder: Path, kind: str) -> None:
        fields = ({k: v for k, v in r.items() if k != "query_modality"} for r in records)  # (bookkeeping)
        samples = (encode_record(f"{i:08d}", **f) for i, f in enumerate(fields))
        self.written[kind] += sum(write_shards(counted(samples, self.writing), folder).values())

    def write_pool(self, candidates: Any, folder: Path) -> None:
        candidates = list(candidates)
        samples = (
            encode_candidate(
                f"{i:08d}", id=c.did, txt=c.txt, image=self.image(c.img), img_src=c.img, **self.video_fields(c.vid)
            )
            for i, c in enumerate(candidates)
        )
        written = write_shards(counted(samples, self.writing), folder)
        self.written[f"pool:{folder.parent.name}/{folder.name}"] = sum(written.values())
        # The pool's ids in shard order: restricts a search of the global index to this pool without reading it.
        write_pool_ids(folder, (c.did for c in candidates))

    # ----------------------------------------------------------------------------------- reporting
    def ignored(self, splits: tuple[str, ...]) -> dict[str, str]:
        """Every file under the layout's folders that was not read, and why; and what else the root holds."""
        layout = ("query", "cand_pool", "qrels", "instructions")
        why: dict[str, str] = {}
        for entry in sorted(self.root.iterdir()):
            if entry.name not in layout:
                why[entry.name + ("/" if entry.is_dir() else "")] = (
                    "not part of the M-BEIR layout convert-mbeir reads (images are read where a record names them)"
                )
        union = bool(self.train_files) and self.train_files[0].parent.name == "union_train"
        for folder in layout:
            for dirpath, _, filenames in sorted(os.walk(self.root / folder)):
                for filename in sorted(filenames):
                    rel = self.relative(Path(dirpath) / filename)
                    if rel in self.inputs:
                        continue
                    parts = rel.split("/")
                    sub = parts[1] if len(parts) > 2 else None  # the split folder
                    if folder == "instructions":
                        why[rel] = "convert-mbeir reads instructions/query_instructions.tsv only"
                    elif folder == "query" and sub == "train" and union:
                        why[rel] = "query/union_train/ holds the training queries"
                    elif folder == "qrels" and sub == "train":
                        why[rel] = "training qrels are made from the training queries' positives"
                    elif folder in ("query", "qrels") and sub is None:
                        why[rel] = f"not in a split folder ({folder}/<split>/)"
                    elif folder in ("query", "qrels") and sub not in (*splits, "train", "union_train"):
                        why[rel] = f"split {sub!r} was not asked for (--splits {list(splits)})"
                    elif folder == "qrels":
                        why[rel] = f"no query file of this task in query/{sub}/"
                    elif not filename.endswith(".jsonl"):
                        why[rel] = "not a .jsonl file"
                    else:
                        why[rel] = "not a file of the M-BEIR layout convert-mbeir reads"
        return why

    def image_fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for rel in sorted(self.image_sizes):
            digest.update(f"{rel}\t{self.image_sizes[rel]}\n".encode())
        return {"files": len(self.image_sizes), "bytes": sum(self.image_sizes.values()), "sha256": digest.hexdigest()}

    def video_fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for rel in sorted(self.video_sizes):
            digest.update(f"{rel}\t{self.video_sizes[rel][0]}\n".encode())
        sizes = self.video_sizes.values()
        return {
            "files": len(sizes),
            "bytes": sum(b for b, _ in sizes),
            "frames": sum(n for _, n in sizes),
            "sha256": digest.hexdigest(),
        }


def task_info(dataset: str, task: int, split: str, records: list[dict], pool: int) -> dict[str, Any]:
    """What task.json says of a converted task."""
    recall_k = 10 if dataset in RECALL_AT_10 else 5
    return {
        "dataset": dataset,
        "task_id": task,
        "split": split,
        "query_modalities": sorted({r["query_modality"] for r in records}),
        "queries": len(records),
        "pool": pool,
        "recall_k": recall_k,
        "metrics": list(DEFAULT_METRICS),
        "reported": f"R@{recall_k}",
    }


def positive_qrels(records: list[dict]) -> list[str]:
    """qrels lines of the queries' positives, once each (up-sampled training queries repeat theirs)."""
    return list(dict.fromkeys(f"{r['qid']} 0 {p['id']} 1 {r['task_id']}" for r in records for p in r["positives"]))


def convert(
    root: str,
    out: str,
    strict: bool = False,
    splits: tuple[str, ...] = ("test",),
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    image_roots: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Convert an M-BEIR folder to training shards, evaluation sets and the global pool.

    Prints and returns the report of what was read, written and dropped, and why (also OUT/report.json, written
    last). A run over an earlier conversion in OUT rewrites it from scratch.

    Args:
        root: the M-BEIR folder (query/, cand_pool/, qrels/, instructions/, images).
        out: output folder (train/, train_pool/, eval/<split>/, report.json).
        strict: stop at the first problem instead of skipping and counting.
        splits: evaluation splits to convert.
        max_image_pixels: images with more pixels are skipped and counted (`oversized_image`), read from their
            header before anything is decoded.
        image_roots: folders outside the root that image links inside it may lead into (e.g. the disk that a
            linked `mbeir_images/` is on); every other path leading out of the root is refused (`unsafe_path`).
    """
    return run_conversion(root, out, strict, splits, max_image_pixels, image_roots)


def run_conversion(
    root: str,
    out: str,
    strict: bool = False,
    splits: tuple[str, ...] = ("test",),
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    image_roots: tuple[str, ...] = (),
    train: bool = True,
    task_specs: dict[str, dict[str, Any]] | None = None,
    extra_report: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """`convert`, and what other recipes need of it (`lamra_pl.recipes.zeroshot` writes an M-BEIR layout and converts
    it here): `train=False` converts the evaluation splits only (no train/ nor train_pool/); `task_specs` adds to a
    task folder's task.json (by folder name; "galleries" becomes its galleries.jsonl, "excluded" its
    excluded.jsonl); `extra_report` adds fields to report.json; `quiet` does not print the report."""
    root_path, out_path = Path(root), Path(out)
    if not root_path.is_dir():
        raise LamraError(f"M-BEIR root {root!r} does not exist")
    splits = tuple(dict.fromkeys(splits))
    unsafe = [s for s in splits if not safe_name(s)]
    if unsafe:
        raise LamraError(f"--splits {unsafe[0]!r} is not a split name (letters, digits, '_', '.', '-')")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise LamraError(f"--max_image_pixels must be a positive integer, got {max_image_pixels!r}")
    missing = [r for r in image_roots if not Path(r).is_dir()]
    if missing:
        raise LamraError(f"--image_roots {missing[0]!r} is not a folder")
    converter = Converter(root_path, Problems(strict), max_image_pixels, tuple(image_roots))
    converter.task_specs = dict(task_specs or {})
    converter.load_instructions()
    converter.load_pools()
    output = Output(out_path)
    output.begin()
    if train:
        converter.train(output)
    for split in splits:
        converter.evaluation(output, split)
    converter.reading.close()
    converter.writing.close()
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "arguments": {
            "root": os.path.abspath(root_path),
            "out": os.path.abspath(out_path),
            "strict": strict,
            "splits": list(splits),
            "max_image_pixels": max_image_pixels,
            "image_roots": [os.path.abspath(r) for r in image_roots],
        },
        "inputs": {
            "files": converter.inputs,
            "images": converter.image_fingerprint(),
            **({"videos": converter.video_fingerprint()} if converter.video_sizes else {}),
        },
        "ignored": converter.ignored(splits),
        "read": dict(converter.read),
        "written": dict(converter.written),
        "dropped": dict(converter.dropped),
        "problems": dict(converter.problems.counts),
        "where": dict(converter.problems.where),
        "repeated": dict(converter.repeated),
        "empty_tasks": converter.empty,
        "outputs": output.outputs,
        "not_written_here": output.others(),
        "strict": strict,
        **(extra_report or {}),
    }
    output.finish(report)
    if not quiet:
        print(json.dumps(report, indent=1))
    return report
