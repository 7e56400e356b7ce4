"""Shards that read as something else: a zeroed file, a repeated key, shards changed under a run being resumed.

The training index (`lamra_pl.data.stream.SampleIndex`) counts and names a shard of zeros and a sample whose key
repeats inside its shard (the first one wins), and a real `lamra-pl fit --ckpt_path last` refuses, in one line, to
continue over shards that differ from those the checkpoint's run read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds

from conftest import text_to_image_samples
from helpers import clean_error, fit_tiny_with_callbacks, ok, scalars
from lamra_pl.data.datamodule import ShardDataModule, spec_root
from lamra_pl.data.stream import SampleIndex
from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import SKIP_REASONS, encode_record
from lamra_pl.formats.shards import expand_shards, write_shards
from lamra_pl.formats.tar_index import scan_tar
from lamra_pl.models.embedding_inputs import choose_example


def qid_of(sample: dict[str, Any]) -> str:
    return json.loads(sample["json"])["qid"]


def write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """Samples written in this order as they are, repeated keys included (`write_shards` refuses those)."""
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def repeated_key_shard(path: Path, samples: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """A shard of samples[:4] where samples[4] reuses the key of samples[0] (after other samples) and samples[5]
    that of samples[3] (right after it, where WebDataset would merge the two); returns (kept, repeated) qids."""
    first, later = samples[:4], [{**samples[4], "__key__": samples[0]["__key__"]}, {**samples[5]}]
    later[1]["__key__"] = samples[3]["__key__"]
    write_tar(path, [*first[:2], later[0], *first[2:], later[1]])
    return [qid_of(s) for s in first], [qid_of(s) for s in later]


def zero(path: Path) -> int:
    """Overwrite a shard with zeros, keeping its size (a disk or copy that lost the data)."""
    size = path.stat().st_size
    path.write_bytes(bytes(size))
    return size


def test_a_repeated_key_keeps_the_first_sample_and_is_counted_and_named(tmp_path, caplog, finding):
    samples = text_to_image_samples()
    kept, repeated = repeated_key_shard(tmp_path / "dup.tar", samples)
    scan = scan_tar(str(tmp_path / "dup.tar"), read=("json",))
    assert scan.damage is None
    assert [qid_of(s.data) for s in scan.samples] == kept  # the first sample with each key
    assert [s.key for s in scan.repeated] == [samples[0]["__key__"], samples[3]["__key__"]]
    assert all(sorted(m[0] for m in s.members) == ["json", "pos0.png"] for s in scan.samples)  # none merged

    index = SampleIndex.build([str(tmp_path / "dup.tar")])
    assert len(index) == 4 and index.lost == {"repeated_key": 2}
    indexed = [qid_of(index.sample(i)) for i in range(len(index))]
    assert sorted(indexed) == sorted(kept) and not set(indexed) & set(repeated)
    assert "dup.tar: 2 samples repeat the key of an earlier sample" in caplog.text
    assert repr(samples[0]["__key__"]) in caplog.text and repr(samples[3]["__key__"]) in caplog.text
    finding(
        "a key repeated inside a shard (after other samples, or right after its first sample)",
        "the first sample with the key is used; each later one is skipped, counted (`repeated_key`) and named "
        "with shard and key",
    )


def test_zeroed_and_empty_shards_are_counted_and_named(tmp_path, caplog, finding):
    write_shards(text_to_image_samples(), tmp_path, maxcount=6)
    urls = expand_shards(str(tmp_path))
    size = zero(Path(urls[0]))
    (tmp_path / "small-zeros.tar").write_bytes(bytes(tarfile.RECORDSIZE))  # reads as a complete empty tar
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    index = SampleIndex.build([*urls, str(tmp_path / "small-zeros.tar"), str(tmp_path / "empty.tar")])
    assert len(index) == 6 and index.lost == {"unreadable_shard": 1, "empty_shard": 2}
    assert f"{urls[0]}: it cannot be read, no sample in it (all its {size} bytes are zero)" in caplog.text
    assert "small-zeros.tar holds no sample: an empty tar of 10240 bytes (all zero)" in caplog.text
    assert "empty.tar holds no sample: an empty tar of 10240 bytes" in caplog.text
    finding(
        "a shard that is a complete tar without samples (or one tar record of zeros)",
        "counted (`empty_shard`) and named",
    )


def test_a_fit_over_a_zeroed_shard_and_a_repeated_key_trains_on_the_rest_and_counts_both(
    tiny_backbone, tmp_path, finding
):
    samples = text_to_image_samples(repeat=3)  # 36 distinct samples
    shards = tmp_path / "shards"
    write_shards(samples[:16], shards, prefix="good", maxcount=8)
    write_shards(samples[16:24], shards, prefix="zeroed", maxcount=8)
    size = zero(shards / "zeroed-000000.tar")
    kept, repeated = repeated_key_shard(shards / "dup-000000.tar", samples[24:30])
    good = [qid_of(s) for s in samples[:16]] + kept  # 20 samples: 5 batches of 4, one pass
    record, runs = tmp_path / "steps.jsonl", tmp_path / "runs"
    proc = ok(
        fit_tiny_with_callbacks(
            tmp_path,
            [{"class_path": "inject.Recorder", "init_args": {"path": str(record)}}],
            f"--model.init_args.backbone.path={tiny_backbone}",
            f"--data.init_args.train_shards={shards}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.max_steps=5",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={runs}",
        )
    )
    logged = {tag: values[-1][1] for tag, values in scalars(runs / "tiny_stage2" / "version_0").items()}
    counts = {reason: int(logged[f"data/skipped_{reason}"]) for reason in SKIP_REASONS}
    assert counts == {**dict.fromkeys(SKIP_REASONS, 0), "unreadable_shard": 1, "repeated_key": 2}
    assert f"zeroed-000000.tar: it cannot be read, no sample in it (all its {size} bytes are zero)" in proc.stderr
    assert "dup-000000.tar: 2 samples repeat the key of an earlier sample" in proc.stderr
    seen = [q for line in record.read_text().splitlines() for q in json.loads(line)["qids"]]
    assert sorted(seen) == sorted(good)  # every usable sample once; nothing of the zeroed shard
    assert not set(seen) & set(repeated)
    finding(
        "a shard overwritten with zeros (same size)",
        'skipped, counted (`unreadable_shard`) and named ("all its N bytes are zero"); training goes on with '
        "every sample of the other shards",
    )


# ------------------------------------------------------------------------------------------------ resume
def fit(tmp: Path, backbone: Path, shards: Path, steps: int, resume: bool = False):
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": 2},
    }
    return fit_tiny_with_callbacks(
        tmp,
        [checkpoints],
        f"--model.init_args.backbone.path={backbone}",
        f"--data.init_args.train_shards={shards}",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        f"--trainer.max_steps={steps}",
        f"--trainer.logger.init_args.save_dir={tmp / 'runs'}",
        "--trainer.logger.init_args.version=run",
        *(["--ckpt_path=last"] if resume else []),
    )


def data_state(checkpoint: Path) -> dict[str, Any]:
    saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
    return {"global_step": saved["global_step"], **saved[ShardDataModule.__qualname__]}


def test_resume_over_changed_shards_is_refused_naming_them(tiny_backbone, tmp_path, finding):
    samples = text_to_image_samples(repeat=2)
    shards = tmp_path / "shards"
    write_shards(samples, shards, maxcount=8)  # 24 samples in 3 shards
    last = tmp_path / "runs" / "tiny_stage2" / "run" / "checkpoints" / "last.ckpt"
    ok(fit(tmp_path, tiny_backbone, shards, steps=2))
    state = data_state(last)
    sizes = {p.name: p.stat().st_size for p in shards.glob("*.tar")}
    assert state["shards"] == {"files": {n: [sizes[n], 8] for n in sorted(sizes)}, "samples": 24}

    ok(fit(tmp_path, tiny_backbone, shards, steps=4, resume=True))  # the same shards: resumes
    assert data_state(last)["global_step"] == 4

    (shards / "shard-000001.tar").unlink()
    write_shards(samples[:5], tmp_path / "other", maxcount=8)  # other content under the same name
    shutil.copy(tmp_path / "other" / "shard-000000.tar", shards / "shard-000002.tar")
    refused = fit(tmp_path, tiny_backbone, shards, steps=6, resume=True)
    rewritten = (shards / "shard-000002.tar").stat().st_size
    clean_error(
        refused,
        "the training shards changed since the checkpoint was written",
        "shard shard-000001.tar is gone",
        f"shard shard-000002.tar was {sizes['shard-000002.tar']} bytes, is now {rewritten}",
    )
    errors = [line for line in refused.stderr.splitlines() if line.startswith("lamra-pl: error:")]
    assert len(errors) == 1 and "shard-000000.tar" not in errors[0]
    assert data_state(last)["global_step"] == 4  # refused before training
    finding(
        "training shards changed under a checkpoint (one deleted, one rewritten with other samples)",
        "`--ckpt_path last` exits 2 with one line naming each changed shard (gone; was N bytes, is now M); "
        "over the same shards it resumes",
    )


class IdsOnly:
    choose = staticmethod(choose_example)

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        return {"query_ids": [e.query.id for e in examples]}


def text_shard(path: Path, n: int) -> None:
    """n text-only samples of one 512-byte json member each: 3 or 4 of them make tars of the same size."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            record = encode_record(f"k{i}", qid=f"t:{i}", query={"txt": "a"}, positives=[{"id": "c", "txt": "b"}])
            data = record["json"].ljust(512)
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def datamodule(shards: Path, state: dict[str, Any] | None = None) -> ShardDataModule:
    dm = ShardDataModule(train_shards=str(shards), batch_size=2, num_workers=0)
    dm.connect(IdsOnly())
    if state is not None:
        dm.load_state_dict(state)
    dm.train_dataloader()
    return dm


def test_a_shard_of_the_same_size_with_other_samples_is_refused_and_old_checkpoints_resume(tmp_path, finding):
    shards = tmp_path / "shards"
    shards.mkdir()
    text_shard(shards / "a.tar", 4)
    text_shard(shards / "b.tar", 4)
    state = datamodule(shards).state_dict()
    assert state["shards"]["files"] == {"a.tar": [10240, 4], "b.tar": [10240, 4]}

    text_shard(shards / "b.tar", 3)
    assert (shards / "b.tar").stat().st_size == 10240
    with pytest.raises(LamraError, match="shard b.tar held 4 samples, now 3"):
        datamodule(shards, state)
    old = {k: v for k, v in state.items() if k != "shards"}  # written before the fingerprint existed
    assert datamodule(shards, old).consumed == 0
    # The names are relative to the spec's root, so a moved shard folder still resumes.
    moved = tmp_path / "moved"
    os.rename(shards, moved)
    text_shard(moved / "b.tar", 4)
    assert datamodule(moved, state).fingerprint == state["shards"]
    assert spec_root(str(moved / "{a,b}.tar")) == moved and spec_root(str(moved / "*.tar")) == moved
    finding(
        "a training shard rewritten with fewer samples at the same size in bytes",
        "the resume is refused once the index is built, naming the shard (held N samples, now M); a checkpoint "
        "from before the fingerprint resumes unchecked; a moved shard folder resumes",
    )


@pytest.mark.parametrize("fault", ["zeroed", "repeated key", "truncated"])
def test_evaluation_reads_refuse_a_shard_that_would_lose_or_merge_samples(tmp_path, fault, finding):
    """Indexing and evaluation must read every candidate: where training counts and skips, they stop, naming it."""
    from lamra_pl.formats.sample import encode_candidate
    from lamra_pl.formats.shards import read_samples

    pool = tmp_path / "pool"
    candidates = [encode_candidate(f"{i:08d}", id=f"9:{i}", txt=f"candidate {i}", image=None) for i in range(6)]
    write_shards(candidates[:3], pool, prefix="good")
    bad = pool / "bad-000000.tar"
    if fault == "repeated key":
        write_tar(bad, [*candidates[3:], {**candidates[5], "__key__": candidates[3]["__key__"]}])
    else:
        write_shards(candidates[3:], pool, prefix="bad")
        if fault == "zeroed":
            zero(bad)
        else:
            os.truncate(bad, bad.stat().st_size // 2)
    urls = expand_shards(str(pool))
    assert [s["__key__"] for s in read_samples(urls[1:])] == ["00000000", "00000001", "00000002"]  # the good one
    with pytest.raises(LamraError, match=f"shard {bad}"):
        list(read_samples(urls))
    proc = lamra_here_index(pool, tmp_path / "index")
    clean_error(proc, str(bad))
    assert not (tmp_path / "index" / "index.json").exists()
    finding(
        f"a pool shard {fault} (indexing, evaluation, the tools)",
        "these must read every candidate: exit 2 with one line naming the shard, no index written (training "
        "counts and skips the same shard instead)",
    )


def lamra_here_index(pool: Path, out: Path):
    from helpers import ROOT, lamra_here

    model = ROOT / "tests" / "fixtures" / "legacy_4ccdac6" / "merged"
    return lamra_here("index", f"--model={model}", f"--pool={pool}", f"--out={out}")
