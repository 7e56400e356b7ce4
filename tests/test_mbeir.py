"""The M-BEIR converter on the committed tiny fixture (made by lamra_pl/recipes/emoji.py): round trip and bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import webdataset as wds

from helpers import lamra
from lamra_pl.data.stream import SampleIndex
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import decode_candidate, decode_record
from lamra_pl.formats.shards import expand_shards
from lamra_pl.recipes.mbeir import convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def samples(folder: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList(expand_shards(str(folder))), wds.tarfile_to_samples()))


@pytest.fixture
def mbeir(tmp_path) -> Path:
    root = tmp_path / "mbeir"
    shutil.copytree(FIXTURE, root)
    return root


def test_round_trip_reads_every_field_back(mbeir, tmp_path):
    report = convert(str(mbeir), str(tmp_path / "out"))
    out = tmp_path / "out"
    assert report["problems"] == {} and report["dropped"] == {}
    source = {q["qid"]: q for q in jsonl(mbeir / "query/union_train/mbeir_union_up_train.jsonl")}
    pool = {c["did"]: c for c in jsonl(mbeir / "cand_pool/global/mbeir_union_train_cand_pool.jsonl")}
    instructions = [
        line.split("\t") for line in (mbeir / "instructions/query_instructions.tsv").read_text().splitlines()
    ]
    prompts = {(r[3], r[0], r[1]): [p for p in r[4:] if p] for r in instructions[1:]}
    records = [decode_record(s) for s in samples(out / "train")]
    assert sorted(r.qid for r in records) == sorted(source) and report["written"]["train_queries"] == len(source)
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"emoji_task{t}" for t in (0, 1, 3, 7)]
    for r in records:
        q = source[r.qid]
        assert r.task_id == q["task_id"] and r.query.text == q["query_txt"]
        assert (r.query.image is None) == (q["query_img_path"] is None)
        assert [p.id for p in r.positives] == q["pos_cand_list"] and [n.id for n in r.negatives] == q["neg_cand_list"]
        for item in r.positives + r.negatives:
            assert item.text == pool[item.id]["txt"] and (item.image is None) == (pool[item.id]["img_path"] is None)
        assert r.instructions == prompts[("10", q["query_modality"], pool[q["pos_cand_list"][0]]["modality"])]
    assert any(len(r.positives) == 2 for r in records), "the fixture has twins (Norway / Svalbard)"
    assert any(len(r.negatives) == 4 and r.query.modality == "image,text" for r in records)

    union = set()
    for task in (0, 1, 3, 7):
        folder = out / "eval/test" / f"emoji_task{task}"
        queries = jsonl(mbeir / f"query/test/mbeir_emoji_task{task}_test.jsonl")
        local = jsonl(mbeir / f"cand_pool/local/mbeir_emoji_task{task}_cand_pool.jsonl")
        info = json.loads((folder / "task.json").read_text())
        assert (info["task_id"], info["queries"], info["pool"], info["recall_k"]) == (task, len(queries), len(local), 5)
        assert sorted(decode_record(s).qid for s in samples(folder / "queries")) == sorted(q["qid"] for q in queries)
        ids = [decode_candidate(s).id for s in samples(folder / "pool")]
        assert sorted(ids) == sorted(c["did"] for c in local)
        union |= set(ids)
        qrels = (folder / "qrels.txt").read_text().splitlines()
        assert sorted(qrels) == sorted(
            (mbeir / f"qrels/test/mbeir_emoji_task{task}_test_qrels.txt").read_text().splitlines()
        )
        trec = (folder / "qrels.trec").read_text().splitlines()  # `qid 0 did relevance`, for TREC tools
        assert trec == [" ".join(line.split()[:4]) for line in qrels] and {len(t.split()) for t in trec} == {4}
    assert sorted(decode_candidate(s).id for s in samples(out / "eval/test/global_pool")) == sorted(union)
    assert len(SampleIndex.build(expand_shards(str(out / "train")))) == len(source)


def corrupt_line(path: Path, number: int, change) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = change(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def set_field(key: str, value) -> callable:
    def change(line: str) -> str:
        row = json.loads(line)
        row[key] = value
        return json.dumps(row)

    return change


TRAIN = "query/union_train/mbeir_union_up_train.jsonl"
POOL = "cand_pool/global/mbeir_union_train_cand_pool.jsonl"


@pytest.mark.parametrize(
    "file,line,change,reason,message",
    [
        (TRAIN, 3, lambda _: "{not json", "malformed_line", "not valid JSON"),
        (TRAIN, 2, set_field("query_modality", "audio"), "unknown_modality", "query_modality 'audio'"),
        (TRAIN, 2, set_field("query_modality", "video"), "bad_value", "a video names its file in query_vid_path"),
        (TRAIN, 4, set_field("pos_cand_list", ["10:99999"]), "unknown_positive", "positive '10:99999'"),
        (POOL, 2, set_field("modality", "audio"), "unknown_modality", "modality 'audio'"),
        (POOL, 5, set_field("img_path", "mbeir_images/emoji_images/gone.png"), "missing_image", "gone.png"),
    ],
)
def test_bad_input_is_reported_with_file_and_line(mbeir, tmp_path, caplog, file, line, change, reason, message):
    corrupt_line(mbeir / file, line, change)
    with caplog.at_level(logging.WARNING):
        report = convert(str(mbeir), str(tmp_path / "out"))
    assert report["problems"][reason] == 1
    where = f"{mbeir / file}:{line}:"
    assert any(where in r.getMessage() and message in r.getMessage() for r in caplog.records), caplog.text
    for kind in ("candidates", "train_queries", "test_queries"):  # nothing lost without a count
        assert report["read"][kind] == report["written"][kind] + report["dropped"].get(kind, 0)
    dropped_here = "candidates" if file == POOL else "train_queries"
    assert report["dropped"][dropped_here] >= 1
    with pytest.raises(LamraError, match=f"{line}: .*{message}"):
        convert(str(mbeir), str(tmp_path / "strict"), strict=True)


def test_a_candidate_dropped_for_its_image_takes_its_queries_with_a_count(mbeir, tmp_path):
    pool = jsonl(mbeir / POOL)
    victim = next(i for i, c in enumerate(pool, start=1) if c["img_path"])
    (mbeir / pool[victim - 1]["img_path"]).unlink()
    report = convert(str(mbeir), str(tmp_path / "out"))
    assert report["problems"]["missing_image"] >= 1
    did = pool[victim - 1]["did"]
    needing = [q for q in jsonl(mbeir / TRAIN) if did in q["pos_cand_list"]]
    assert report["problems"]["unknown_positive"] >= len(needing)
    dropped = report["read"]["train_queries"] - report["written"]["train_queries"]
    # queries whose only positive was that candidate, and queries showing that same image, are dropped and counted
    assert dropped == report["dropped"]["train_queries"] >= report["problems"]["no_positive"] >= 1
    assert report["problems"]["missing_image"] - 1 == dropped - report["problems"]["no_positive"]


def test_cli_strict_error_is_one_line(mbeir, tmp_path):
    corrupt_line(mbeir / TRAIN, 3, lambda _: "{not json")
    proc = lamra("convert-mbeir", f"--root={mbeir}", f"--out={tmp_path / 'out'}", "--strict=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "mbeir_union_up_train.jsonl:3: not valid JSON" in proc.stderr
    ok = lamra("convert-mbeir", f"--root={mbeir}", f"--out={tmp_path / 'out2'}")
    assert ok.returncode == 0 and '"malformed_line": 1' in ok.stdout


def test_training_folders_are_tasks_on_the_training_pool(mbeir, tmp_path):
    """What `retrieve` + `rerank-data` need: qrels, task.json and a local pool per training task."""
    out = tmp_path / "out"
    convert(str(mbeir), str(out))
    union = jsonl(mbeir / "cand_pool/global/mbeir_union_train_cand_pool.jsonl")
    train_pool = (out / "train_pool/ids.txt").read_text().splitlines()
    assert train_pool == [c["did"] for c in union]
    assert sorted(decode_candidate(s).id for s in samples(out / "train_pool")) == sorted(train_pool)
    modality = {c["did"]: c["modality"] for c in union}
    for task in sorted((out / "train").iterdir()):
        info = json.loads((task / "task.json").read_text())
        records = [decode_record(s) for s in samples(task)]
        qrels = [line.split() for line in (task / "qrels.txt").read_text().splitlines()]
        assert info["queries"] == len(records) and info["split"] == "train"
        assert sorted((q, d) for q, _, d, _, _ in qrels) == sorted((r.qid, p.id) for r in records for p in r.positives)
        trec = [line.split() for line in (task / "qrels.trec").read_text().splitlines()]  # TREC's four columns
        assert trec == [line[:4] for line in qrels] and all(len(line) == 4 for line in trec)
        pool = (task / "pool/ids.txt").read_text().splitlines()
        assert info["pool"] == len(pool) > 0 and set(pool) <= set(train_pool)
        wanted = {modality[p.id] for r in records for p in r.positives}
        assert {modality[d] for d in pool} == wanted  # the task's candidate modality, nothing else
        assert {p.id for r in records for p in r.positives} <= set(pool)
