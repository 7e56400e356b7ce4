"""Shards: writer round trip, exactly-once evaluation over ranks and workers, equal training batches."""

from __future__ import annotations

import gc
import json
import sys
from itertools import islice

import pytest
import torch
import webdataset as wds

from conftest import text_to_image_samples
from lamra_pl.data.datamodule import ShardDataModule
from lamra_pl.data.evaluation import eval_pipeline
from lamra_pl.data.stream import SampleIndex, TrainStream
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import Item, Record, decode_record, evaluation_query, format_text, with_instruction
from lamra_pl.formats.shards import (
    INCOMPLETE,
    MARKER_HEADER,
    expand_shards,
    incomplete_entries,
    mark_incomplete,
    unmark_incomplete,
    write_shards,
)
from lamra_pl.models.embedding_inputs import choose_example


class IdsOnly:
    """A collator that keeps only what these tests look at."""

    choose = staticmethod(choose_example)

    def __call__(self, examples):
        return {"query_ids": [e.query.id for e in examples], "n_neg": [len(e.negatives) for e in examples]}


ids_only = IdsOnly()


def test_writer_round_trip_and_sizes(tmp_path):
    sizes = write_shards(text_to_image_samples(negatives=2), tmp_path, maxcount=5)
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2}
    assert json.loads((tmp_path / "sizes.json").read_text()) == sizes
    urls = expand_shards(str(tmp_path))
    assert len(SampleIndex.build(urls)) == 12
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(urls[:1]), wds.tarfile_to_samples())))
    record = decode_record(sample)
    assert record.query.text == "red circle" and record.query.image is None
    assert record.positives[0].image.size == (56, 56) and record.positives[0].modality == "image"
    assert [n.id for n in record.negatives] == ["img:green-circle", "img:blue-circle"]
    assert sample["pos0.png"][:4] == b"\x89PNG"  # image bytes stored as given


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2)])
def test_evaluation_reads_every_sample_exactly_once(tmp_path, world, workers):
    write_shards(text_to_image_samples(repeat=3), tmp_path, maxcount=5)  # 36 samples in 8 shards
    urls = expand_shards(str(tmp_path))
    seen = []
    for rank in range(world):
        pipeline = eval_pipeline(urls, batch_size=4, collate=ids_only, num_negatives=0, rank=rank, world=world)
        for batch in wds.WebLoader(pipeline, batch_size=None, num_workers=workers):
            seen += batch["query_ids"]
    assert sorted(seen) == sorted(f"q{r}:{i}" for r in range(3) for i in range(12))


def train_stream(folder, **kwargs) -> TrainStream:
    index = SampleIndex.build(expand_shards(str(folder)))
    settings = {"collate": ids_only, "batch_size": 5, "num_negatives": 0, "seed": 0, "rank": 0, "world": 1}
    return TrainStream(index, **{**settings, "batches_per_epoch": 7, **kwargs})


def test_training_batches_are_full_and_carry_the_requested_negatives(tmp_path):
    write_shards(text_to_image_samples(negatives=3), tmp_path, maxcount=4)
    batches = list(train_stream(tmp_path, num_negatives=2))
    assert len(batches) == 7 and all(len(b["query_ids"]) == 5 and b["n_neg"] == [2] * 5 for b in batches)
    assert [b["stream_batch"] for b in batches] == list(range(7))


@pytest.mark.parametrize("world,workers", [(1, 2), (3, 2)])
def test_a_pass_uses_every_sample_once_over_ranks_and_the_workers_do_not_change_the_data(tmp_path, world, workers):
    write_shards(text_to_image_samples(repeat=5), tmp_path, maxcount=7)  # 60 samples in 9 uneven shards
    per_rank = 60 // (4 * world)
    seen, alone = [], []
    for rank in range(world):
        stream = train_stream(tmp_path, batch_size=4, rank=rank, world=world, batches_per_epoch=per_rank)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        seen += [q for b in loader for q in b["query_ids"]]
        again = train_stream(tmp_path, batch_size=4, rank=rank, world=world, batches_per_epoch=per_rank)
        alone += [q for b in again for q in b["query_ids"]]
    assert seen == alone  # worker count and order are invisible in the data
    assert sorted(seen) == sorted(f"q{r}:{i}" for r in range(5) for i in range(12))


def test_stream_started_at_a_batch_equals_the_stream_read_to_it(tmp_path):
    write_shards(text_to_image_samples(repeat=2), tmp_path, maxcount=5)  # 24 samples: passes of 4.8 batches
    full = [b["query_ids"] for b in islice(_epochs(train_stream(tmp_path, batches_per_epoch=3)), 12)]
    later = train_stream(tmp_path, batches_per_epoch=3, start_batch=5, start_entry=5 * 5)
    assert [b["query_ids"] for b in islice(_epochs(later), 7)] == full[5:]
    assert full[0] != full[5]  # a new pass is a new order


def _epochs(stream: TrainStream):
    while True:
        yield from stream


def test_too_few_negatives_is_a_clear_error(tmp_path):
    write_shards(text_to_image_samples(negatives=1), tmp_path)
    pipeline = eval_pipeline(
        expand_shards(str(tmp_path)), batch_size=4, collate=ids_only, num_negatives=2, rank=0, world=1
    )
    batch = next(iter(pipeline))
    with pytest.raises(BadSampleError, match="has 1 hard negatives but data.num_negatives is 2"):
        ShardDataModule().on_before_batch_transfer(batch, 0)


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(LamraError, match="holds no .tar files"):
        expand_shards(str(tmp_path))
    with pytest.raises(LamraError, match="shard-000003.tar"):
        expand_shards(str(tmp_path / "shard-{000003..000004}.tar"))


def test_a_write_that_fails_midway_leaves_its_folder_marked_and_nothing_on_stderr(tmp_path, capfd, monkeypatch):
    """A sample source that raises while a shard is open: the partial tar is discarded without the tar stream's
    finaliser writing to the closed file ("Exception ignored in: _Stream.__del__" on stderr)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # pytest would turn them into warnings

    def samples():
        for i, sample in enumerate(text_to_image_samples()):
            if i == 3:
                raise RuntimeError("the source failed")
            yield sample

    def write() -> None:
        with pytest.raises(RuntimeError, match="the source failed"):
            write_shards(samples(), tmp_path, maxcount=100)

    write()
    gc.collect()
    assert unraisable == [] and "Exception ignored" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [INCOMPLETE]  # no temporary tar; the folder is refused
    with pytest.raises(LamraError, match="is incomplete"):
        expand_shards(str(tmp_path))
    assert write_shards(text_to_image_samples(), tmp_path) == {"shard-000000.tar": 12}
    assert not (tmp_path / INCOMPLETE).exists()


def test_every_writer_keeps_the_one_in_progress_marker_format(tmp_path):
    """`.lamra_pl_incomplete`: MARKER_HEADER, then `<writer> <entry>` lines; each writer removes only its own."""
    mark_incomplete(tmp_path, "convert-mbeir", "train/a", "train/b")
    mark_incomplete(tmp_path, "convert-mbeir", "train/a")  # listed once
    write_shards(text_to_image_samples(), tmp_path / "sub")
    marker = tmp_path / INCOMPLETE
    mark_incomplete(tmp_path, "write_shards", "shard")
    assert marker.read_text() == f"{MARKER_HEADER}\nconvert-mbeir train/a\nconvert-mbeir train/b\nwrite_shards shard\n"
    with pytest.raises(LamraError, match="is incomplete"):
        expand_shards(str(tmp_path / "sub"))  # a folder above is being written
    unmark_incomplete(tmp_path, "write_shards", "shard")
    assert incomplete_entries(tmp_path) == [("convert-mbeir", "train/a"), ("convert-mbeir", "train/b")]
    unmark_incomplete(tmp_path, "convert-mbeir")
    assert not marker.exists() and len(expand_shards(str(tmp_path / "sub"))) == 1

    # What `write_shards` leaves while it writes (seen from the sample source), and a marker of another format.
    def samples():
        yield from text_to_image_samples()[:2]
        assert (tmp_path / "w" / INCOMPLETE).read_text() == f"{MARKER_HEADER}\nwrite_shards part\n"

    write_shards(samples(), tmp_path / "w", prefix="part")
    assert not (tmp_path / "w" / INCOMPLETE).exists()
    for foreign in ("part\n", f"{MARKER_HEADER}\nwrite_shards part"):  # another format; cut short
        (tmp_path / "w" / INCOMPLETE).write_text(foreign)
        with pytest.raises(LamraError, match="not a lamra-pl in-progress marker") as err:
            write_shards(text_to_image_samples(), tmp_path / "w", prefix="part")
        assert "\n" not in str(err.value)


def test_instruction_is_prepended_and_formatted():
    assert format_text('  "a dog running\r" ') == "A dog running."
    assert (
        with_instruction("Find an image that matches the caption", "a dog")
        == "Find an image that matches the caption a dog."
    )
    assert with_instruction(None, "raw text") == "raw text"


def test_evaluation_instruction_is_deterministic_per_query():
    records = [
        Record(
            key=f"k{i}",
            qid=f"9:{i}",
            query=Item(f"9:{i}", text=f"query {i}"),
            positives=[Item("9:0", text="x")],
            instructions=["Find A.", "Find B.", "Find C.", "Find D."],
        )
        for i in range(40)
    ]
    assert all(evaluation_query(r).text == f"Find A. query {i}." for i, r in enumerate(records))  # first prompt
    seeded = {r.qid: evaluation_query(r, 7).text for r in records}
    assert {r.qid: evaluation_query(r, 7).text for r in reversed(records)} == seeded  # order does not matter
    assert len({t.split()[1] for t in seeded.values()}) == 4  # all four prompts drawn across queries
    assert {r.qid: evaluation_query(r, 8).text for r in records} != seeded


def test_no_instruction_ablation_leaves_queries_bare_in_training_and_evaluation(tiny_backbone, tmp_path):
    """`model.instructions: false`: the collator's training choice and every evaluation read drop the
    instruction, so the model is evaluated as it was trained."""
    import random

    from lamra_pl.data.items import ChunkedItems, Job, plan
    from lamra_pl.models.backbone import BackboneSpec
    from lamra_pl.models.embedding import EmbeddingModule

    record = decode_record(text_to_image_samples()[0])
    with_ = EmbeddingModule(BackboneSpec(tiny_backbone)).collator()
    without = EmbeddingModule(BackboneSpec(tiny_backbone), instructions=False).collator()
    assert with_.choose(record, random.Random(0), 0).query.text == "Find the picture of this shape. red circle."
    assert without.choose(record, random.Random(0), 0).query.text == "red circle"
    assert without.choose(record, None, 0).query.text == "red circle"
    write_shards(text_to_image_samples(), tmp_path / "queries", maxcount=12)
    chunks = plan([Job("q", (str(tmp_path / "queries"),), "queries")])
    texts = [r["txt"] for batch in ChunkedItems(chunks, without, batch_size=4) for r in batch["records"]]
    assert len(texts) == 12 and not any("Find" in t for t in texts)
    texts = [r["txt"] for batch in ChunkedItems(chunks, with_, batch_size=4) for r in batch["records"]]
    assert all(t.startswith("Find the picture of this shape.") for t in texts)
