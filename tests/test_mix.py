"""MixDataModule: shard sources drawn at the configured ratios, optionally one task per batch, resumable."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Trainer

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


# ---------------------------------------------------------------------------- interleaved sub-batches (VLM2Vec-V2)
def sub_batches(batch: list[str], size: int) -> list[list[str]]:
    return [batch[i : i + size] for i in range(0, len(batch), size)]


def source_of(qid: str) -> str:
    return qid.split("/", 1)[0]


@pytest.mark.parametrize("homogeneous", [False, True], ids=["by_source", "by_task"])
def test_each_interleaved_sub_batch_is_one_group_and_groups_come_at_the_configured_ratios(sources, homogeneous):
    s = stream(sources, {"a": 0.7, "b": 0.3}, homogeneous=homogeneous, batch_size=6, sub_batch_size=2)
    batches = [s.batch(b)["query_ids"] for b in range(1000)]
    group_of = task_of if homogeneous else source_of
    subs = [sub for batch in batches for sub in sub_batches(batch, 2)]
    assert len(subs) == 3000 and all(len({group_of(q) for q in sub}) == 1 for sub in subs)
    # Sub-batches of a global batch are drawn independently: most batches mix groups, so in-batch negatives are
    # both of the query's own group (its sub-batch) and of others.
    assert sum(len({group_of(q) for q in batch}) > 1 for batch in batches) > 500
    counts = Counter(group_of(sub[0]) for sub in subs)
    # By source: 0.7 / 0.3. By task, a source's ratio is split over its tasks by their sizes (as `homogeneous`).
    want = {"a/task0": 0.525, "a/task1": 0.175, "b/task1": 0.3} if homogeneous else {"a": 0.7, "b": 0.3}
    for group, p in want.items():
        # 0.035 is over 4 standard deviations of a share of 3000 draws (sqrt(0.21 / 3000) = 0.0084).
        assert abs(counts[group] / len(subs) - p) < 0.035, (group, counts[group] / len(subs))
    # Within a group, samples come in passes: each run of n draws is the group's n samples, once each.
    drawn: dict[str, list[str]] = {}
    for q in (q for batch in batches for q in batch):
        drawn.setdefault(group_of(q), []).append(q)
    for group, seq in drawn.items():
        n = sum(size for task, size in TASKS.items() if group_of(f"{task}:0") == group)
        assert len(seq) >= 2 * n
        assert all(len(set(seq[i : i + n])) == n for i in range(0, len(seq) - n + 1, n)), group


@pytest.mark.parametrize("sub_batch_size", [2, 8], ids=["within_ranks", "across_ranks"])
def test_two_ranks_hold_disjoint_slices_of_the_global_batch_laid_out_in_rank_order(sources, sub_batch_size):
    kw = {"batch_size": 4, "sub_batch_size": sub_batch_size, "homogeneous": True}
    ranks = [stream(sources, {"a": 1, "b": 1}, rank=r, world=2, **kw) for r in (0, 1)]
    # The documented layout: rank r's batch is places r x batch_size ... of the global batch, which is the batch a
    # single process with batch_size x world queries draws; sub-batches are consecutive places of it.
    alone = stream(sources, {"a": 1, "b": 1}, **{**kw, "batch_size": 8})
    drawn: dict[str, list[str]] = {}  # per task, its samples in global order
    for b in range(100):
        one, two = (r.batch(b)["query_ids"] for r in ranks)
        whole = alone.batch(b)["query_ids"]
        assert one + two == whole
        assert all(len({task_of(q) for q in sub}) == 1 for sub in sub_batches(whole, sub_batch_size))
        for q in whole:
            drawn.setdefault(task_of(q), []).append(q)
    # The ranks' parts are disjoint within each of a task's passes: each run of n draws is its n samples, once each.
    for task, seq in drawn.items():
        n = TASKS[task]
        assert len(seq) >= 2 * n
        assert all(len(set(seq[i : i + n])) == n for i in range(0, len(seq) - n + 1, n)), task
    if sub_batch_size == 8:  # a sub-batch spanning both ranks: one task on both
        assert all(
            task_of(ranks[0].batch(b)["query_ids"][0]) == task_of(ranks[1].batch(b)["query_ids"][0]) for b in range(20)
        )


def read(data: MixDataModule, batches: int) -> list[list[str]]:
    """The next `batches` training batches as the Trainer sees them (the DataModule counting them as used)."""
    out = []
    for batch in data.train_dataloader():
        out.append(data.on_before_batch_transfer(batch, 0)["query_ids"])
        if len(out) == batches:
            return out
    raise AssertionError("the epoch ended early")


def test_interleaved_stream_resumes_exactly_from_a_checkpoint(sources):
    def module(workers: int = 0, **kw: Any) -> MixDataModule:
        settings = {"homogeneous": True, "batch_size": 6, "sub_batch_size": 3, "batches_per_epoch": 40, **kw}
        data = MixDataModule(
            sources={str(sources / s): r for s, r in {"a": 2, "b": 1}.items()}, num_workers=workers, seed=5, **settings
        )
        data.collate = QueryIds()
        return data

    uninterrupted = read(module(), 30)
    interrupted = module()
    read(interrupted, 12)
    state = interrupted.state_dict()  # what a checkpoint after batch 11 holds
    assert state["mix"]["sub_batch_size"] == 3
    resumed = module(workers=2)  # other worker processes: the same data
    resumed.load_state_dict(state)
    assert read(resumed, 18) == uninterrupted[12:]
    # What batch b holds depends on the sub-batch size: a resume with another is refused, naming it.
    other = module(sub_batch_size=2)
    other.load_state_dict(state)
    with pytest.raises(LamraError, match=r"sub_batch_size.*3.*2"):
        other.train_dataloader()
    # A checkpoint written before sub-batches existed had none: it resumes a run without them.
    plain = module(sub_batch_size=None)
    old = {**plain.state_dict(), "mix": {k: v for k, v in plain._settings().items() if k != "sub_batch_size"}}
    plain.load_state_dict(old)
    assert len(read(plain, 1)[0]) == 6


def test_an_unusable_sample_is_replaced_in_its_place_from_its_sub_batch_group(tmp_path):
    # Source "x": every other sample lacks the hard negative data.num_negatives asks for (an unusable sample).
    for source, broken in (("x", True), ("y", False)):
        samples = [
            encode_record(
                f"s{i:03d}",
                qid=f"{source}/t:{i}",
                query={"txt": "q"},
                positives=[{"id": "p", "txt": "p"}],
                negatives=[] if broken and i % 2 else [{"id": "n", "txt": "n"}],
            )
            for i in range(12)
        ]
        write_shards(samples, tmp_path / source / "t", maxcount=4)
    s = stream(tmp_path, {"x": 1, "y": 1}, homogeneous=False, batch_size=8, sub_batch_size=4, num_negatives=1)
    batches = [s.batch(b) for b in range(30)]
    assert sum(int(batch["skipped"].sum()) for batch in batches) > 0
    for batch in batches:
        subs = sub_batches(batch["query_ids"], 4)
        assert all(len({source_of(q) for q in sub}) == 1 for sub in subs)
        assert not [q for q in batch["query_ids"] if q.startswith("x/") and int(q.rsplit(":", 1)[1]) % 2]


def test_a_sub_batch_size_that_does_not_divide_the_global_batch_is_refused(sources):
    with pytest.raises(
        LamraError,
        match=r"data.sub_batch_size=3 does not divide the global batch, "
        r"data.batch_size x world = 4 x 2 = 8",
    ):
        stream(sources, {"a": 1, "b": 1}, homogeneous=False, batch_size=4, sub_batch_size=3, rank=1, world=2)
    for bad in (0, -2, True, 2.5):
        with pytest.raises(LamraError, match="data.sub_batch_size must be a whole number >= 1"):
            MixDataModule(sources={str(sources / "a"): 1}, sub_batch_size=bad)
    # Under a Trainer the refusal comes at setup, before the model is set up.
    data = MixDataModule(sources={str(sources / "a"): 1}, batch_size=4, sub_batch_size=3)
    data.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(LamraError, match="4 x 1 = 4"):
        data.setup("fit")
