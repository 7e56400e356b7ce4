"""LamRA's zero-shot sets: `convert-zeroshot` from each set's published layout (tests/fixtures/zeroshot/
make_fixtures.py), the metrics beyond hit rate (CIRCO's mAP@K) by hand, the sets end to end with the tiny Qwen2-VL
(index, retrieve, evaluate), `zeroshot-report`, and `make zeroshot`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, clean_error, convert_zeroshot, evaluate_zeroshot, lamra_here, ok
from lamra_pl.errors import LamraError
from lamra_pl.formats.runs import read_run_file, write_manifest, write_run
from lamra_pl.formats.sample import decode_record, evaluation_query
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.formats.task import read_qrels, reported_metric, task_info, task_metrics
from lamra_pl.pipelines.evaluate import evaluate_runs

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "zeroshot"))
from make_fixtures import make

SETS = ("flickr30k", "coco", "sharegpt4v", "urban1k", "circo", "genecis", "visdial", "ccneg", "sugarcrepe")
SPLIT = {"circo": "val", "visdial": "val"}
GALLERIES = ("genecis", "ccneg", "sugarcrepe")  # the sets whose queries each rank their own gallery
I2T = "Find an image caption describing the following everyday image."
CHANGES = "I'm looking for a similar everyday image with the described changes."
DIALOG = "Find me an everyday image that matches the given dialog."


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    return make(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory) -> dict[str, Path]:
    return convert_zeroshot({name: raw[name] for name in SETS}, tmp_path_factory.mktemp("data"), SPLIT)


def expected_qrels(name: str, root: Path) -> dict[str, dict[str, set[str]]]:
    """The ground truth, read from the published files here, independently of the converter: task -> qid -> ids."""
    if name in ("flickr30k", "coco"):
        images = [e for e in json.loads((root / f"dataset_{name}.json").read_text())["images"] if e["split"] == "test"]
        t2i = {f"{name}:t2i{s['sentid']}": {f"{name}:img{e['imgid']}"} for e in images for s in e["sentences"][:5]}
        i2t = {f"{name}:i2t{e['imgid']}": {f"{name}:cap{s['sentid']}" for s in e["sentences"][:5]} for e in images}
        return {f"{name}_task0": t2i, f"{name}_task3": i2t}
    if name == "sharegpt4v":
        n = len(json.loads((root / "datas_for_validation.json").read_text()))
        keys = [str(i) for i in range(n)]
    elif name == "urban1k":
        keys = sorted((p.stem for p in (root / "caption").glob("*.txt")), key=int)
    elif name == "genecis":
        coco = json.loads((root / "annotations" / "change_object.json").read_text())
        vaw = json.loads((root / "annotations" / "focus_attribute.json").read_text())
        return {
            "genecis_change_object_task7": {
                f"genecis_change_object:{i}": {f"genecis_change_object:{q['target']['val_image_id']}"}
                for i, q in enumerate(coco)
            },
            "genecis_focus_attribute_task7": {
                f"genecis_focus_attribute:{i}": {f"genecis_focus_attribute:{q['target']['image_id']}_{i}_1"}
                for i, q in enumerate(vaw)
            },
        }
    elif name == "sugarcrepe":
        return {
            f"sugarcrepe_{subset}_task3": {
                f"sugarcrepe_{subset}:{key}": {f"sugarcrepe_{subset}:{key}:caption"}
                for key in json.loads((root / "data" / f"{subset}.json").read_text())
            }
            for subset in ("add_att", "swap_obj")
        }
    elif name == "ccneg":
        n = len(torch.load(root / "ccneg_preprocessed.pt", weights_only=True)["annotations"])
        return {"ccneg_task3": {f"ccneg:{i}": {f"ccneg:{i}:true"} for i in range(n)}}
    elif name == "visdial":
        dialogs = json.loads((root / "visdial_1.0_val.json").read_text())["data"]["dialogs"]
        return {"visdial_task0": {f"visdial:d{i}": {f"visdial:{d['image_id']}"} for i, d in enumerate(dialogs)}}
    else:
        val = json.loads((root / "annotations" / "val.json").read_text())
        return {"circo_task7": {f"circo:{q['id']}": {f"circo:{i}" for i in q["gt_img_ids"]} for q in val}}
    return {
        f"{name}_task0": {f"{name}:t2i{k}": {f"{name}:img{k}"} for k in keys},
        f"{name}_task3": {f"{name}:i2t{k}": {f"{name}:cap{k}"} for k in keys},
    }


@pytest.mark.parametrize("name", SETS)
def test_conversion_keeps_the_published_ground_truth_instruction_and_metric(name, raw, converted):
    expected = expected_qrels(name, raw[name])
    split = converted[name]
    assert sorted(p.name for p in split.iterdir()) == sorted([*expected, "global_pool"])
    for task, qrels in expected.items():
        folder = split / task
        assert read_qrels(folder / "qrels.txt") == qrels
        info = task_info(folder)
        assert info["version"] == 2 and info["zeroshot_set"] == name
        if name == "genecis":
            assert (task_metrics(info), reported_metric(info)) == (["R@1", "R@5", "R@10", "R@2", "R@3"], "R@1")
        elif name == "circo":
            assert (task_metrics(info), reported_metric(info)) == (
                ["R@1", "R@5", "R@10", "mAP@5", "mAP@10", "mAP@25", "mAP@50"],
                "mAP@5",
            )
        else:
            assert (task_metrics(info), reported_metric(info)) == (["R@1", "R@5", "R@10"], "R@1")
        # The pool is every candidate of the task's kind (LamRA ranks the whole split), positives among them.
        pool = set((folder / "pool" / "ids.txt").read_text().split())
        assert set().union(*qrels.values()) <= pool
        records = [decode_record(s) for s in read_samples(expand_shards(str(folder / "queries")))]
        assert sorted(r.qid for r in records) == sorted(qrels)
        query = evaluation_query(records[0])
        lamra_instruction = {"circo": CHANGES, "coco": None, "visdial": DIALOG, "ccneg": None, "sugarcrepe": None}.get(
            name, I2T
        )
        if task == "genecis_focus_attribute_task7":
            lamra_instruction = "I'm looking for an image with the same attributes as described."
        elif name == "genecis":
            lamra_instruction = CHANGES
        if name == "visdial":  # the dialog, with LamRA's instruction
            assert query.image is None and query.text.startswith(f"{DIALOG} Q: ")
        elif task.endswith("_task0"):  # LamRA encodes the caption bare
            assert query.image is None and query.text == records[0].query.text and not records[0].instructions
        elif task.endswith("_task3"):  # (CC-Neg: LamRA embeds the image bare)
            assert query.image is not None and query.text == lamra_instruction
        else:
            assert query.image is not None and query.text.startswith(f"{lamra_instruction} ")
    report = json.loads((split.parent.parent / "report.json").read_text())
    assert report["zeroshot"]["set"] == name and report["problems"] == {} and report["zeroshot"]["problems"] == {}
    skipped = {"flickr30k": {"split_train": 1}, "coco": {"split_train": 1, "extra_caption": 1}}
    skipped["urban1k"] = {"image_without_caption": 1}
    assert report["zeroshot"]["skipped"] == skipped.get(name, {})


def test_flickr_images_carry_lamra_image_instruction_as_t2i_candidates(converted):
    """LamRA embeds each Flickr30K image once, with its image->text instruction, and ranks that embedding for
    text->image too: the t2i pool's candidates are image+text items whose text is that instruction (COCO: none)."""
    for name, text in (("flickr30k", I2T), ("coco", None)):
        pool = converted[name] / f"{name}_task0" / "pool"
        rows = [json.loads(s["json"]) for s in read_samples(expand_shards(str(pool)))]
        assert rows and all(r["txt"] == text and r["img"] for r in rows)


def task_runs(folder: Path, tasks: dict[str, Path], ranked: dict[str, dict[str, list[str]]]) -> Path:
    """A run folder by hand: per task the given rankings, scored descending."""
    entries = {}
    for task, rankings in ranked.items():
        qids = list(rankings)
        width = max(len(r) for r in rankings.values())
        scores = np.array([np.linspace(1, 0, width) for _ in rankings])  # a row may be longer than its ranking
        run = write_run(folder / f"{task}.run", qids, list(rankings.values()), scores, "hand")
        entries[task] = {
            "run_file": str(run),
            "qrels_file": str(tasks[task] / "qrels.txt"),
            "task_file": str(tasks[task] / "task.json"),
            "queries": str(tasks[task] / "queries"),
            "pool_ids": str(tasks[task] / "pool" / "ids.txt"),
        }
    write_manifest(folder, {"pool": "local", "index": None, "k": 50, "tasks": entries})
    return folder


def test_circo_map_at_k_equals_a_hand_computation(converted, tmp_path):
    task = converted["circo"] / "circo_task7"
    ranked = {  # gts: q0 {22, 33, 44}, q1 {66}, q2 {11, 22}; the pool is 11..77
        "circo:0": ["circo:22", "circo:11", "circo:33", "circo:55", "circo:44", "circo:66", "circo:77"],
        "circo:1": ["circo:11", "circo:66", "circo:22", "circo:33", "circo:44", "circo:55", "circo:77"],
        "circo:2": ["circo:33", "circo:44", "circo:55", "circo:66", "circo:77", "circo:11", "circo:22"],
    }
    results = evaluate_runs(task_runs(tmp_path, {"circo_task7": task}, {"circo_task7": ranked}))
    scores = results["tasks"]["circo_task7"]
    # AP@k = sum of precision@i at the hits in the top k / min(k, #gt)
    ap5 = [(1 + 2 / 3 + 3 / 5) / 3, (1 / 2) / 1, 0.0]
    ap10 = [(1 + 2 / 3 + 3 / 5) / 3, 1 / 2, (1 / 6 + 2 / 7) / 2]
    assert scores["mAP@5"] == pytest.approx(np.mean(ap5))
    assert scores["mAP@10"] == scores["mAP@25"] == scores["mAP@50"] == pytest.approx(np.mean(ap10))
    assert (scores["R@1"], scores["R@5"]) == pytest.approx((1 / 3, 2 / 3))
    assert scores["reported"] == "mAP@5"
    assert results["average"]["reported"] == pytest.approx(np.mean(ap5))


def test_flickr_recall_both_directions_equals_a_hand_computation(converted, tmp_path):
    tasks = {t: converted["flickr30k"] / t for t in ("flickr30k_task0", "flickr30k_task3")}
    qrels = {t: read_qrels(f / "qrels.txt") for t, f in tasks.items()}
    pools = {t: (f / "pool" / "ids.txt").read_text().split() for t, f in tasks.items()}
    rng = np.random.default_rng(0)
    ranked = {t: {q: list(rng.permutation(pools[t])) for q in sorted(qrels[t])} for t in tasks}
    results = evaluate_runs(task_runs(tmp_path, tasks, ranked))
    for t in tasks:
        for k in (1, 5, 10):
            hits = [any(d in qrels[t][q] for d in r[:k]) for q, r in ranked[t].items()]
            assert results["tasks"][t][f"R@{k}"] == pytest.approx(np.mean(hits))
        assert results["tasks"][t]["reported"] == "R@1"


def test_genecis_galleries_are_target_and_gallery_and_recall_at_1_2_3_by_hand(raw, converted, tmp_path):
    task = converted["genecis"] / "genecis_change_object_task7"
    galleries = {}
    for line in (task / "galleries.jsonl").read_text().splitlines():
        row = json.loads(line)
        galleries[row["qid"]] = row["ids"]
    coco = json.loads((raw["genecis"] / "annotations" / "change_object.json").read_text())
    assert galleries == {
        f"genecis_change_object:{i}": [
            f"genecis_change_object:{x['val_image_id']}" for x in [q["target"], *q["gallery"]]
        ]
        for i, q in enumerate(coco)
    }
    # targets: 285, 632, 802; the target at rank 1, rank 3 and rank 2
    ranked = {
        "genecis_change_object:0": ["genecis_change_object:285", "genecis_change_object:632"],
        "genecis_change_object:1": [f"genecis_change_object:{i}" for i in (139, 776, 632, 785)],
        "genecis_change_object:2": ["genecis_change_object:776", "genecis_change_object:802"],
    }
    scores = evaluate_runs(task_runs(tmp_path, {task.name: task}, {task.name: ranked}))["tasks"][task.name]
    assert (scores["R@1"], scores["R@2"], scores["R@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert scores["reported"] == "R@1"


def test_visdial_query_is_the_whole_dialog_and_recall_by_hand(converted, tmp_path):
    """LamRA's dialog text: every round as "Q: <question>? A: <answer>.", the caption left out; the pool is the
    dialogs' images, bare."""
    task = converted["visdial"] / "visdial_task0"
    records = {r.qid: r for r in map(decode_record, read_samples(expand_shards(str(task / "queries"))))}
    assert records["visdial:d0"].query.text == "Q: is the photo in color? A: yes. Q: how many people? A: two."
    assert records["visdial:d1"].query.text == "Q: is it sunny? A: no."
    assert (
        evaluation_query(records["visdial:d2"]).text
        == f"{DIALOG} Q: what colour is the car? A: red. Q: how many people? A: one."
    )
    rows = [json.loads(s["json"]) for s in read_samples(expand_shards(str(task / "pool")))]
    assert sorted(r["id"] for r in rows) == ["visdial:185565", "visdial:284024", "visdial:378461"]
    assert all(r["txt"] is None and r["img"] for r in rows)
    ranked = {  # the dialog's image at rank 1, 3 and 2
        "visdial:d0": ["visdial:185565", "visdial:284024", "visdial:378461"],
        "visdial:d1": ["visdial:185565", "visdial:378461", "visdial:284024"],
        "visdial:d2": ["visdial:185565", "visdial:378461", "visdial:284024"],
    }
    scores = evaluate_runs(task_runs(tmp_path, {task.name: task}, {task.name: ranked}))["tasks"][task.name]
    assert (scores["R@1"], scores["R@5"], scores["R@10"]) == pytest.approx((1 / 3, 1.0, 1.0))
    assert scores["reported"] == "R@1"


def test_ccneg_gallery_is_true_and_negated_caption_and_accuracy_by_hand(raw, converted, tmp_path):
    """Each image is ranked against its true and its negated caption (commas dropped, as LamRA does): R@1 there is
    LamRA's accuracy, the share of images whose true caption scores higher."""
    task = converted["ccneg"] / "ccneg_task3"
    galleries = [json.loads(line) for line in (task / "galleries.jsonl").read_text().splitlines()]
    assert galleries == [{"qid": f"ccneg:{i}", "ids": [f"ccneg:{i}:true", f"ccneg:{i}:negated"]} for i in range(3)]
    texts = {
        r["id"]: r["txt"] for r in (json.loads(s["json"]) for s in read_samples(expand_shards(str(task / "pool"))))
    }
    assert texts["ccneg:0:true"] == "a dog running on a beach"
    assert texts["ccneg:0:negated"] == "a dog not running on a beach"
    ranked = {  # the true caption first for images 0 and 2
        "ccneg:0": ["ccneg:0:true", "ccneg:0:negated"],
        "ccneg:1": ["ccneg:1:negated", "ccneg:1:true"],
        "ccneg:2": ["ccneg:2:true", "ccneg:2:negated"],
    }
    scores = evaluate_runs(task_runs(tmp_path, {task.name: task}, {task.name: ranked}))["tasks"][task.name]
    assert scores["R@1"] == pytest.approx(2 / 3) and scores["reported"] == "R@1"


def test_sugarcrepe_gallery_is_caption_and_hard_negative_and_accuracy_by_hand(converted, tmp_path):
    task = converted["sugarcrepe"] / "sugarcrepe_swap_obj_task3"
    galleries = [json.loads(line) for line in (task / "galleries.jsonl").read_text().splitlines()]
    name = "sugarcrepe_swap_obj"
    assert galleries == [{"qid": f"{name}:{k}", "ids": [f"{name}:{k}:caption", f"{name}:{k}:negative"]} for k in "01"]
    rows = [json.loads(s["json"]) for s in read_samples(expand_shards(str(task / "pool")))]
    assert {r["id"]: r["txt"] for r in rows}[f"{name}:1:negative"] == "An umbrella holding a person."
    queries = {r.qid: r for r in map(decode_record, read_samples(expand_shards(str(task / "queries"))))}
    assert queries[f"{name}:0"].query.image is not None and queries[f"{name}:0"].query.text is None
    assert queries[f"{name}:0"].query.source == "images/000000397133.jpg"  # under the image folder, val2017/
    ranked = {f"{name}:0": [f"{name}:0:negative", f"{name}:0:caption"], f"{name}:1": [f"{name}:1:caption"]}
    scores = evaluate_runs(task_runs(tmp_path, {task.name: task}, {task.name: ranked}))["tasks"][task.name]
    assert scores["R@1"] == pytest.approx(1 / 2) and scores["reported"] == "R@1"


def test_ccneg_evaluates_its_last_40000_entries_only(raw, monkeypatch):
    """The test split is the file's last TEST_SIZE entries (40,000; here 2): the ones before are counted, not used."""
    from lamra_pl.recipes.mbeir import Problems
    from lamra_pl.recipes.zeroshot import ccneg

    monkeypatch.setattr(ccneg, "TEST_SIZE", 2)
    layout = ccneg.read(raw["ccneg"], "test", Problems(strict=True))
    assert [q["qid"] for q in layout.tasks[0].queries] == ["ccneg:1", "ccneg:2"]
    assert layout.skipped == {"split_train": 1} and layout.read == {"entries": 3}


class Payload:
    """Anything but plain data: torch.load(weights_only=True) refuses to build it."""


def test_ccneg_file_with_code_in_it_is_refused_in_one_line(tmp_path):
    root = tmp_path / "ccneg"
    root.mkdir()
    torch.save({"image_paths": [Payload()], "annotations": [{}]}, root / "ccneg_preprocessed.pt")
    clean_error(
        lamra_here("convert-zeroshot", "--set=ccneg", f"--root={root}", f"--out={tmp_path / 'out'}"),
        "ccneg_preprocessed.pt",
        "not a readable torch file",
    )


def test_version_1_task_folders_read_as_mbeir_tasks_and_unknown_versions_are_refused(tmp_path):
    (tmp_path / "task.json").write_text(json.dumps({"dataset": "mscoco", "task_id": 0, "recall_k": 5}))
    info = task_info(tmp_path)
    assert (task_metrics(info), reported_metric(info)) == (["R@1", "R@5", "R@10"], "R@5")
    (tmp_path / "task.json").write_text(json.dumps({"format": "lamra-pl-task", "version": 4, "recall_k": 5}))
    with pytest.raises(LamraError, match="version 4"):
        task_info(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"version": 2, "recall_k": 5, "metrics": ["nDCG@10"]}))
    with pytest.raises(LamraError, match="nDCG@10"):
        task_info(tmp_path)


def test_bad_input_is_one_line(raw, tmp_path):
    clean_error(
        lamra_here("convert-zeroshot", "--set=nosuchset", f"--root={raw['circo']}", f"--out={tmp_path}"), "nosuchset"
    )
    clean_error(
        lamra_here("convert-zeroshot", "--set=circo", f"--root={raw['circo']}", f"--out={tmp_path}", "--split=test"),
        "ground truths",
    )
    clean_error(
        lamra_here("convert-zeroshot", "--set=coco", f"--root={raw['flickr30k']}", f"--out={tmp_path}"),
        "dataset_coco.json",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "datas_for_validation.json").write_text("{not json")
    (broken / "val_data").mkdir()
    clean_error(
        lamra_here("convert-zeroshot", "--set=sharegpt4v", f"--root={broken}", f"--out={tmp_path / 'o'}"),
        "datas_for_validation.json",
        "not valid JSON",
    )


def test_unsafe_and_missing_images_are_counted_not_read(raw, tmp_path):
    root = tmp_path / "circo"
    subprocess.run(["cp", "-r", str(raw["circo"]), str(root)], check=True)
    info_path = root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json"
    info = json.loads(info_path.read_text())
    info["images"][1]["file_name"] = "../../annotations/val.json"  # leads outside the image folder
    (root / "COCO2017_unlabeled" / "unlabeled2017" / info["images"][2]["file_name"]).unlink()  # missing
    info_path.write_text(json.dumps(info))
    report = ok(lamra_here("convert-zeroshot", "--set=circo", f"--root={root}", f"--out={tmp_path / 'out'}"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["problems"]["unsafe_path"] == 1 and report["problems"]["missing_image"] == 1
    # Query 0's positives 22 and 33 are gone with their images; 44 is left, so the query stays.
    qrels = read_qrels(tmp_path / "out" / "eval/val/circo_task7/qrels.txt")
    assert qrels["circo:0"] == {"circo:44"}


@pytest.fixture(scope="module")
def evaluated(converted, tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """Every set indexed, retrieved in its tasks' own pools and evaluated with the tiny Qwen2-VL."""
    return evaluate_zeroshot(tiny_backbone, converted, tmp_path_factory.mktemp("runs"), "[local]", "--batch_size=8")


@pytest.mark.parametrize("name", SETS)
def test_sets_end_to_end_with_the_tiny_model(name, evaluated, converted):
    """The numbers `evaluate` wrote equal a recomputation from the run files and the published ground truth."""
    results = json.loads((evaluated / name / "local" / "results.json").read_text())
    for task, scores in results["tasks"].items():
        run = read_run_file(evaluated / name / "local" / f"{task}.run")
        qrels = read_qrels(converted[name] / task / "qrels.txt")
        pool = len((converted[name] / task / "pool" / "ids.txt").read_text().split())
        if name not in GALLERIES:
            assert all(len(r) == min(50, pool) for r in run.ranked)  # the task's own pool, whole
        for k in (1, 5, 10):
            hits = [any(d in qrels[q] for d in r[:k]) for q, r in zip(run.qids, run.ranked, strict=True)]
            assert scores[f"R@{k}"] == pytest.approx(np.mean(hits))
        if name in GALLERIES:  # each query ranked within its own gallery, all of it
            gallery = {}
            for line in (converted[name] / task / "galleries.jsonl").read_text().splitlines():
                gallery[json.loads(line)["qid"]] = json.loads(line)["ids"]
            assert {q: sorted(r) for q, r in zip(run.qids, run.ranked, strict=True)} == {
                q: sorted(ids) for q, ids in gallery.items()
            }
            for k in (2, 3) if name == "genecis" else ():
                hits = [any(d in qrels[q] for d in r[:k]) for q, r in zip(run.qids, run.ranked, strict=True)]
                assert scores[f"R@{k}"] == pytest.approx(np.mean(hits))
            continue
        for k in (5, 10, 25, 50) if name == "circo" else ():
            aps = []
            for q, r in zip(run.qids, run.ranked, strict=True):
                found, total = 0, 0.0
                for i, d in enumerate(r[:k], start=1):
                    if d in qrels[q]:
                        found += 1
                        total += found / i
                aps.append(total / min(k, len(qrels[q])))
            assert scores[f"mAP@{k}"] == pytest.approx(np.mean(aps))


def test_zeroshot_report_is_one_table(evaluated):
    proc = ok(lamra_here("zeroshot-report", f"--runs={evaluated}", f"--sets=[{','.join(SETS)}]"))
    table = json.loads((evaluated / "zeroshot.json").read_text())["table"]
    assert list(table) == [
        "flickr30k T2I R@1",
        "flickr30k I2T R@1",
        "coco T2I R@1",
        "coco I2T R@1",
        "sharegpt4v T2I R@1",
        "sharegpt4v I2T R@1",
        "urban1k T2I R@1",
        "urban1k I2T R@1",
        "circo CIR mAP@5",
        "genecis_change_object CIR R@1",
        "genecis_focus_attribute CIR R@1",
        "visdial T2I R@1",
        "ccneg I2T R@1",
        "sugarcrepe_add_att I2T R@1",
        "sugarcrepe_swap_obj I2T R@1",
    ]
    circo = json.loads((evaluated / "circo" / "local" / "results.json").read_text())["tasks"]["circo_task7"]
    assert table["circo CIR mAP@5"] == circo["mAP@5"]
    assert "| circo CIR mAP@5 |" in proc.stdout and (evaluated / "zeroshot.md").is_file()


@pytest.mark.slow
def test_make_zeroshot_converts_evaluates_and_tabulates(raw, tiny_backbone, tmp_path):
    # A VENV of its own whose install stamp is up to date: `make zeroshot` needs `venv`, which would otherwise
    # `pip install -e` this checkout into the running venv whenever pyproject.toml is newer than its stamp.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "lamra-pl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lamra_pl "$@"\n')
    (venv / "bin" / "lamra-pl").chmod(0o755)
    (venv / ".installed-cpu").touch()
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "zeroshot",
            f"VENV={venv}",
            "FAISS=cpu",
            f"MODEL={tiny_backbone}",
            "SETS=urban1k circo visdial",
            f"ZEROSHOT_RAW={raw['circo'].parent}",
            f"ZEROSHOT_DATA={tmp_path / 'data'}",
            f"ZEROSHOT_RUNS={tmp_path / 'runs'}",
            "ARGS=--batch_size=8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / "data" / "circo" / "eval" / "val" / "circo_task7" / "task.json").is_file()
    table = json.loads((tmp_path / "runs" / "zeroshot.json").read_text())["table"]
    assert list(table) == ["urban1k T2I R@1", "urban1k I2T R@1", "circo CIR mAP@5", "visdial T2I R@1"]
