"""`convert-mbeir` against hostile M-BEIR folders: paths and names that try to leave their folders, duplicate and
malformed records, undecodable and oversized images, and a conversion killed half-way. Nothing is read outside
--root, nothing is written outside --out, nothing is dropped without a count naming file:line, and a killed
conversion is never trained on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import EpsImagePlugin, Image

from helpers import LAMRA, lamra_here
from lamra_pl.api import _image
from lamra_pl.errors import LamraError
from lamra_pl.formats import SAFE_NAME
from lamra_pl.formats.sample import UnreadableImage, decode_candidate, decode_record, encode_candidate, encode_record
from lamra_pl.formats.shards import (
    INCOMPLETE,
    MARKER_HEADER,
    expand_shards,
    incomplete_entries,
    read_samples,
    write_shards,
)
from lamra_pl.recipes.mbeir import Converter, Output, convert

FIXTURE = Path(__file__).parents[1] / "fixtures" / "mbeir_tiny"
LEGACY_DATA = Path(__file__).parents[1] / "fixtures" / "legacy_4ccdac6" / "data"  # convert-mbeir of 4ccdac6
TRAIN = "query/union_train/mbeir_union_up_train.jsonl"
POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"
TEST0 = "query/test/mbeir_emoji_task0_test.jsonl"
TSV = "instructions/query_instructions.tsv"
QUERY_LINE = 2  # in TRAIN: an image,text query (10:30) with an image and four negatives
CANDIDATE_LINE = 2  # in POOL: an image candidate (10:11)


@pytest.fixture
def mbeir(tmp_path: Path) -> Path:
    root = tmp_path / "mbeir"
    shutil.copytree(FIXTURE, root)
    return root


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, records: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def set_value(path: Path, line: int, key: str, value: Any) -> None:
    records = rows(path)
    records[line - 1][key] = value
    write_rows(path, records)


def shard_bytes(out: Path) -> bytes:
    """Every byte of every shard under `out` (images are stored uncompressed: their bytes appear as they are)."""
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*.tar")))


def balanced(report: dict[str, Any]) -> None:
    """Nothing lost without a count: per kind of line, read == written + dropped."""
    for kind, read in report["read"].items():
        assert read == report["written"].get(kind, 0) + report["dropped"].get(kind, 0), kind


def named(report: dict[str, Any], reason: str, file: Path, line: int) -> bool:
    return any(w.startswith(f"{file}:{line}: ") for w in report["where"].get(reason, []))


def strict_error(root: Path, out: Path, **kwargs: Any) -> str:
    with pytest.raises(LamraError) as err:
        convert(str(root), str(out), strict=True, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def png_bytes(size: int, color: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def tree(folder: Path, leave_out: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if leave_out not in (p, *p.parents)}


# ------------------------------------------------------------------------------------------------- containment
def escape(kind: str, root: Path, secret: Path) -> str:
    """An image path of the given kind that names `secret`, a file outside the root."""
    if kind == "dot-dot":
        return "mbeir_images/../../" + secret.name
    if kind == "absolute":
        return str(secret)
    if kind == "absolute-inside-root":
        shutil.copy(secret, root / "mbeir_images" / secret.name)
        return str(root / "mbeir_images" / secret.name)
    if kind == "symlinked-file":
        (root / "mbeir_images" / "innocent.png").symlink_to(secret)
        return "mbeir_images/innocent.png"
    if kind == "symlinked-folder":
        (root / "mbeir_images" / "more").symlink_to(secret.parent, target_is_directory=True)
        return f"mbeir_images/more/{secret.name}"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dot-dot", "absolute", "absolute-inside-root", "symlinked-file", "symlinked-folder"])
def test_image_paths_leading_outside_the_root_are_never_read(mbeir, tmp_path, finding, kind):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(20))  # a valid image: were it read, it would pass every image check
    path = escape(kind, mbeir, secret)
    set_value(mbeir / POOL, CANDIDATE_LINE, "img_path", path)
    set_value(mbeir / TRAIN, QUERY_LINE, "query_img_path", path)
    out = tmp_path / "out"
    report = convert(str(mbeir), str(out))
    assert report["problems"]["unsafe_path"] == 2
    assert named(report, "unsafe_path", mbeir / POOL, CANDIDATE_LINE)
    assert named(report, "unsafe_path", mbeir / TRAIN, QUERY_LINE)
    stored = shard_bytes(out)
    assert secret.read_bytes() not in stored
    kept = mbeir / rows(mbeir / POOL)[2]["img_path"]
    assert kept.read_bytes() in stored  # images inside the root are stored byte for byte
    balanced(report)
    assert re.search(r"absolute path|leads outside the M-BEIR root", strict_error(mbeir, tmp_path / "strict"))
    if kind == "symlinked-folder":  # a linked image folder is what real M-BEIR set-ups have: allowed by the user
        allowed = convert(str(mbeir), str(tmp_path / "allowed"), image_roots=(str(secret.parent),))
        assert "unsafe_path" not in allowed["problems"]
        assert secret.read_bytes() in shard_bytes(tmp_path / "allowed")
    finding(
        f"an image path in a jsonl leading outside `--root` ({kind})",
        "never opened: the record is skipped and counted (`unsafe_path`) naming file:line; the outside file's "
        "bytes are in no shard; `--strict`: one-line error",
    )


def test_names_from_the_data_cannot_write_outside_out(mbeir, tmp_path, finding):
    tsv = (mbeir / TSV).read_text().splitlines()
    cols = tsv[1].split("\t")
    cols[2] = "../../../escaped"  # a dataset name: it names the output folders
    tsv[1] = "\t".join(cols)
    (mbeir / TSV).write_text("\n".join(tsv) + "\n")
    train = rows(mbeir / TRAIN)
    text_query = next(r for r in train if r["query_modality"] == "text" and r["task_id"] == 1)
    train.append({**text_query, "qid": "../../../escaped:1"})  # a dataset id (the qid's prefix) names a folder too
    train.append({**text_query, "qid": "10:9001", "task_id": "../../x"})
    write_rows(mbeir / TRAIN, train)
    out = tmp_path / "deep" / "er" / "out"  # deep enough that `../../../x` from OUT/train/ is still in tmp_path
    out.parent.mkdir(parents=True)
    before = tree(tmp_path, out)
    report = convert(str(mbeir), str(out))
    assert tree(tmp_path, out) == before
    assert report["problems"]["unsafe_name"] == 2 and report["problems"]["bad_task_id"] == 1
    assert named(report, "unsafe_name", mbeir / TSV, 2)
    assert named(report, "unsafe_name", mbeir / TRAIN, len(train) - 1)
    assert named(report, "bad_task_id", mbeir / TRAIN, len(train))
    assert all(SAFE_NAME.fullmatch(p.name) for p in out.rglob("*") if p.is_dir())
    balanced(report)

    # Names that make the layout itself, not a record: the run stops with one line.
    with pytest.raises(LamraError, match="is not a split name") as err:
        convert(str(mbeir), str(out), splits=("../../../escaped",))
    assert "\n" not in str(err.value)
    pool = mbeir / "cand_pool/local/mbeir_emoji_task0_cand_pool.jsonl"
    shutil.copy(pool, mbeir / "cand_pool/local/mbeir_.._task0_cand_pool.jsonl")
    shutil.copy(mbeir / TEST0, mbeir / "query/test/mbeir_.._task0_test.jsonl")
    before = tree(tmp_path, out)
    with pytest.raises(LamraError, match=r"mbeir_\.\._task0_test\.jsonl: expected a name like") as err:
        convert(str(mbeir), str(out))
    assert "\n" not in str(err.value)
    assert tree(tmp_path, out) == before
    finding(
        "`../` in a dataset name, a qid's dataset id, a task_id, a `--splits` value, an evaluation file's name",
        "nothing is created outside `--out` (the tree beside it is unchanged): records skipped and counted "
        "(`unsafe_name`, `bad_task_id`) naming file:line; names of the layout itself stop the run with one line",
    )


# ------------------------------------------------------------------------------------------------- duplicates
def test_duplicate_candidate_ids_keep_the_first_and_count_the_rest(mbeir, tmp_path, finding):
    pool = rows(mbeir / POOL)
    pool.append(pool[2])  # the same candidate again, same content
    pool.append({"did": pool[3]["did"], "txt": "another text", "img_path": None, "modality": "text"})
    write_rows(mbeir / POOL, pool)
    local = mbeir / "cand_pool/local/mbeir_emoji_task0_cand_pool.jsonl"
    local_rows = rows(local)
    changed = local_rows[0]["did"]
    local_rows[0]["img_path"] = pool[0]["img_path"]  # the union test pool, read first, has it with another image
    write_rows(local, local_rows)
    out = tmp_path / "out"
    report = convert(str(mbeir), str(out))
    assert report["problems"]["duplicate_candidate"] == 1 and named(report, "duplicate_candidate", mbeir / POOL, 20)
    assert report["problems"]["conflicting_candidate"] == 2
    assert named(report, "conflicting_candidate", mbeir / POOL, 21)
    assert named(report, "conflicting_candidate", local, 1)
    assert report["repeated"]["candidates_in_several_pools"] > 0  # the local pools repeat the union pools: no problem
    ids = (out / "train_pool/ids.txt").read_text().splitlines()
    assert len(ids) == len(set(ids)) == len(pool) - 2
    stored = {c.id: c for c in map(decode_candidate, read_samples(expand_shards(str(out / "train_pool"))))}
    assert stored[pool[3]["did"]].text == pool[3]["txt"] and stored[pool[3]["did"]].image is not None  # the first
    assert changed not in (out / "eval/test/emoji_task0/pool/ids.txt").read_text().splitlines()
    balanced(report)
    finding(
        "a candidate id twice: with the same content in one file; with other content (same and another pool file)",
        "the first is kept; the later line is counted (`duplicate_candidate`, `conflicting_candidate`) naming "
        "file:line; a candidate repeated by M-BEIR's local pools is not a problem",
    )


def test_duplicate_queries_keep_the_first(mbeir, tmp_path, finding):
    test = rows(mbeir / TEST0)
    test += [test[0], {**test[1], "query_txt": "something else"}]
    write_rows(mbeir / TEST0, test)
    train = rows(mbeir / TRAIN)
    train += [train[0], {**train[2], "query_txt": "not the same"}]
    write_rows(mbeir / TRAIN, train)
    out = tmp_path / "out"
    report = convert(str(mbeir), str(out))
    assert report["problems"]["duplicate_query"] == 3
    for file, line in ((TEST0, len(test) - 1), (TEST0, len(test)), (TRAIN, len(train))):
        assert named(report, "duplicate_query", mbeir / file, line)
    records = [decode_record(s) for s in read_samples(expand_shards(str(out / "eval/test/emoji_task0/queries")))]
    assert sorted(r.qid for r in records) == sorted(q["qid"] for q in test[:-2])
    assert next(r for r in records if r.qid == test[1]["qid"]).query.text == test[1]["query_txt"]
    # M-BEIR's union training file repeats rows on purpose (up-sampling): an identical row is kept and counted.
    assert report["repeated"]["train_queries_upsampled"] == 1 and report["written"]["train_queries"] == len(train) - 1
    balanced(report)
    finding(
        "a qid twice in a query file (same row, other row)",
        "evaluation: the first kept, later counted (`duplicate_query`) naming file:line; training: an identical row "
        "is M-BEIR's up-sampling, kept and counted (`repeated`), another row is `duplicate_query`",
    )


# ------------------------------------------------------------------------------------------------- malformed values
MALFORMED: dict[str, tuple[str, int, list[Any], str]] = {
    "pos_cand_list": (
        TRAIN,
        QUERY_LINE,
        [5, None, "10:28", [None], [["10:28"]], [True], [1.5], ["10 28"], ["10:\ud800"]],
        "bad_value",
    ),
    "neg_cand_list": (TRAIN, QUERY_LINE, ["10:29", 7, {"a": 1}, [None], [""], ["\udcff"]], "bad_value"),
    "qid": (TRAIN, QUERY_LINE, [None, 1.5, True, ["10:30"], {"id": 1}, "", "10:30\n10:31", "10:\ud800"], "bad_value"),
    "query_txt": (TRAIN, QUERY_LINE, [5, ["light"], {"t": "x"}, True, "light \ud800"], "bad_value"),
    "query_img_path": (TRAIN, QUERY_LINE, [7, ["a.png"], "", True, "mbeir_images/\ud800.png"], "bad_value"),
    "query_modality": (TRAIN, QUERY_LINE, [1, ["text"], None], "bad_value"),
    "task_id": (TRAIN, QUERY_LINE, ["0", 9, -1, 1.0, True, "../x"], "bad_task_id"),
    "did": (POOL, CANDIDATE_LINE, [None, [1], 1.5, True, "a b", "", "10:\ud800"], "bad_value"),
    "txt": (POOL, CANDIDATE_LINE, [5, {"t": 1}, ["x"], "\udcff"], "bad_value"),
    "img_path": (POOL, CANDIDATE_LINE, [3, [], "", "mbeir_images/\udcff.png"], "bad_value"),
    "modality": (POOL, CANDIDATE_LINE, [None, 5, ["image"]], "bad_value"),
}


@pytest.mark.parametrize("key", MALFORMED)
def test_each_malformed_value_is_a_counted_skip_naming_its_line(mbeir, tmp_path, finding, key):
    file, line, values, reason = MALFORMED[key]
    original = (mbeir / file).read_bytes()
    for i, value in enumerate(values):
        (mbeir / file).write_bytes(original)
        set_value(mbeir / file, line, key, value)
        report = convert(str(mbeir), str(tmp_path / f"out{i}"))
        assert report["problems"][reason] == 1, (key, value, report["problems"])
        assert named(report, reason, mbeir / file, line), (key, value, report["where"])
        if key == "pos_cand_list":  # a string is not read as a list of one-character ids
            assert "unknown_positive" not in report["problems"], value
        balanced(report)
        assert f"{file.rsplit('/', 1)[-1]}:{line}: " in strict_error(mbeir, tmp_path / f"strict{i}")
    finding(
        f"`{key}` of the wrong type or value in a jsonl line ({', '.join(json.dumps(v) for v in values)})",
        f"no traceback: the line is skipped and counted (`{reason}`) naming file:line; `--strict`: one-line error",
    )


def test_a_line_that_is_not_utf8_costs_only_itself(mbeir, tmp_path, finding):
    lines = (mbeir / TRAIN).read_bytes().splitlines(keepends=True)
    bad = b'{"qid": "10:777", "query_txt": "caf\xe9 \xff", "query_modality": "text", "pos_cand_list": ["10:1"]}\n'
    lines.insert(4, bad)
    (mbeir / TRAIN).write_bytes(b"".join(lines))
    with (mbeir / TSV).open("ab") as f:
        f.write(b"text\timage\t\xc3\x28bad\t10\tprompt\n")
    report = convert(str(mbeir), str(tmp_path / "out"))
    assert report["problems"] == {"not_utf8": 2}
    tsv_line = len((mbeir / TSV).read_bytes().splitlines())
    assert named(report, "not_utf8", mbeir / TRAIN, 5) and named(report, "not_utf8", mbeir / TSV, tsv_line)
    assert report["written"]["train_queries"] == len(lines) - 1  # every other line, before and after it
    balanced(report)
    assert f"query_instructions.tsv:{tsv_line}: not UTF-8" in strict_error(mbeir, tmp_path / "strict")
    finding(
        "a jsonl or tsv line that is not UTF-8",
        "that line alone is skipped and counted (`not_utf8`) naming file:line; every other line is converted",
    )


def test_a_deeply_nested_or_huge_number_line_is_a_counted_skip(mbeir, tmp_path, finding):
    train = rows(mbeir / TRAIN)
    write_rows(mbeir / TRAIN, [*train, "[" * 100_000 + "]" * 100_000, '{"qid": ' + "9" * 5000 + "}"])
    report = convert(str(mbeir), str(tmp_path / "out"))
    assert report["problems"] == {"malformed_line": 2}
    assert any("nested too deeply" in w for w in report["where"]["malformed_line"])
    assert named(report, "malformed_line", mbeir / TRAIN, len(train) + 2)
    balanced(report)
    assert "nested too deeply" in strict_error(mbeir, tmp_path / "strict")
    proc = lamra_here("convert-mbeir", f"--root={mbeir}", f"--out={tmp_path / 'cli'}", "--strict=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finding(
        "a jsonl line nested 100,000 deep (RecursionError); a 5,000-digit number",
        "skipped and counted (`malformed_line`) naming file:line; the CLI with `--strict` exits 2 with one line",
    )


# ------------------------------------------------------------------------------------------------- images
def bomb_png() -> bytes:
    """A real 1x1 PNG whose header claims 100000x100000 pixels (a decompression bomb's header)."""
    data = bytearray(png_bytes(1))
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


# An EPS file: PIL would open it (its header) and render it by running Ghostscript on the file's PostScript.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"
IMAGES = {
    "empty file": (lambda original: b"", "bad_image", {}),
    "truncated PNG": (lambda original: original[: len(original) // 2], "bad_image", {}),
    "not an image (HTML named .png)": (lambda original: b"<html>hello</html>", "bad_image", {}),
    "EPS (PostScript, rendered by Ghostscript) named .png": (lambda original: EPS, "bad_image", {}),
    "header claiming 10^10 pixels": (lambda original: bomb_png(), "oversized_image", {}),
    "100x100 over --max_image_pixels 5000": (
        lambda original: png_bytes(100),
        "oversized_image",
        {"max_image_pixels": 5000},
    ),
}


@pytest.mark.parametrize("kind", IMAGES)
def test_bad_images_are_counted_skips_at_conversion(mbeir, tmp_path, finding, monkeypatch, kind):
    change, reason, kwargs = IMAGES[kind]
    image = mbeir / rows(mbeir / POOL)[CANDIDATE_LINE - 1]["img_path"]
    image.write_bytes(change(image.read_bytes()))
    parsed_as_eps = []  # PIL opens only formats.sample.IMAGE_FORMATS: its EPS reader never sees the file
    eps_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: parsed_as_eps.append(1) or eps_open(self))
    out = tmp_path / "out"
    started = time.monotonic()
    report = convert(str(mbeir), str(out), **kwargs)
    assert time.monotonic() - started < 20  # the bomb's header is read, its pixels never decoded
    assert report["problems"][reason] >= 1 and named(report, reason, mbeir / POOL, CANDIDATE_LINE)
    assert set(report["problems"]) <= {reason, "unknown_positive", "unknown_negative", "no_positive"}
    did = rows(mbeir / POOL)[CANDIDATE_LINE - 1]["did"]
    assert did not in (out / "train_pool/ids.txt").read_text().splitlines()
    if kind not in ("empty file", "truncated PNG"):  # (a prefix of a real PNG could be another file's too)
        assert image.read_bytes() not in shard_bytes(out)
    balanced(report)
    strict_error(mbeir, tmp_path / "strict", **kwargs)
    if reason == "bad_image":  # what conversion refuses, a shard reader and `lamra-pl search --image` refuse too
        with pytest.raises(UnreadableImage):
            decode_candidate(encode_candidate("0", id="c", txt=None, image=(image.read_bytes(), "png")))
        with pytest.raises(LamraError, match="is not a readable image"):
            _image(image)
    assert parsed_as_eps == []
    finding(
        f"an image file: {kind}",
        f"checked at conversion (header first, then decoded and converted to RGB): the record is skipped and "
        f"counted (`{reason}`) naming file:line; its bytes are in no shard"
        + (
            "; PIL opens only `IMAGE_FORMATS` (never EPS: no Ghostscript run); training counts it "
            "(`unreadable_image`), `search --image` refuses it"
            if "EPS" in kind
            else ""
        ),
    )


# ------------------------------------------------------------------------------------------------- the report
def test_the_report_names_every_file_read_or_ignored_empty_tasks_and_balances(
    mbeir, tmp_path, capsys, monkeypatch, finding
):
    """A folder with a bit of everything wrong: read == written + dropped for every kind, and nothing unsaid."""
    fake = mbeir / "mbeir_images" / "fake.png"
    fake.write_bytes(b"GIF89a but not really")
    set_value(mbeir / POOL, 4, "img_path", "mbeir_images/fake.png")
    train = rows(mbeir / TRAIN)
    for r in train:
        if r["task_id"] == 1:  # every training query of task 1 loses its positives
            r["pos_cand_list"] = ["10:nowhere"]
    train[5]["neg_cand_list"] = "10:1"
    write_rows(mbeir / TRAIN, [*train, "{not json", train[0]])
    write_rows(mbeir / "query/test/mbeir_emoji_task1_test.jsonl", ["{broken"] * 3)  # no query left
    (mbeir / "cand_pool/local/mbeir_emoji_task3_cand_pool.jsonl").write_text("")  # an empty pool
    with (mbeir / "qrels/test/mbeir_emoji_task0_test_qrels.txt").open("a") as f:
        f.write("10:ghost 0 10:1 1 0\ngarbage\n")
    (mbeir / "query/val").mkdir()
    shutil.copy(mbeir / TEST0, mbeir / "query/val/mbeir_emoji_task0_val.jsonl")
    (mbeir / "query/stray.jsonl").write_text("{}\n")
    (mbeir / "cand_pool/README.txt").write_text("notes\n")
    (mbeir / "instructions/notes.tsv").write_text("a\tb\n")

    out = tmp_path / "out"
    checked: Counter[str] = Counter()  # images are decoded at conversion: once per path, however often named
    check_image = Converter.check_image
    monkeypatch.setattr(Converter, "check_image", lambda self, rel: checked.update([rel]) or check_image(self, rel))
    report = convert(str(mbeir), str(out))
    named = [r.get(k) for f in FIXTURE.rglob("*.jsonl") for r in rows(f) for k in ("img_path", "query_img_path")]
    assert set(checked.values()) == {1} and len(checked) < len([i for i in named if i])
    balanced(report)
    assert set(report["read"]) == {"instructions", "candidates", "train_queries", "test_queries", "test_qrels"}
    for reason in ("bad_image", "bad_value", "malformed_line", "no_positive", "unknown_query"):
        assert report["problems"][reason] >= 1, reason
    assert json.loads((out / "report.json").read_text()) == report
    assert not (out / INCOMPLETE).exists()

    read = set(report["inputs"]["files"])
    expected = {TSV, TRAIN, *(p.relative_to(mbeir).as_posix() for p in (mbeir / "cand_pool").rglob("*.jsonl"))}
    expected |= {p.relative_to(mbeir).as_posix() for p in (mbeir / "query/test").glob("*.jsonl")}
    expected |= {p.relative_to(mbeir).as_posix() for p in (mbeir / "qrels/test").glob("*.txt")}
    assert read == expected
    for rel, entry in report["inputs"]["files"].items():
        data = (mbeir / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert report["inputs"]["images"]["files"] > 0
    ignored = report["ignored"]
    assert ignored["query/train/mbeir_emoji_train.jsonl"] == "query/union_train/ holds the training queries"
    assert "split 'val' was not asked for" in ignored["query/val/mbeir_emoji_task0_val.jsonl"]
    assert "not in a split folder" in ignored["query/stray.jsonl"]
    assert ignored["cand_pool/README.txt"] == "not a .jsonl file"
    assert "query_instructions.tsv only" in ignored["instructions/notes.tsv"]
    assert "mbeir_images/" in ignored and "qrels/train/mbeir_emoji_train_qrels.txt" in ignored
    assert set(read) & set(ignored) == set()
    empty = {e["task"]: e["empty"] for e in report["empty_tasks"]}
    assert empty == {
        "train/emoji_task1": ["queries"],
        "eval/test/emoji_task1": ["queries"],
        "eval/test/emoji_task3": ["pool"],
    }
    printed = capsys.readouterr().out
    assert '"ignored"' in printed and '"empty_tasks"' in printed and "mbeir_emoji_train.jsonl" in printed

    proc = lamra_here("convert-mbeir", f"--root={mbeir}", f"--out={tmp_path / 'strict'}", "--strict=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    finding(
        "an M-BEIR folder with every kind of fault at once, stray files, a split not asked for, empty tasks",
        "per kind, read == written + dropped; report.json names every file read (bytes, sha256), every file "
        "ignored and why, and each task left without queries or pool; `--strict`: exit 2, one line",
    )


# ------------------------------------------------------------------------------------------------- atomic output
def complete_tar(path: Path) -> bool:
    data = path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            tar.extractfile(member).read()  # raises on a cut member
    return data.endswith(b"\0" * 2 * tarfile.BLOCKSIZE)


def refused(spec: Path | str, folder: Path) -> None:
    with pytest.raises(LamraError, match="is incomplete") as err:
        expand_shards(str(spec))
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


@pytest.mark.slow
def test_a_killed_conversion_is_never_trained_on_and_a_rerun_completes_it(mbeir, tmp_path, finding):
    from lamra_pl.data.datamodule import ShardDataModule

    # The last evaluation query file is a named pipe nobody writes: the real CLI blocks there, half-way through.
    task7 = mbeir / "query/test/mbeir_emoji_task7_test.jsonl"
    content = task7.read_bytes()
    task7.unlink()
    os.mkfifo(task7)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [LAMRA, "convert-mbeir", f"--root={mbeir}", f"--out={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        # Killed once the evaluation task before the pipe is written: shards are under OUT, the run unfinished.
        written = out / "eval/test/emoji_task3/task.json"
        deadline = time.monotonic() + 120
        while not written.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert written.exists() and proc.poll() is None, "the conversion did not get half-way"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "report.json").exists()
    entries = incomplete_entries(out)  # the shard folders' one marker format: the conversion's folders so far
    assert {w for w, _ in entries} == {"convert-mbeir"} and "eval/test/emoji_task3" in {e for _, e in entries}
    assert all(Output.owned(e) for _, e in entries)
    assert all(complete_tar(p) for p in out.rglob("*.tar"))  # a tar under its own name is whole
    refused(out / "train", out)
    refused(out / "train" / "*_task0", out)
    refused(out / "train_pool", out)
    with pytest.raises(LamraError, match="is incomplete"):
        ShardDataModule(train_shards=str(out / "train")).build_index()  # what `lamra-pl fit` reads through

    task7.unlink()
    task7.write_bytes(content)
    report = convert(str(mbeir), str(out))  # over the killed one: rewritten from scratch
    fresh = convert(str(mbeir), str(tmp_path / "fresh"))
    assert not (out / INCOMPLETE).exists() and report["written"] == {
        k.replace("fresh/", "out/"): v for k, v in fresh["written"].items()
    }
    assert tree(out, out / "report.json") == tree(tmp_path / "fresh", tmp_path / "fresh" / "report.json")
    assert len(expand_shards(str(out / "train"))) == 4
    finding(
        "`lamra-pl convert-mbeir` SIGKILLed half-way",
        "no shard under its final name is cut; the output carries an in-progress marker, so `expand_shards` "
        "(and the DataModule `fit` uses) refuse it with one line; a re-run over it yields what a fresh run does",
    )


KILL_WRITER = """
import os, signal, sys
from lamra_pl.formats.sample import encode_record
from lamra_pl.formats.shards import write_shards

def samples():
    for i in range(100):
        if i == 8:  # halfway through the second shard
            os.kill(os.getpid(), signal.SIGKILL)
        yield encode_record(f"{i:04d}", qid=f"q{i}", query={"txt": "q"}, positives=[{"id": "p", "txt": "p"}])

write_shards(samples(), sys.argv[1], maxcount=5)
"""


def test_a_writer_killed_mid_shard_leaves_no_cut_shard_and_a_refused_folder(tmp_path, finding):
    folder = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-c", KILL_WRITER, str(folder)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in folder.iterdir())
    assert (
        names[0] == INCOMPLETE and names[1].startswith(".shard-000001.tar.tmp-") and names[2:] == ["shard-000000.tar"]
    )
    assert complete_tar(folder / "shard-000000.tar")
    assert (folder / INCOMPLETE).read_text() == f"{MARKER_HEADER}\nwrite_shards shard\n"
    refused(folder, folder)
    refused(folder / "shard-000000.tar", folder)
    refused(folder / "shard-{000000..000000}.tar", folder)
    refused(tmp_path, folder)  # a folder above: the marked folder below it is found

    samples = [
        encode_record(f"{i:04d}", qid=f"q{i}", query={"txt": "q"}, positives=[{"id": "p", "txt": "p"}])
        for i in range(7)
    ]
    assert write_shards(samples, folder, maxcount=5) == {"shard-000000.tar": 5, "shard-000001.tar": 2}
    assert sorted(p.name for p in folder.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "sizes.json"]
    assert len(list(read_samples(expand_shards(str(folder))))) == 7
    finding(
        "a shard writer SIGKILLed in the middle of a shard",
        "the cut shard exists only under a temporary name; the folder's marker makes `expand_shards` refuse it "
        "with one line; writing it again leaves exactly the new shards",
    )


# ------------------------------------------------------------------------------------------------- re-runs
def test_a_rerun_with_other_inputs_rewrites_its_own_folders_only(mbeir, tmp_path, finding):
    out = tmp_path / "out"
    first = convert(str(mbeir), str(out))
    write_shards(
        [encode_record("0", qid="n:0", query={"txt": "a"}, positives=[{"id": "n:1", "txt": "b"}])],
        out / "train" / "nli_task1",
    )
    (out / "notes.txt").write_text("mine\n")
    (mbeir / "query/test/mbeir_emoji_task7_test.jsonl").unlink()
    write_rows(mbeir / TRAIN, [r for r in rows(mbeir / TRAIN) if r["task_id"] != 7])
    second = convert(str(mbeir), str(out))
    assert first["inputs"] != second["inputs"]
    assert not (out / "train/emoji_task7").exists() and not (out / "eval/test/emoji_task7").exists()
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "train/nli_task1/shard-000000.tar").is_file()
    assert second["not_written_here"] == ["train/nli_task1"]
    assert "eval/test/emoji_task7" in first["outputs"] and "eval/test/emoji_task7" not in second["outputs"]

    # An output folder whose report.json is not this tool's (or lists paths outside it) is refused, untouched.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    for forged in ({"read": {}}, {"format": "lamra-pl-mbeir-conversion", "outputs": ["../victim"]}):
        other = tmp_path / f"other{len(json.dumps(forged))}"
        other.mkdir()
        (other / "report.json").write_text(json.dumps(forged))
        with pytest.raises(LamraError, match="is not a report of a convert-mbeir conversion") as err:
            convert(str(mbeir), str(other))
        assert "\n" not in str(err.value) and (victim / "keep.txt").read_text() == "keep"
    finding(
        "`convert-mbeir` again over a finished output, with other inputs; over a folder with a foreign or forged "
        "report.json",
        "the folders the earlier run listed are rewritten from scratch (a dropped task's folders are gone), other "
        "folders are left and listed; a foreign or forged report.json is refused with one line, nothing deleted",
    )


def test_a_rerun_over_an_earlier_versions_output_rewrites_it(mbeir, tmp_path, finding):
    """`make emoji` / `make convert-mbeir` again over the DATA folder of a lamra-pl whose report.json has no format
    and lists no outputs (4ccdac6's: read, written, dropped, problems)."""
    out = tmp_path / "data"
    shutil.copytree(LEGACY_DATA, out)
    assert "format" not in json.loads((out / "report.json").read_text())
    stale = out / "eval/test/emoji_task5"  # a task of the earlier conversion that this one does not write
    shutil.copytree(out / "eval/test/emoji_task0", stale)
    stale_train = out / "train/emoji_task5"
    shutil.copytree(out / "eval/test/emoji_task0", stale_train)  # a training folder: it has a task.json
    nli = out / "train/nli_task1"  # `convert-nli`'s, beside it in DATA (no task.json): not the conversion's
    write_shards([encode_record("0", qid="n:0", query={"txt": "a"}, positives=[{"id": "n:1", "txt": "b"}])], nli)
    report = convert(str(mbeir), str(out))
    fresh = convert(str(mbeir), str(tmp_path / "fresh"))
    assert not stale.exists() and not stale_train.exists() and (nli / "shard-000000.tar").is_file()
    assert report["not_written_here"] == ["train/nli_task1"] and report["outputs"] == fresh["outputs"]
    assert tree(out, nli) - {"train/nli_task1"} == tree(tmp_path / "fresh", tmp_path / "fresh" / "x")
    assert not (out / INCOMPLETE).exists() and len(expand_shards(str(out / "eval/test/emoji_task0/pool"))) == 1
    finding(
        "`convert-mbeir` again over the output of an earlier lamra-pl (a report.json without format or outputs)",
        "recognised by its counts: its train_pool, eval/<split>/<task> and train/<task> folders with a task.json are "
        "rewritten from scratch (a task no longer in the data is gone); convert-nli's folder beside them is left",
    )
