"""MixDataModule: shard sources drawn at the configured ratios, optionally one task per batch, resumable."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lamra_pl.data.mix import MixDataModule
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import Record, encode_record
from lamra_pl.formats.shards import write_shards

TASKS = {"a/task0": 30, "a/task1": 10, "b/task1": 20}  # source/task folder: samples


class QueryIds:
    """A collator that keeps only what these tests look at: which samples a batch holds."""

    def choose(self, record: Record, rng: random.Random | None, num_negatives: int) -> str:
        return record.qid

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        return {"query_ids": list(examples)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mix")
    for task, n in TASKS.items():
        samples = [
            encode_record(f"s{i:03d}", qid=f"{task}:{i}", query={"txt": "q"}, positives=[{"id": f"d{i}", "txt": "d"}])
            for i in range(n)
        ]
        write_shards(samples, root / task, maxcount=8)
    return root


def stream(root: Path, ratios: dict[str, float], homogeneous: bool, rank: int = 0, world: int = 1, **kw: Any):
    data = MixDataModule(
        sources={str(root / s): r for s, r in ratios.items()}, homogeneous=homogeneous, num_workers=0, **kw
    )
    data.collate, data.rank, data.world = QueryIds(), rank, world
    data.train_dataloader()
    return data._stream


def task_of(qid: str) -> str:
    return qid.rsplit(":", 1)[0]


def test_mixed_batches_draw_each_query_at_the_configured_ratios(sources):
    s = stream(sources, {"a": 0.7, "b": 0.3}, homogeneous=False, batch_size=4)
    qids = [q for b in range(1000) for q in s.batch(b)["query_ids"]]
    share_a = sum(q.startswith("a/") for q in qids) / len(qids)
    assert abs(share_a - 0.7) < 0.02, share_a
    assert len({task_of(q) for q in s.batch(0)["query_ids"] + s.batch(1)["query_ids"]}) > 1  # batches mix
    # Within a source, samples come in passes: its first 20 draws are its 20 samples, once each.
    from_b = [q for q in qids if q.startswith("b/")][: TASKS["b/task1"]]
    assert len(set(from_b)) == TASKS["b/task1"]


def test_homogeneous_batches_hold_one_task_and_tasks_come_at_the_configured_ratios(sources):
    s = stream(sources, {"a": 0.7, "b": 0.3}, homogeneous=True, batch_size=2)
    batches = [s.batch(b)["query_ids"] for b in range(4000)]
    assert all(len({task_of(q) for q in batch}) == 1 for batch in batches)
    tasks = Counter(task_of(batch[0]) for batch in batches)
    # A source's ratio is split over its tasks by their sizes: a/task0 0.7 * 30/40, a/task1 0.7 * 10/40, b 0.3.
    want = {"a/task0": 0.525, "a/task1": 0.175, "b/task1": 0.3}
    for task, p in want.items():
        assert abs(tasks[task] / len(batches) - p) < 0.02, (task, tasks[task] / len(batches))


def test_ranks_share_each_batch_task_and_its_passes_and_batches_are_pure_functions(sources):
    kw = {"batch_size": 3, "homogeneous": True}
    ranks = [stream(sources, {"a": 1, "b": 1}, rank=r, world=2, **kw) for r in (0, 1)]
    drawn: dict[str, list[str]] = {}  # per task, its samples in global order (query j of rank 0, of rank 1, ...)
    for b in range(200):
        one, two = (r.batch(b)["query_ids"] for r in ranks)
        assert {task_of(q) for q in one + two} == {task_of(one[0])}
        drawn.setdefault(task_of(one[0]), []).extend(q for pair in zip(one, two, strict=True) for q in pair)
    # Over both ranks, a task's samples come in passes: each run of n draws is its n samples, once each.
    for task, seq in drawn.items():
        n = TASKS[task]
        assert len(seq) >= 2 * n
        assert all(len(set(seq[i : i + n])) == n for i in range(0, len(seq) - n + 1, n)), task
    fresh = stream(sources, {"a": 1, "b": 1}, rank=1, world=2, **kw)
    assert fresh.batch(37)["query_ids"] == ranks[1].batch(37)["query_ids"]  # what a resumed run reads


def test_bad_sources_are_named_errors(sources, tmp_path):
    with pytest.raises(LamraError, match="ratio must be a finite number > 0"):
        stream(sources, {"a": 0.0, "b": 1}, homogeneous=False)
    with pytest.raises(LamraError, match="more than one source"):
        MixDataModule(sources={str(sources / "a"): 1, str(sources / "a/task0"): 1}).build_index()
    # A resumed run must draw batch b as the interrupted one did: what that depends on is saved and checked.
    saved = MixDataModule(sources={str(sources / s): 1 for s in "ab"}, homogeneous=True, batch_size=4, num_workers=0)
    saved.collate = QueryIds()
    state = saved.state_dict()
    resumed = MixDataModule(sources={str(sources / s): 1 for s in "ab"}, homogeneous=True, batch_size=8, num_workers=0)
    resumed.collate = QueryIds()
    resumed.load_state_dict(state)
    with pytest.raises(LamraError, match="batch_size"):
        resumed.train_dataloader()
    with pytest.raises(LamraError, match="not data.train_shards"):
        MixDataModule(sources={str(sources / "a"): 1}, train_shards=str(sources / "b"))
