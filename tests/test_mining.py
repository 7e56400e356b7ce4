"""`lamra-pl mine`: MM-Embed's modality-aware hard negatives, checked rule by rule and end to end."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from helpers import clean_error, lamra_here, ok
from lamra_pl.data.candidates import CandidateStore
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import decode_record
from lamra_pl.formats.shards import expand_shards
from lamra_pl.pipelines.mine import MiningSpec, mine_query
from lamra_pl.recipes.mbeir import convert

FIXTURE = Path(__file__).parent / "fixtures" / "mbeir_tiny"
MODALITIES = ("text", "image", "image,text")


def check(negatives, ranked, positives, modality, spec) -> None:
    """The rules of the spec for one query's mined negatives."""
    assert not set(negatives) & set(positives), "a positive was mined as a negative"
    assert len(negatives) == len(set(negatives))
    target = modality[positives[0]]
    first = next((r for r, d in enumerate(ranked) if d in positives), len(ranked))
    c1 = [d for d in negatives if modality[d] != target]
    for d in c1:  # C1: wrong modality, ranked above the first positive
        assert d in ranked and ranked.index(d) < first
    lo = spec.window[0]
    for d in negatives:  # C2 is inside the window; the random fill may come from below it, never from above
        if modality[d] == target and d in ranked:
            assert ranked.index(d) >= lo - 1


def test_mined_negatives_follow_the_rules_on_random_rankings():
    rng = random.Random(0)
    pool = [f"c{i}" for i in range(300)]
    modality = {d: rng.choice(MODALITIES) for d in pool}
    by_modality: dict[str, list[str]] = {}
    for d in pool:
        by_modality.setdefault(modality[d], []).append(d)
    spec = MiningSpec(c1=2, c2=2)
    counts: Counter[str] = Counter()
    for q in range(300):
        positives = rng.sample(pool, rng.randint(1, 3))
        ranked = rng.sample(pool, 50)
        if q % 3 == 0:  # the positive ranked high, low, or not at all
            ranked[rng.randint(0, 49)] = positives[0]
        negatives = mine_query(f"q{q}", ranked, positives, modality.__getitem__, by_modality, spec, counts)
        assert len(negatives) == 4  # filled up to c1 + c2
        check(negatives, ranked, positives, modality, spec)
    # Each source contributes; nothing is counted that was not written.
    assert counts["c1"] > 0 and counts["c2"] > 0 and counts["random"] > 0
    assert counts["c1"] + counts["c2"] + counts["random"] == 4 * 300


def test_the_ranks_the_rules_pick():
    modality = {"t1": "text", "t2": "text", "i1": "image", "i2": "image", "p": "image", "i3": "image", "t3": "text"}
    ranked = ["t1", "i1", "t2", "p", "t3", "i2", "i3"]
    counts: Counter[str] = Counter()
    spec = MiningSpec(c1=5, c2=5, window=(6, 7))
    got = mine_query("q", ranked, ["p"], modality.__getitem__, {"image": ["i1", "i2", "i3", "p", "i4"]}, spec, counts)
    # C1: the texts above the image positive (t3, below it, is not); C2: the images at ranks 6-7; then the fill
    # takes the one image left that is not a positive, taken, or ranked above the window (i1), and is short.
    assert got == ["t1", "t2", "i2", "i3", "i4"]
    assert counts == Counter(c1=2, c2=2, random=1, short=1)
    # "topk" is modality-blind: the best-ranked non-positives.
    topk = MiningSpec(strategy="topk", c1=2, c2=1)
    assert mine_query("q", ranked, ["p"], modality.__getitem__, {}, topk, Counter()) == ["t1", "i1", "t2"]


@pytest.fixture(scope="module")
def retrieved(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """The fixture's training queries ranked against its whole union training pool (19 candidates, 3 modalities)."""
    root = tmp_path_factory.mktemp("mine")
    data = root / "data"
    convert(str(FIXTURE), str(data))
    index, runs = root / "index", root / "runs"
    ok(lamra_here("index", f"--model={tiny_backbone}", f"--pool={data}/train_pool", f"--out={index}"))
    queries = f"{data}/train/*_task*"
    ok(
        lamra_here(
            "retrieve",
            f"--model={tiny_backbone}",
            f"--index={index}",
            f"--queries={queries}",
            "--pools=[global]",
            "--k=19",
            f"--out={runs}",
        )
    )
    return {"data": data, "runs": runs / "global"}


def test_mine_writes_shards_that_follow_the_rules(retrieved, tmp_path):
    out = tmp_path / "mined"
    proc = ok(lamra_here("mine", f"--runs={retrieved['runs']}", f"--out={out}", "--c1=1", "--c2=1", "--window=[15,19]"))
    report = json.loads((out / "report.json").read_text())
    assert json.loads(proc.stdout) == report
    store = CandidateStore([str(retrieved["data"] / "train_pool")])
    modality = {d: store.modality(d) for d in store.locations}
    manifest = json.loads((retrieved["runs"] / "runs.json").read_text())
    spec = MiningSpec(c1=1, c2=1, window=(15, 19))
    seen = short = written = 0
    for task, entry in manifest["tasks"].items():
        run = read_run_file(entry["run_file"])
        ranked = dict(zip(run.qids, run.ranked, strict=True))
        originals = {
            decode_record(s).qid: decode_record(s)
            for s in wds.DataPipeline(wds.SimpleShardList(expand_shards(entry["queries"])), wds.tarfile_to_samples())
        }
        mined = [
            decode_record(s)
            for s in wds.DataPipeline(wds.SimpleShardList(expand_shards(str(out / task))), wds.tarfile_to_samples())
        ]
        assert sorted(r.qid for r in mined) == sorted(originals)  # every training query kept, none dropped
        for record in mined:
            positives = [p.id for p in record.positives]
            assert positives == [p.id for p in originals[record.qid].positives]
            assert record.instructions == originals[record.qid].instructions
            negatives = [n.id for n in record.negatives]
            check(negatives, ranked[record.qid], positives, modality, spec)
            short += len(negatives) < 2
            written += len(negatives)
            seen += 1
        counts = report["tasks"][task]
        assert counts["samples"] == counts["queries"] == len(originals)
    # The mix is reported, and adds up to what was written. In this 19-candidate pool the text-to-text task runs
    # out of text candidates below the window: those queries are short, and counted as such.
    totals = Counter()
    for counts in report["tasks"].values():
        totals.update(counts)
    assert totals["c1"] + totals["c2"] + totals["random"] == written
    assert totals["short"] == short and 0 < short < 26
    assert totals["c1"] > 0 and totals["c2"] > 0  # wrong-modality candidates do rank above positives here
    assert seen == 26


def test_mine_refuses_local_runs_and_a_short_ranking(retrieved, tmp_path):
    clean_error(
        lamra_here("mine", f"--runs={retrieved['runs']}", f"--out={tmp_path / 'a'}", "--window=[46,50]"),
        "needs --k >= 50",
    )
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "old.tar").write_bytes(b"")
    clean_error(lamra_here("mine", f"--runs={retrieved['runs']}", f"--out={tmp_path / 'b'}"), "is not empty")
