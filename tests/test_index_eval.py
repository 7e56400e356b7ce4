"""`lamra-pl index / retrieve / evaluate / search` on the converted fixture: resume, exactness, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import LAMRA, ROOT, clean_error, lamra, lamra_here, ok, scalars
from lamra_pl.api import Retriever
from lamra_pl.errors import LamraError
from lamra_pl.formats import read_json
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import encode_candidate
from lamra_pl.formats.shards import write_shards
from lamra_pl.formats.task import read_qrels
from lamra_pl.ranking.search import unit_rows
from lamra_pl.recipes.mbeir import convert
from lamra_pl.testing.tiny import build_tiny_qwen2vl

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


@pytest.fixture(scope="module")
def evaluated(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The fixture converted, its global test pool indexed, both pool settings retrieved and evaluated."""
    root = tmp_path_factory.mktemp("eval")
    data, index, runs = root / "data", root / "index", root / "runs"
    convert(str(FIXTURE), str(data))
    model = str(tiny_backbone)
    ok(lamra("index", f"--model={model}", f"--pool={data}/eval/test/global_pool", f"--out={index}", "--batch_size=4"))
    queries = f"{data}/eval/test/*_task*"
    ok(lamra("retrieve", f"--model={model}", f"--index={index}", f"--queries={queries}", f"--out={runs}", "--k=10"))
    for pool in ("local", "global"):
        ok(lamra_here("evaluate", f"--runs={runs / pool}"))
    return {"data": data, "index": index, "runs": runs, "model": Path(model)}


def test_index_format_is_documented_and_memory_mappable(evaluated):
    index = EmbeddingIndex(evaluated["index"])
    meta = json.loads((evaluated["index"] / "index.json").read_text())
    embeddings = np.load(evaluated["index"] / "embeddings.npy", mmap_mode="r")
    pool_ids = (evaluated["data"] / "eval/test/global_pool/ids.txt").read_text().splitlines()
    assert embeddings.dtype == np.float16 and embeddings.shape == (meta["count"], meta["dim"]) == (len(pool_ids), 64)
    assert index.ids == pool_ids  # rows in shard order
    assert not (evaluated["index"] / "parts").exists()
    items = index.items([0, len(index) - 1])
    assert [i["id"] for i in items] == [pool_ids[0], pool_ids[-1]]
    images = [i["img"] for i in index.items(list(range(len(index)))) if i["img"]]
    assert images and all(i.startswith("mbeir_images/") for i in images)  # the source path, for display
    # Each row is its candidate's embedding: encoding items one by one agrees to float16 precision.
    retriever = Retriever.from_checkpoint(evaluated["model"])
    texts = [(row, i["txt"]) for row, i in enumerate(index.items(list(range(len(index))))) if not i["img"]]
    direct = retriever.encode(texts=[t for _, t in texts])
    np.testing.assert_allclose(embeddings[[r for r, _ in texts]].astype(np.float32), direct, atol=2e-3)


def hand_recall(evaluated: dict[str, Path], task: str, pool: str, k: int) -> float:
    """From the stored embeddings: float64 scores, sort by (score desc, id), any positive in the top k."""
    index = EmbeddingIndex(evaluated["index"])
    queries = EmbeddingIndex(evaluated["runs"] / "queries" / task)
    qrels = read_qrels(evaluated["data"] / "eval/test" / task / "qrels.txt")
    if pool == "local":
        local = set((evaluated["data"] / "eval/test" / task / "pool/ids.txt").read_text().split())
        rows = [r for r, i in enumerate(index.ids) if i in local]
    else:
        rows = list(range(len(index)))
    c = unit_rows(index.embeddings, np.float64)
    hits = 0
    for q, qid in zip(unit_rows(queries.embeddings, np.float64), queries.ids, strict=True):
        ranked = sorted(rows, key=lambda r: (-float((c[r] * q).sum()), index.ids[r]))
        hits += any(index.ids[r] in qrels[qid] for r in ranked[:k])
    return hits / len(queries)


@pytest.mark.parametrize("pool", ["local", "global"])
def test_evaluation_equals_a_hand_computation(evaluated, pool):
    results = json.loads((evaluated["runs"] / pool / "results.json").read_text())
    assert set(results["tasks"]) == {"emoji_task0", "emoji_task1", "emoji_task3", "emoji_task7"}
    for task, got in results["tasks"].items():
        for k in (1, 5, 10):
            assert got[f"R@{k}"] == pytest.approx(hand_recall(evaluated, task, pool, k), abs=1e-12), (task, k)
        assert Path(got["run_file"]).is_file() and Path(got["qrels_file"]).name == "qrels.txt"
        assert got["num_queries"] == len(read_run_file(got["run_file"]).qids) and got["reported"] == "R@5"
        run = read_run_file(got["run_file"])
        assert all(len(r) == min(10, len(EmbeddingIndex(evaluated["index"]))) for r in run.ranked) or pool == "local"
    average = results["average"]
    assert average["R@1"] == pytest.approx(np.mean([t["R@1"] for t in results["tasks"].values()]))
    assert (evaluated["runs"] / pool / "results.md").read_text().startswith("| task | queries |")
    logged = scalars(evaluated["runs"] / pool)
    assert logged[f"eval_{pool}/average/R@5"][0][1] == pytest.approx(average["R@5"])


def trec_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A qrels file read as pytrec_eval's `parse_qrel` and ir_measures' TREC reader read it: exactly four
    whitespace-separated columns, `query_id iteration doc_id relevance` (M-BEIR's fifth column fails here)."""
    qrels: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        query_id, _, doc_id, relevance = line.split()
        assert doc_id not in qrels.setdefault(query_id, {})
        qrels[query_id][doc_id] = int(relevance)
    return qrels


def trec_run(path: Path) -> dict[str, dict[str, float]]:
    """A run file read as pytrec_eval's `parse_run` reads it: `query_id Q0 doc_id rank score tag`."""
    run: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        query_id, _, doc_id, _, score, _ = line.split()
        run.setdefault(query_id, {})[doc_id] = float(score)
    return run


@pytest.mark.parametrize("pool", ["local", "global"])
def test_trec_tools_read_the_qrels_and_runs_and_score_them_as_lamra_pl_does(evaluated, pool):
    results = json.loads((evaluated["runs"] / pool / "results.json").read_text())
    for task, got in results["tasks"].items():
        folder = evaluated["data"] / "eval/test" / task
        with pytest.raises(ValueError, match="too many values to unpack"):
            trec_qrels(folder / "qrels.txt")  # M-BEIR's five columns: why the four-column file is there
        qrels = trec_qrels(folder / "qrels.trec")
        assert {q: set(docs) for q, docs in qrels.items()} == read_qrels(folder / "qrels.txt")
        run = trec_run(Path(got["run_file"]))
        for k in (1, 5, 10):  # the hit rate from the TREC files, ranked by score as trec_eval does (ties by id)
            top = {q: sorted(docs, key=lambda d: (-docs[d], d))[:k] for q, docs in run.items()}
            hits = [any(qrels[q].get(d, 0) > 0 for d in top[q]) for q in qrels]
            assert np.mean(hits) == pytest.approx(got[f"R@{k}"], abs=1e-12), (task, k)


def test_results_name_each_task_as_mbeir_does_and_hold_chance_as_numbers(evaluated):
    from lamra_pl.pipelines.evaluate import chance

    tool = chance(f"{evaluated['data']}/eval/test/*_task*")  # `lamra-pl chance`: each task's local pool
    global_pool = len((evaluated["data"] / "eval/test/global_pool/ids.txt").read_text().split())
    for pool in ("local", "global"):
        results = json.loads((evaluated["runs"] / pool / "results.json").read_text())
        for task, got in results["tasks"].items():
            assert (got["dataset_id"], got["task_id"], got["mbeir_name"]) == (10, int(task[-1]), f"mbeir_{task}")
            assert set(got["chance"]) == {"R@1", "R@5", "R@10"}
            assert all(type(v) is float and 0 < v <= 1 for v in got["chance"].values())
            if pool == "local":
                assert got["chance"] == pytest.approx(tool[task], abs=1e-12)
            else:  # R@1 of a random ranking: the share of the pool that is positive, per query
                positives = read_qrels(evaluated["data"] / "eval/test" / task / "qrels.txt")
                want = np.mean([len(positives[q]) / global_pool for q in read_run_file(got["run_file"]).qids])
                assert got["chance"]["R@1"] == pytest.approx(want, abs=1e-12)
        # A model folder has no training step: its numbers are drawn at step 0.
        logged = scalars(evaluated["runs"] / pool)
        assert {points[0][0] for points in logged.values()} == {0}


def test_evaluation_twice_gives_identical_numbers(evaluated, tmp_path):
    again = tmp_path / "runs"
    model, index, data = evaluated["model"], evaluated["index"], evaluated["data"]
    queries = f"{data}/eval/test/*_task*"
    ok(
        lamra_here(
            "retrieve", f"--model={model}", f"--index={index}", f"--queries={queries}", f"--out={again}", "--k=10"
        )
    )
    ok(lamra_here("evaluate", f"--runs={again / 'local'}"))
    for task in ("emoji_task0", "emoji_task7"):
        assert (again / "local" / f"{task}.run").read_bytes() == (
            evaluated["runs"] / "local" / f"{task}.run"
        ).read_bytes()
    first = json.loads((evaluated["runs"] / "local" / "results.json").read_text())
    second = json.loads((again / "local" / "results.json").read_text())
    assert {t: {k: v for k, v in r.items() if k != "run_file"} for t, r in first["tasks"].items()} == {
        t: {k: v for k, v in r.items() if k != "run_file"} for t, r in second["tasks"].items()
    }
    assert first["average"] == second["average"]


def test_validate_runs_the_same_evaluation_on_task_pools(evaluated, tmp_path):
    proc = ok(
        lamra(
            "validate",
            "-c",
            "experiments/tiny/stage2_instruct.yaml",
            f"--model.init_args.backbone.path={evaluated['model']}",
            f"--data.init_args.val_tasks={evaluated['data']}/eval/test/*_task*",
            "--data.init_args.eval_batch_size=32",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        )
    )
    assert "val/average/R@5" in proc.stdout
    logged = scalars(next(tmp_path.rglob("events.out.tfevents*")).parent)
    local = json.loads((evaluated["runs"] / "local" / "results.json").read_text())
    for task, got in local["tasks"].items():
        for k in (1, 5, 10):
            assert logged[f"val/{task}/R@{k}"][-1][1] == pytest.approx(got[f"R@{k}"]), (task, k)


def test_search_command_and_python_api(evaluated):
    index = EmbeddingIndex(evaluated["index"])
    item = next(i for i in index.items(list(range(len(index)))) if i["txt"] and not i["img"])
    hits = Retriever.from_checkpoint(evaluated["model"]).search(index, query_text=item["txt"], k=3)
    assert (
        [h.rank for h in hits] == [1, 2, 3] and hits[0].id == item["id"] and hits[0].score == pytest.approx(1, abs=1e-3)
    )
    assert hits[0].score >= hits[1].score >= hits[2].score
    image = next(FIXTURE.rglob("*.png"))
    proc = ok(
        lamra_here("search", f"--model={evaluated['model']}", f"--index={index.path}", f"--text={item['txt']}", "--k=3")
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and item["id"] in lines[0] and item["txt"] in lines[0]
    proc = ok(
        lamra_here("search", f"--model={evaluated['model']}", f"--index={index.path}", f"--image={image}", "--k=2")
    )
    assert sum(line.strip()[:1].isdigit() for line in proc.stdout.splitlines()) == 2


# ------------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def long_pool(tmp_path_factory) -> Path:
    """40 shards of 5 text candidates of mixed lengths: enough chunks to kill an index run in the middle."""
    out = tmp_path_factory.mktemp("pool") / "pool"
    words = [
        "red",
        "green",
        "blue",
        "apple",
        "rocket",
        "flag",
        "cat",
        "dog",
        "pizza",
        "wave",
        "thumbs",
        "heart",
        "star",
        "moon",
        "sun",
    ]
    samples = (
        encode_candidate(
            f"{i:06d}", id=f"c:{i}", txt=" ".join(words[(i * j) % len(words)] for j in range(3 + i % 40)), image=None
        )
        for i in range(200)
    )
    write_shards(samples, out, maxcount=5)
    return out


def index_args(model: Path, pool: Path, out: Path) -> list[str]:
    return ["index", f"--model={model}", f"--pool={pool}", f"--out={out}", "--batch_size=5", "--num_workers=0"]


@pytest.fixture(scope="module")
def whole_index(tiny_backbone, long_pool, tmp_path_factory) -> Path:
    """The index of `long_pool` from one uninterrupted run on one process."""
    out = tmp_path_factory.mktemp("whole") / "index"
    ok(lamra(*index_args(tiny_backbone, long_pool, out)))
    return out


@pytest.mark.slow
def test_index_killed_and_resumed_is_byte_identical(tiny_backbone, long_pool, whole_index, tmp_path):
    whole, resumed = whole_index, tmp_path / "resumed"

    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([LAMRA, *index_args(tiny_backbone, long_pool, resumed)], cwd=ROOT, env=env)
    parts = resumed / "parts"
    deadline = time.time() + 300
    while len(list(parts.glob("chunk-*.npy"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # not a polite stop
    proc.wait()
    done = len(list(parts.glob("chunk-*.npy")))
    assert 3 <= done < 40 and not (resumed / "index.json").exists(), f"{done} chunks: kill came too late"
    # What a kill during a save can leave: a temporary file, and a chunk's items without its embeddings.
    (parts / ".chunk-000039.npy.tmp-1").write_bytes(b"half a file")
    (parts / "chunk-000038.jsonl").write_text('{"id": "wrong"}\n')
    with pytest.raises(Exception, match="not a complete index"):
        EmbeddingIndex(resumed)

    ok(lamra(*index_args(tiny_backbone, long_pool, resumed)))
    for name in ("embeddings.npy", "ids.txt", "items.jsonl"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    assert not parts.exists()


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def other_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("others")
    return {
        "same_shape": build_tiny_qwen2vl(root / "seed1", seed=1),
        "narrower": build_tiny_qwen2vl(root / "narrow", hidden_size=32),
    }


@pytest.mark.parametrize("which,needle", [("same_shape", "different model"), ("narrower", "64-d embeddings")])
def test_an_index_of_another_model_is_refused(evaluated, other_models, tmp_path, which, needle):
    out = tmp_path / "runs"
    queries = f"{evaluated['data']}/eval/test/*_task*"
    model = other_models[which]
    proc = lamra_here(
        "retrieve", f"--model={model}", f"--index={evaluated['index']}", f"--queries={queries}", f"--out={out}"
    )
    clean_error(proc, needle, str(evaluated["index"]))
    assert not out.exists()
    proc = lamra_here("search", f"--model={model}", f"--index={evaluated['index']}", "--text=apple")
    clean_error(proc, needle)
    # Resuming someone else's unfinished index, or overwriting a finished one of another model, is refused too.
    index_copy = tmp_path / "index"
    shutil.copytree(evaluated["index"], index_copy)
    before = (index_copy / "embeddings.npy").read_bytes()
    proc = lamra_here(
        "index", f"--model={model}", f"--pool={evaluated['data']}/eval/test/global_pool", f"--out={index_copy}"
    )
    clean_error(proc, needle)
    assert (index_copy / "embeddings.npy").read_bytes() == before


@pytest.mark.parametrize("defect", ["unknown_id", "no_qrels"])
def test_bad_run_or_qrels_is_a_clear_error_and_nothing_is_overwritten(evaluated, tmp_path, defect):
    runs = tmp_path / "local"
    shutil.copytree(evaluated["runs"] / "local", runs)
    manifest = json.loads((runs / "runs.json").read_text())
    entry = manifest["tasks"]["emoji_task3"]
    entry["run_file"] = str(runs / "emoji_task3.run")
    run_lines = Path(entry["run_file"]).read_text().splitlines()
    if defect == "unknown_id":
        fields = run_lines[4].split()
        fields[2] = "99:12345"
        run_lines[4] = " ".join(fields)
        Path(entry["run_file"]).write_text("\n".join(run_lines) + "\n")
        needles = ["emoji_task3.run", "'99:12345'", "not in the pool"]
    else:
        qid = run_lines[0].split()[0]
        qrels = Path(entry["qrels_file"]).read_text().splitlines()
        entry["qrels_file"] = str(tmp_path / "qrels.txt")
        Path(entry["qrels_file"]).write_text("".join(f"{line}\n" for line in qrels if line.split()[0] != qid))
        needles = ["no positive in", "qrels.txt", qid]
    (runs / "runs.json").write_text(json.dumps(manifest))
    before = (runs / "results.json").read_bytes()
    clean_error(lamra_here("evaluate", f"--runs={runs}"), *needles)
    assert (runs / "results.json").read_bytes() == before


UNREADABLE_JSON = {
    "not UTF-8": (b'{"format": "\xff"}', "not UTF-8 text (byte 12)"),
    "not JSON": (b'{"format": ', "not JSON (Expecting value"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "its JSON nests too deep"),
    "a number too long": (b"1" * 5000, "not readable JSON (Exceeds the limit"),
}


@pytest.mark.parametrize("defect", list(UNREADABLE_JSON))
def test_an_unreadable_index_json_runs_json_or_items_row_is_one_line_naming_it(evaluated, tmp_path, defect):
    data, needle = UNREADABLE_JSON[defect]
    (tmp_path / "file.json").write_bytes(data)
    with pytest.raises(LamraError, match="^" + re.escape(f"{tmp_path / 'file.json'} is not a thing: ")) as caught:
        read_json(tmp_path / "file.json", "a thing")
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(LamraError, match="does not exist"):
        read_json(tmp_path / "missing.json", "a thing")

    index = tmp_path / "index"
    shutil.copytree(evaluated["index"], index)
    items = (index / "items.jsonl").read_bytes().splitlines(keepends=True)
    (index / "items.jsonl").write_bytes(b"".join([items[0], data + b"\n", *items[2:]]))
    with pytest.raises(LamraError, match=re.escape(f"{index / 'items.jsonl'}:2: ")):
        assert EmbeddingIndex(index).modalities
    (index / "index.json").write_bytes(data)
    with pytest.raises(LamraError, match=re.escape(f"{index / 'index.json'} is not a lamra-pl-index v1 index: ")):
        EmbeddingIndex(index)

    runs = tmp_path / "local"
    shutil.copytree(evaluated["runs"] / "local", runs)
    (runs / "runs.json").write_bytes(data)
    proc = lamra_here("evaluate", f"--runs={runs}")
    clean_error(proc, f"{runs / 'runs.json'} is not a lamra-pl-runs manifest", needle)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_index_sharded_over_two_processes_equals_one(tiny_backbone, long_pool, whole_index, tmp_path):
    one, two = whole_index, tmp_path / "two"
    ok(lamra(*index_args(tiny_backbone, long_pool, two), "--trainer.accelerator=cpu", "--trainer.devices=2"))
    for name in ("embeddings.npy", "ids.txt", "items.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_modality_bias_equals_a_hand_count_and_the_report_reads_every_evaluation(evaluated, tmp_path):
    items = [json.loads(line) for line in (evaluated["index"] / "items.jsonl").read_text().splitlines()]
    names = {(True, False): "text", (False, True): "image", (True, True): "image,text"}
    kind = {r["id"]: names[r["txt"] is not None, bool(r["img"])] for r in items}
    assert len(set(kind.values())) > 1  # a mixed pool, or the check below is empty
    results = json.loads((evaluated["runs"] / "global" / "results.json").read_text())
    for task, got in results["tasks"].items():
        qrels = read_qrels(evaluated["data"] / "eval/test" / task / "qrels.txt")
        run = read_run_file(got["run_file"])
        shares = []
        for qid, ranked in zip(run.qids, run.ranked, strict=True):
            target = kind[sorted(qrels[qid])[0]]
            shares.append(sum(kind[d] != target for d in ranked[:10]) / len(ranked[:10]))
        assert got["wrong_modality@10"] == pytest.approx(np.mean(shares), abs=1e-12), task
    # Every evaluation is a TensorBoard run with its numbers as final hp/* metrics: `report` tabulates them.
    shutil.copytree(evaluated["runs"] / "global", tmp_path / "evals" / "global", ignore=shutil.ignore_patterns("*.run"))
    shutil.copytree(evaluated["runs"] / "local", tmp_path / "evals" / "local", ignore=shutil.ignore_patterns("*.run"))
    ok(lamra_here("report", f"--runs={tmp_path / 'evals'}"))
    saved = json.loads((tmp_path / "evals" / "report.json").read_text())
    assert set(saved) == {"global", "local"} and saved["global"]["status"] == "finished"
    for pool in ("global", "local"):
        want = json.loads((evaluated["runs"] / pool / "results.json").read_text())["average"]
        assert saved[pool]["metrics"]["average/R@5"] == pytest.approx(want["R@5"], rel=1e-6)
        assert saved[pool]["metrics"]["average/wrong_modality@10"] == pytest.approx(want["wrong_modality@10"], rel=1e-6)
        assert saved[pool]["hparams"]["pool"] == pool and saved[pool]["hparams"]["retriever"] == str(evaluated["model"])
    # --log_to: the numbers go into another run (a fit's), which the report then shows as finished.
    fit = tmp_path / "fits" / "reranker"
    fit.mkdir(parents=True)
    (fit / "config.yaml").write_text("model:\n  init_args:\n    listwise_weight: 0.0\n")
    ok(lamra_here("evaluate", f"--runs={evaluated['runs'] / 'global'}", f"--log_to={fit}"))
    ok(lamra_here("report", f"--runs={tmp_path / 'fits'}"))
    row = json.loads((tmp_path / "fits" / "report.json").read_text())["reranker"]
    assert row["status"] == "finished" and row["hparams"] == {"model.listwise_weight": 0.0}
    assert row["metrics"]["average/R@1"] == pytest.approx(results["average"]["R@1"], rel=1e-6)
    bad = lamra_here("evaluate", f"--runs={evaluated['runs'] / 'global'}", f"--log_to={tmp_path}/no")
    clean_error(bad, "--log_to", "is not a folder")
