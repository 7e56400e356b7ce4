"""A real `lamra-pl fit` over a shard folder full of faults: it finishes, counts every fault, loses nothing else."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import png, shape_image, text_to_image_samples
from helpers import fit_tiny_with_callbacks, scalars
from lamra_pl.formats.shards import write_shards
from lamra_pl.formats.tar_index import scan_tar

SAMPLE_FAULTS = ("unreadable_image", "oversized_image", "bad_sample", "sample_error")


def faulty_shards(folder: Path) -> dict[str, list[str]]:
    """24 samples in 3 shards plus two unreadable files; returns the qids by what should become of them."""
    samples = text_to_image_samples(repeat=2)
    qid = [json.loads(s["json"])["qid"] for s in samples]

    def edit(i: int, change) -> None:
        record = json.loads(samples[i]["json"])
        change(record)
        samples[i]["json"] = json.dumps(record).encode()

    samples[2]["pos0.png"] = b"\x89PNG\r\n\x1a\n not an image"  # unreadable image
    samples[12]["pos0.png"] = png(shape_image("red", "circle", size=80))[0]  # 6400 pixels, over the 5000 allowed
    edit(9, lambda r: r["query"].update(txt="   "))  # empty text
    edit(5, lambda r: r.update(instructions=5))  # a field of the wrong type: the reader raises in the worker
    write_shards(samples[:16], folder, prefix="good", maxcount=8)
    write_shards(samples[16:], folder, prefix="cut", maxcount=8)
    cut = folder / "cut-000000.tar"
    ranges = scan_tar(str(cut)).samples
    os.truncate(cut, (ranges[5].start + ranges[5].end) // 2)  # mid-sample: samples 16..20 survive
    (folder / "garbage.tar").write_bytes(os.urandom(3000))
    (folder / "gone.tar").symlink_to(folder / "deleted-long-ago.tar")
    unusable = [qid[i] for i in (2, 5, 9, 12)]
    lost = qid[21:]
    return {"unusable": unusable, "lost": lost, "good": [q for q in qid if q not in unusable + lost]}


@pytest.mark.slow
def test_training_survives_every_fault_and_accounts_for_every_sample(tiny_backbone, tmp_path, finding):
    shards = tmp_path / "shards"
    fate = faulty_shards(shards)
    record, runs = tmp_path / "steps.jsonl", tmp_path / "runs"
    callbacks = [
        {"class_path": "inject.Recorder", "init_args": {"path": str(record)}},
        {"class_path": "inject.NonFiniteAt", "init_args": {"steps": [2, 3]}},
    ]
    steps = 7  # 21 readable samples / batch 3: exactly one pass
    proc = fit_tiny_with_callbacks(
        tmp_path,
        callbacks,
        f"--model.init_args.backbone.path={tiny_backbone}",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=3",
        "--data.init_args.num_workers=2",
        "--data.init_args.max_image_pixels=5000",
        f"--trainer.max_steps={steps}",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={runs}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {tag: values[-1][1] for tag, values in scalars(runs / "tiny_stage2" / "version_0").items()}
    counts = {
        reason: int(logged[f"data/skipped_{reason}"])
        for reason in (*SAMPLE_FAULTS, "damaged_shard", "unreadable_shard")
    }
    assert counts["damaged_shard"] == 1 and counts["unreadable_shard"] == 2
    assert all(counts[reason] >= 1 for reason in SAMPLE_FAULTS), counts
    assert logged["train/nonfinite_steps"] == 2
    assert "cut-000000.tar is damaged" in proc.stderr and "garbage.tar: it cannot be read" in proc.stderr
    assert "gone.tar: it cannot be read" in proc.stderr

    seen = Counter(q for line in record.read_text().splitlines() for q in json.loads(line)["qids"])
    assert sum(seen.values()) == steps * 3  # every batch full
    assert not set(seen) & set(fate["unusable"] + fate["lost"])
    assert set(seen) == set(fate["good"])  # every readable, usable sample was trained on
    # Each unusable sample's place in the pass was refilled once by a seeded draw (a draw that hit an unusable
    # sample again was counted and drawn again): the repeats are exactly those refills.
    replacements = sum(seen.values()) - len(seen)
    assert replacements == len(fate["unusable"]) <= sum(counts[r] for r in SAMPLE_FAULTS)

    finding(
        "a shard truncated mid-sample",
        "the samples before the cut are used; the shard is counted (`damaged_shard`) and named",
    )
    finding("a file that is not a tar; a dangling link", "skipped, counted (`unreadable_shard`) and named")
    finding("an undecodable image", "the sample is replaced by a seeded draw and counted (`unreadable_image`)")
    finding("an image over `data.max_image_pixels`", "replaced before decoding, counted (`oversized_image`)")
    finding("an empty query text", "replaced, counted (`bad_sample`), named with shard and key")
    finding("a reader or collator raising in a data worker", "replaced, counted (`sample_error`); the run goes on")
    finding("NaN gradients at two steps", "both optimizer steps skipped, counted (`train/nonfinite_steps`)")
    finding(
        "the whole run above",
        f"finished; all {len(fate['good'])} usable samples were trained on, and the {replacements} places of "
        "the unusable ones in the pass were refilled by counted draws",
    )


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_message(tiny_backbone, shape_shards, tmp_path, finding):
    always = {"class_path": "inject.NonFiniteAt", "init_args": {"steps": list(range(10))}}
    guard = {"class_path": "lamra_pl.NonFiniteGuard", "init_args": {"max_in_a_row": 2}}
    proc = fit_tiny_with_callbacks(
        tmp_path,
        [always, guard],
        f"--model.init_args.backbone.path={tiny_backbone}",
        f"--data.init_args.train_shards={shape_shards}",
        "--data.init_args.batch_size=4",
        "--trainer.max_steps=10",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "3 steps in a row had non-finite gradients" in proc.stderr
    assert "NonFiniteGuard callback's max_in_a_row=2" in proc.stderr
    finding(
        "NaN gradients at every step", "stops after `NonFiniteGuard`'s `max_in_a_row` in a row, with a one-line error"
    )
