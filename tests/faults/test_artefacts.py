"""Artefacts under faults: an index resumed over other inputs, a task whose pool is empty, run folders and indexes
moved away from where they were written, a runs.json whose task names are paths. Real tiny model, real shards, the
shipped commands (in this process)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, clean_error, lamra_here, ok
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_manifest, write_manifest
from lamra_pl.formats.sample import encode_candidate
from lamra_pl.formats.shards import write_shards
from lamra_pl.recipes.mbeir import convert

FIXTURE = ROOT / "tests" / "fixtures" / "mbeir_tiny"
POOLS = ("local", "global")
WORDS = ("red", "green", "blue", "apple", "rocket", "flag", "cat", "dog", "pizza", "wave", "heart", "star")
SHARD = "shard-{:06d}.tar"


def index_args(model: Path, pool: Path, out: Path) -> list[str]:
    return ["index", f"--model={model}", f"--pool={pool}", f"--out={out}", "--batch_size=4", "--num_workers=0"]


def metrics(results: dict, like: dict | None = None) -> dict:
    """results.json without the paths it names (they say where the files were read from); with `like`, an older
    results.json, only the fields each of its tasks has (newer files name the task as M-BEIR does, and chance)."""
    keep = {name: set(t) for name, t in like["tasks"].items()} if like is not None else None
    tasks = {
        name: {k: v for k, v in t.items() if not k.endswith("_file") and (keep is None or k in keep.get(name, ()))}
        for name, t in results["tasks"].items()
    }
    return {"pool": results["pool"], "tasks": tasks, "average": results["average"]}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The mbeir_tiny fixture converted, its global test pool indexed, both pool settings retrieved and evaluated,
    every command run in `root` with paths relative to it."""
    root = tmp_path_factory.mktemp("artefacts") / "project"
    root.mkdir()
    convert(str(FIXTURE), str(root / "data"))
    model = Path(tiny_backbone)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        ok(lamra_here(*index_args(model, Path("data/eval/test/global_pool"), Path("index"))))
        queries = "--queries=data/eval/test/*_task*"
        ok(
            lamra_here(
                "retrieve", f"--model={model}", "--index=index", queries, "--out=runs", "--k=10", "--num_workers=0"
            )
        )
        for pool in POOLS:
            ok(lamra_here("evaluate", f"--runs=runs/{pool}"))
    return {"root": root, "model": model}


# ------------------------------------------------------------------------------------------ index resume
def candidates(first: int, n: int, tag: str = "") -> list[dict]:
    """Text candidates c:first.. of mixed lengths (`tag` before each text)."""
    texts = {i: tag + " ".join(WORDS[(i * j) % len(WORDS)] for j in range(2 + i % 5)) for i in range(first, first + n)}
    return [encode_candidate(f"{i:06d}", id=f"c:{i}", txt=text, image=None) for i, text in texts.items()]


def shard(folder: Path, number: int, samples: list[dict]) -> Path:
    """`samples` written as shard `number` of `folder` (through a scratch folder: one shard, then renamed)."""
    scratch = folder.parent / f".scratch-{folder.name}-{number}"
    write_shards(samples, scratch, maxcount=len(samples))
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SHARD.format(number)
    shutil.move(scratch / SHARD.format(0), target)
    shutil.rmtree(scratch)
    return target


@pytest.fixture
def pools(tmp_path) -> dict[str, Path]:
    """good: 4 shards of 4 text candidates. broken: the same, but shard 3 ends in a candidate whose image is not an
    image (shards 0-2 are good's, byte for byte). other: 2 shards of other candidates."""
    good, broken, other = tmp_path / "good", tmp_path / "broken", tmp_path / "other"
    for number in range(4):
        shard(good, number, candidates(4 * number, 4))
    broken.mkdir()
    for number in range(3):
        shutil.copy(good / SHARD.format(number), broken / SHARD.format(number))
    for number in range(2):
        shard(other, number, candidates(100 + 4 * number, 4, tag="other "))
    bad = encode_candidate("000015", id="c:15", txt=None, image=(b"\x89PNG\r\n\x1a\n not an image", "png"))
    shard(broken, 3, [*candidates(12, 3), bad])
    return {"good": good, "broken": broken, "other": other}


def half_index(model: Path, pool: Path, out: Path) -> dict[str, bytes]:
    """An index of `pool` stopped by its broken last shard: parts/ with the first chunks (the loader reads a batch
    ahead, so the chunk before the broken one may be missing); returns parts/'s files."""
    clean_error(lamra_here(*index_args(model, pool, out)), "not a readable image")
    parts = out / "parts"
    done = sorted(p.name for p in parts.glob("chunk-*.npy"))
    assert done[:1] == ["chunk-000000.npy"] and len(done) < 4, done
    assert not (out / "index.json").exists()
    return files(parts)


def test_an_index_resumed_over_another_pool_is_refused_and_its_parts_are_kept(
    tiny_backbone, pools, built, tmp_path, finding
):
    out = tmp_path / "index"
    kept = half_index(tiny_backbone, pools["broken"], out)
    proc = lamra_here(*index_args(tiny_backbone, pools["other"], out))
    clean_error(proc, f"{out / 'parts'} was started on pool {pools['broken']} (4 shards)", f"reads {pools['other']}")
    clean_error(proc, f"delete {out}", "(2 shards)")
    assert files(out / "parts") == kept and not (out / "index.json").exists()
    finding(
        "`lamra-pl index` resumed over a half-written index of another pool",
        "refused with one line naming the parts, both pools and their shard counts; parts/ byte-identical, no index",
    )
    # A finished index, re-run with another pool: refused, unchanged.
    index = built["root"] / "index"
    before = files(index)
    task_pool = built["root"] / "data/eval/test/emoji_task0/pool"
    clean_error(lamra_here(*index_args(tiny_backbone, task_pool, index)), "already holds an index of", "inputs differ")
    assert files(index) == before
    finding(
        "`lamra-pl index` into a finished index of another pool",
        "refused with one line (its `inputs` digest differs); the index is byte-identical",
    )


def test_an_index_resumed_after_its_shards_changed(tiny_backbone, pools, tmp_path, finding):
    out, broken = tmp_path / "index", pools["broken"]
    kept = half_index(tiny_backbone, broken, out)
    # Shard 0, already encoded, is rewritten (other texts, the same size in 10 KiB tar records).
    original = (broken / SHARD.format(0)).read_bytes()
    shard(broken, 0, candidates(0, 4, tag="edited "))
    assert (broken / SHARD.format(0)).read_bytes() != original
    proc = lamra_here(*index_args(tiny_backbone, broken, out))
    clean_error(proc, f"the shards of {broken} changed", f"{SHARD.format(0)} changed after it was encoded", "same size")
    assert files(out / "parts") == kept and not (out / "index.json").exists()
    # A shard added is refused too.
    shard(broken, 4, candidates(50, 2))
    clean_error(
        lamra_here(*index_args(tiny_backbone, broken, out)), "4 shards then, 5 now", f"added '{SHARD.format(4)}'"
    )
    assert files(out / "parts") == kept
    finding(
        "`lamra-pl index` resumed after an encoded shard was rewritten (same size), or a shard was added",
        "refused with one line naming the shard; parts/ byte-identical, no index",
    )
    # Shard 0 back, shard 4 gone, and the broken shard 3 (never encoded) fixed: the resume goes on, and equals
    # an uninterrupted index of the fixed pool.
    (broken / SHARD.format(0)).write_bytes(original)
    (broken / SHARD.format(4)).unlink()
    shutil.copy(pools["good"] / SHARD.format(3), broken / SHARD.format(3))
    ok(lamra_here(*index_args(tiny_backbone, broken, out)))
    whole = tmp_path / "whole"
    ok(lamra_here(*index_args(tiny_backbone, pools["good"], whole)))
    for name in ("embeddings.npy", "ids.txt", "items.jsonl"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    resumed, fresh = (json.loads((f / "index.json").read_text()) for f in (out, whole))
    assert resumed["inputs"] == fresh["inputs"] and resumed["inputs"].startswith("sha256:")
    finding(
        "`lamra-pl index` resumed after the shard that stopped it (not yet encoded) was fixed",
        "goes on: the index equals an uninterrupted one of the fixed pool, byte for byte, with the same `inputs`",
    )


# ------------------------------------------------------------------------------------------- empty pool
def test_a_task_with_an_empty_pool_is_refused_before_the_model_is_loaded(built, tmp_path, finding):
    task = tmp_path / "tasks" / "emoji_task0"
    shutil.copytree(built["root"] / "data/eval/test/emoji_task0", task)
    for path in (task / "pool").iterdir():
        path.unlink()
    (task / "pool" / "ids.txt").write_text("\n  \n")  # blank lines list no candidate either
    out, index, model = tmp_path / "runs", built["root"] / "index", built["model"]
    retrieve = ("retrieve", f"--index={index}", f"--queries={task}", f"--out={out}", "--num_workers=0")
    clean_error(lamra_here(*retrieve, f"--model={model}"), f"task {task}:", "local pool", "is empty", "--pools")
    assert not out.exists()
    # Before the model: a model path that does not exist is not even looked at.
    clean_error(lamra_here(*retrieve, f"--model={tmp_path / 'no-model'}"), f"task {task}:", "is empty")
    proc = lamra_here(*index_args(tmp_path / "no-model", task / "pool", tmp_path / "index"))
    clean_error(proc, f"pool {task / 'pool'} (the local pool of task {task}) is empty")
    assert not (tmp_path / "index").exists()
    finding(
        "`lamra-pl retrieve` (local pool) or `index` on a task whose pool/ids.txt is empty",
        "refused with one line naming the task folder, before the model is loaded; nothing written",
    )
    # The global setting does not search the task's pool: it runs.
    ok(lamra_here(*retrieve, f"--model={model}", "--pools=[global]", "--k=5"))
    assert (out / "global" / "emoji_task0.run").is_file() and not (out / "local").exists()


# ----------------------------------------------------------------------------------------- moved folders
def test_a_moved_run_folder_evaluates_from_another_directory_as_before(built, tmp_path, monkeypatch, finding):
    root, model = built["root"], built["model"]
    before = {pool: json.loads((root / "runs" / pool / "results.json").read_text()) for pool in POOLS}
    stored = json.loads((root / "runs/local/runs.json").read_text())
    assert stored["paths"] == "relative to the run folder" and stored["index"] == "../../index"
    assert stored["tasks"]["emoji_task0"]["qrels_file"] == "../../data/eval/test/emoji_task0/qrels.txt"
    moved = tmp_path / "elsewhere" / "project"
    shutil.move(root, moved)  # nothing is left where the folders were written
    try:
        monkeypatch.chdir(tmp_path)
        for pool in POOLS:
            ok(lamra_here("evaluate", f"--runs={moved / 'runs' / pool}"))
            after = json.loads((moved / "runs" / pool / "results.json").read_text())
            assert metrics(after) == metrics(before[pool]) and "wrong_modality@10" in after["average"]
            assert all(t["qrels_file"].startswith(str(moved)) for t in after["tasks"].values())
        finding(
            "a run folder moved with its data and index, evaluated from another working directory",
            "every task's Recall@K and modality bias equal the numbers before the move",
        )
        # The run folder alone, its data elsewhere: a one-line error that says how to name them; then the same.
        alone = tmp_path / "alone"
        shutil.copytree(moved / "runs" / "local", alone, ignore=shutil.ignore_patterns("events.*", "results*"))
        shutil.move(moved / "runs", tmp_path / "runs-away")
        clean_error(lamra_here("evaluate", f"--runs={alone}"), "emoji_task", "--tasks")
        given = (f"--tasks={moved / 'data/eval/test'}", f"--index={moved / 'index'}")
        ok(lamra_here("evaluate", f"--runs={alone}", *given))
        assert metrics(json.loads((alone / "results.json").read_text())) == metrics(before["local"])
        shutil.move(tmp_path / "runs-away", moved / "runs")
        finding(
            "a run folder copied away from its data and index",
            "`evaluate` names the missing task folder and `--tasks`; with `--tasks --index` the same numbers",
        )
        # The moved index: its pool is found where it went, it searches, and indexing the moved pool again is a
        # no-op (the same inputs, wherever they are).
        index = EmbeddingIndex(moved / "index")
        assert index.meta["sources"] == [str(moved / "data/eval/test/global_pool")]
        text = next(i for i in index.items(list(range(len(index)))) if i["txt"] and not i["img"])
        found = ok(lamra_here("search", f"--model={model}", f"--index={index.path}", f"--text={text['txt']}", "--k=1"))
        assert text["id"] in found.stdout
        kept = files(index.path)
        ok(lamra_here(*index_args(model, moved / "data/eval/test/global_pool", index.path)))
        assert files(index.path) == kept
        finding(
            "an index moved with its pool",
            "searches; its `sources` resolve to the moved pool; `index` over the moved pool again changes nothing",
        )
    finally:
        if (tmp_path / "runs-away").exists():
            shutil.move(tmp_path / "runs-away", moved / "runs")
        shutil.move(moved, root)


def test_a_legacy_run_folder_moved_with_its_tree_evaluates_from_another_directory(tmp_path, monkeypatch, finding):
    """runs.json written before its paths were relative to the run folder (relative to the repository root, there)
    still evaluates when the tree moved: its paths are found from the run folder's place."""
    legacy = Path("tests/fixtures/legacy_4ccdac6")
    tree = tmp_path / "checkout"
    for part in ("data", "index", "runs"):
        shutil.copytree(ROOT / legacy / part, tree / legacy / part, ignore=shutil.ignore_patterns("events.*"))
    monkeypatch.chdir(tmp_path)  # where none of the stored paths exists
    for pool in POOLS:
        runs = tree / legacy / "runs" / pool
        old = json.loads(runs.joinpath("results.json").read_text())
        ok(lamra_here("evaluate", f"--runs={runs}"))
        new = json.loads(runs.joinpath("results.json").read_text())
        assert metrics(new, like=old) == metrics(old) and "wrong_modality@10" in new["average"]
        assert all(t["run_file"].startswith(str(tree)) for t in new["tasks"].values())
    finding(
        "a run folder of an earlier version (paths relative to its working directory) moved with its tree",
        "evaluated from elsewhere, its paths are found from the run folder's place; the numbers it wrote",
    )


# ------------------------------------------------------------------------------------ names from runs.json
def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder below `folder`: relative path -> bytes (None: a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_a_task_name_in_runs_json_cannot_write_or_delete_outside_out(built, tmp_path, finding):
    """`rerank`, `rerank-data` and `mine` name their output after runs.json's tasks (OUT/<task>/, OUT/<task>.run, and
    `rerank-data` deletes OUT/<task>/ when its run file does not fit its queries): a task name that is a path is
    refused when runs.json is read, before anything is written."""
    manifest = read_manifest(built["root"] / "runs" / "global")  # its paths resolved: absolute
    entry = manifest["tasks"]["emoji_task0"]
    work, escape = tmp_path / "work", tmp_path / "escape"
    escape.mkdir()
    (escape / "shard-000000.tar").write_bytes(b"not ours: write_shards would replace it")
    (escape / "keep.txt").write_text("keep")
    out = work / "out"
    commands = {
        "rerank-data": ["rerank-data"],
        "mine": ["mine", "--strategy=topk", "--c1=1", "--c2=0"],
        "rerank": ["rerank", f"--model={tmp_path / 'no-model'}"],
    }
    for name in ("../../escape", str(escape), "emoji_task0/../../../escape"):
        runs = tmp_path / "crafted"
        runs.mkdir(exist_ok=True)
        write_manifest(runs, {**manifest, "tasks": {name: entry}})
        before = tree(tmp_path)
        for command, args in commands.items():
            proc = lamra_here(*args, f"--runs={runs}", f"--out={out}")
            clean_error(proc, str(runs / "runs.json"), f"task {name!r} is not a plain name")
            assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, (command, proc.stderr)
            assert tree(tmp_path) == before, (command, name)  # nothing written or deleted, in --out or outside it
    assert not out.exists()
    finding(
        "a runs.json whose task name is a path (`../../escape`, an absolute path, `task/../../..`)",
        "`rerank`, `rerank-data` and `mine` exit 2 with one line naming runs.json and the task, before the model "
        "is loaded; nothing is written or deleted, outside --out or in it",
    )
