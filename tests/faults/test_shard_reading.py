"""Shards that read as something else: a zeroed file, a repeated key, shards changed under a run being resumed,
tars written with larger records, empty shards.

The training index (`lamra_pl.data.stream.SampleIndex`) counts and names a shard of zeros and a sample whose key
repeats inside its shard (the first one wins), and a real `lamra-pl fit --ckpt_path last` refuses, in one line, to
continue over shards that differ from those the checkpoint's run read. The readers that must read every sample
(`read_samples`, `CandidateStore`) refuse what would lose or merge samples, and read a legitimately empty shard.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
import webdataset as wds

from conftest import text_to_image_samples
from helpers import clean_error, fit_tiny_with_callbacks, ok, scalars
from lamra_pl.data.candidates import CandidateStore
from lamra_pl.data.datamodule import ShardDataModule
from lamra_pl.data.evaluation import eval_pipeline
from lamra_pl.data.stream import SampleIndex
from lamra_pl.errors import LamraError
from lamra_pl.formats import shard_fingerprint, spec_root
from lamra_pl.formats.sample import SKIP_REASONS, encode_candidate, encode_record
from lamra_pl.formats.shards import expand_shards, read_samples, write_shards
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
    tags = {f"data/skipped_{reason}": reason for reason in SKIP_REASONS}
    counts = {tags[tag]: int(value) for tag, value in logged.items() if tag in tags}
    assert counts == {"unreadable_shard": 1, "repeated_key": 2}  # a reason never met is not logged
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
    ends = {n: shard_fingerprint(str(shards / n), shards)[2] for n in sizes}  # as an index's inputs
    assert state["shards"] == {"files": {n: [sizes[n], ends[n], 8] for n in sorted(sizes)}, "samples": 24}

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


def text_shard(path: Path, n: int, text: str = "a") -> None:
    """n text-only samples of one 512-byte json member each (query `text`, one letter): 3 or 4 of them make tars of
    the same size, whatever the letter."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            record = encode_record(f"k{i}", qid=f"t:{i}", query={"txt": text}, positives=[{"id": "c", "txt": "b"}])
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
    ends = {n: shard_fingerprint(str(shards / n), shards)[2] for n in ("a.tar", "b.tar")}
    assert state["shards"]["files"] == {"a.tar": [10240, ends["a.tar"], 4], "b.tar": [10240, ends["b.tar"], 4]}

    text_shard(shards / "b.tar", 4, text="z")  # other samples, as many, the same size in bytes
    assert (shards / "b.tar").stat().st_size == 10240
    with pytest.raises(LamraError, match="shard b.tar was rewritten: the same size, other bytes"):
        datamodule(shards, state)
    text_shard(shards / "b.tar", 3)  # fewer samples, the same size in bytes
    assert (shards / "b.tar").stat().st_size == 10240
    with pytest.raises(LamraError, match="shard b.tar was rewritten: the same size, other bytes"):
        datamodule(shards, state)
    # The fingerprint of the unreleased version before this one ([bytes, samples]): sizes and samples compared.
    unreleased = {"files": {n: [size, count] for n, (size, _, count) in state["shards"]["files"].items()}}
    with pytest.raises(LamraError, match="shard b.tar held 4 samples, now 3"):
        datamodule(shards, {**state, "shards": unreleased})
    with pytest.raises(LamraError, match="fingerprint of the training shards is not readable"):
        datamodule(shards, {**state, "shards": {"files": ["a.tar"]}})  # a damaged checkpoint: one line
    old = {k: v for k, v in state.items() if k != "shards"}  # written before the fingerprint existed
    assert datamodule(shards, old).consumed == 0
    # The names are relative to the spec's root, so a moved shard folder still resumes.
    moved = tmp_path / "moved"
    os.rename(shards, moved)
    text_shard(moved / "b.tar", 4)
    assert datamodule(moved, state).fingerprint == state["shards"]
    assert spec_root(str(moved / "{a,b}.tar")) == moved and spec_root(str(moved / "*.tar")) == moved
    finding(
        "a training shard rewritten with other samples (as many, or fewer) at the same size in bytes",
        "the resume is refused before the index is built, naming the shard (the same size, other bytes: its "
        "fingerprint is an index's, with a digest of its ends); a checkpoint from before the fingerprint resumes "
        "unchecked; a moved shard folder resumes",
    )


def pool_candidates(n: int) -> list[dict[str, Any]]:
    return [encode_candidate(f"{i:08d}", id=f"9:{i}", txt=f"candidate {i}", image=None) for i in range(n)]


def gnu_tar(path: Path, samples: list[dict[str, Any]], blocking: int = 64) -> Path:
    """`samples` written by GNU tar with `-b blocking` (records of `blocking` 512-byte blocks: 64 -> 32 KiB)."""
    members = path.parent / f".{path.name}-members"
    members.mkdir(parents=True)
    names = []
    for sample in samples:
        for suffix, data in sample.items():
            if not suffix.startswith("__"):
                names.append(f"{sample['__key__']}.{suffix}")
                (members / names[-1]).write_bytes(data)
    subprocess.run(["tar", "-b", str(blocking), "-cf", str(path), "-C", str(members), *names], check=True)
    shutil.rmtree(members)
    return path


@pytest.mark.parametrize("fault", ["zeroed", "repeated key", "truncated", "not zero after its end (32 KiB records)"])
def test_evaluation_reads_refuse_a_shard_that_would_lose_or_merge_samples(tmp_path, fault, finding):
    """Indexing and evaluation must read every candidate: where training counts and skips, they stop, naming it."""
    pool = tmp_path / "pool"
    candidates = pool_candidates(6)
    write_shards(candidates[:3], pool, prefix="good")
    bad = pool / "bad-000000.tar"
    if fault == "repeated key":
        write_tar(bad, [*candidates[3:], {**candidates[5], "__key__": candidates[3]["__key__"]}])
    elif fault.startswith("not zero"):
        gnu_tar(bad, candidates[3:])  # read whole (below), then one byte of its last record's padding is not zero
        assert [s["__key__"] for s in read_samples([str(bad)])] == ["00000003", "00000004", "00000005"]
        data = bytearray(bad.read_bytes())
        data[-100] = 1
        bad.write_bytes(data)
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
    assert len(CandidateStore(urls[1:])) == 3  # the tools' random access reads the same way
    with pytest.raises(LamraError, match=f"shard {bad}"):
        CandidateStore([str(pool)])
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


# ---------------------------------------------------------------------------- valid shards that must be read
def test_tars_with_larger_records_are_read_whole_and_damage_after_their_end_is_found(tmp_path):
    """A tar ends with two zero blocks padded with zeros to a whole record of its blocking factor: 10 KiB by
    default, 32 KiB with `tar -b 64`. Any such tail is the end; non-zero bytes, fewer than two zero blocks or a tail
    that is not whole blocks are damage."""
    pool = tmp_path / "pool"
    shard = gnu_tar(pool / "big-000000.tar", pool_candidates(3))
    data = shard.read_bytes()
    assert len(data) == 32768  # one 32 KiB record: 3 members, the two end blocks, then zeros
    keys = ["00000000", "00000001", "00000002"]
    scan = scan_tar(str(shard))
    assert scan.damage is None and [s.key for s in scan.samples] == keys
    assert [s["__key__"] for s in read_samples([str(shard)])] == keys
    assert len(CandidateStore([str(pool)])) == 3
    index = SampleIndex.build([str(shard)])
    assert len(index) == 3 and not index.lost
    end = scan.samples[-1].end
    for damaged, why in [
        (data[:-100] + b"x" + bytes(99), f"byte {len(data) - 100} is not zero"),
        (data[: end + 512], "truncated: 512 bytes after the last member"),
        (data + bytes(100), "are not whole 512-byte blocks"),
    ]:
        shard.write_bytes(damaged)
        assert why in scan_tar(str(shard)).damage
        with pytest.raises(LamraError, match=f"shard {shard} is damaged"):
            list(read_samples([str(shard)]))
    # 32 KiB of zeros: an empty tar to a reader, a zeroed shard to training (longer than an empty tar by default).
    shard.write_bytes(bytes(len(data)))
    scan = scan_tar(str(shard))
    assert scan.damage is None and scan.zeroed and not scan.samples
    assert SampleIndex.build([str(shard), str(gnu_tar(tmp_path / "ok.tar", pool_candidates(1)))]).lost == {
        "unreadable_shard": 1
    }


def test_an_empty_pool_shard_reads_as_empty_for_every_reader(tmp_path):
    """`convert-mbeir` writes one empty shard for an empty task pool: the index, evaluation and the tools (the
    candidate store) all read it as empty, listed in sizes.json as 0 or not listed; a zeroed shard that sizes.json
    lists with samples is refused by each."""
    pool = tmp_path / "pool"
    write_shards(pool_candidates(3), pool, prefix="good")
    write_shards([], pool, prefix="empty")  # sizes.json: 0
    with tarfile.open(pool / "unlisted-000000.tar", "w"):  # not in sizes.json
        pass
    assert json.loads((pool / "sizes.json").read_text())["empty-000000.tar"] == 0
    assert len(list(read_samples(expand_shards(str(pool))))) == 3
    store = CandidateStore([str(pool)])
    assert len(store) == 3 and store.size == 3
    small = pool / "good-000000.tar"  # 3 text candidates: one 10 KiB record, the size of an empty tar
    assert zero(small) == 10240
    with pytest.raises(LamraError, match=f"shard {small} holds 0 samples; its folder's sizes.json says 3"):
        CandidateStore([str(pool)])


def test_evaluation_reads_each_folders_sizes_json_once(tmp_path, monkeypatch):
    """The evaluation pipeline reads its shards through one `read_samples`, which reads a folder's sizes.json once;
    each rank still reads its own shards."""
    shards = tmp_path / "shards"
    samples = text_to_image_samples()
    write_shards(samples, shards, maxcount=3)  # 4 shards in one folder
    opened = []
    real_open = Path.open

    def counting_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == "sizes.json":
            opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    urls = expand_shards(str(shards))
    seen = []
    for rank in range(2):
        pipeline = eval_pipeline(urls, batch_size=2, collate=IdsOnly(), num_negatives=0, rank=rank, world=2)
        seen.append([q for batch in pipeline for q in batch["query_ids"]])
    assert len(opened) == 2  # once per rank, not once per shard
    assert sorted(seen[0] + seen[1]) == sorted(qid_of(s) for s in samples)
    assert sorted(qid_of(s) for s in samples[:3] + samples[6:9]) == sorted(seen[0])  # shards 0 and 2
