"""The index folder: embeddings of a candidate pool (or of queries) with their ids, memory-mappable.

Layout version VERSION:

    INDEX/
      index.json      written last; its presence means the index is complete:
                      {"format": "lamra-pl-index", "version": 1, "count": N, "dim": D, "dtype": "float16",
                       "kind": "pool" | "queries", "sources": [shard folders], "paths": "relative to the index",
                       "instruction_seed": null | int,
                       "model": {"path": ..., "dim": null | D, "full_dim": W, "probe": [[D floats], ...]},
                       "inputs": "sha256:..."}
      embeddings.npy  float16 [N, D], L2-normalised rows in shard order: numpy.load(path, mmap_mode="r")
      ids.txt         N lines, the id of each row
      items.jsonl     N lines, {"id", "txt", "img"[, "vid"]} per row, for display (img: the image's source path, or
                      `shard.tar#member` when the source path is unknown); queries carry their instruction
      parts/          while encoding only: `chunk-NNNNNN.npy` + `.jsonl`, one per input shard, and `model.json`
                      (what is being encoded: the probe, the sources, the input fingerprint with every shard);
                      a killed run resumes from the chunks present, then assembles the files above

`model.probe` holds the embeddings of PROBE_TEXTS: a model that encodes them differently (another checkpoint,
another dimension) is refused when it searches this index or resumes its encoding. `model.dim` is the Matryoshka
dimension the rows were cut to (the model's `dim` setting, `lamra_pl.models.matryoshka`; null: none) and
`model.full_dim` the model's width before the cut, so a refusal of another dimension says which to give; indexes
written before they were recorded have neither, and are read as they were (the probe's width is their dimension).
Searches break equal scores by id order (`id_ranks`), so a ranking does not depend on the order rows were written
in.

Inputs. `inputs` is the digest of the input fingerprint (`fingerprint`): the kind, the instruction settings
(`instruction_seed`, and whether the model reads instructions) and every input shard's name (relative to its source
folder), size in bytes and a digest of its first and last 64 KiB (`lamra_pl.formats.shard_fingerprint`, which a
training resume checks too; cheap on any pool; a rewritten shard differs at its start). It does not depend on where
the sources are, so the same pool, moved or named by another path, is the same input. A resume goes on only over
the same inputs: the same kind, settings and shard names, and every chunk already encoded from a shard that is still
the same (a shard not yet encoded may have changed, e.g. a broken shard that stopped the run was fixed: it is encoded
as it is now). Anything else is a one-line refusal that leaves parts/ as it is. Re-running a finished index compares
the digest, and does nothing if it is the same. Indexes and parts written before `inputs` was recorded are compared
by their `sources` and `instruction_seed` (parts: their chunk count), as then. An index built from items given in
Python (`lamra_pl.api.Retriever.build_index`) has no sources: each chunk of its items is described as a shard is
([name, size, digest], `inputs_fingerprint`), and it resumes and refuses the same way.

Paths. `sources` are stored relative to the index folder when they were given relative (an absolute one as given;
`paths` says so), and `EmbeddingIndex.meta["sources"]` holds them resolved against where the index is now: an index
moved together with its pool still finds the pool's candidates (`lamra-pl rerank`, `mine`, `rerank-data` read
them). Indexes without `paths` hold them as given, relative to the working directory of the run; they are read that
way, then relative to the index folder. `model.path` is informational (the probe decides which model is the same).
Searching needs nothing outside the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats import parse_json, portable_path, read_json, resolve_path, shard_fingerprint, spec_root
from lamra_pl.formats.sample import modality
from lamra_pl.formats.shards import expand_shards

FORMAT, VERSION = "lamra-pl-index", 1
META, EMBEDDINGS, IDS, ITEMS, PARTS = "index.json", "embeddings.npy", "ids.txt", "items.jsonl", "parts"
PROBE_TEXTS = ("lamra-pl index probe: a red square on a white background.", "A dog runs along the beach.")
SAME_MODEL_COSINE = 0.99  # bf16 vs fp32 of one model stays above this; a different model does not
RELATIVE_TO_INDEX = "relative to the index"
MODEL_FILE = "model.json"


def fingerprint(
    kind: str, sources: list[str] | tuple[str, ...], instruction_seed: int | None, instructions: bool | None
) -> dict[str, Any]:
    """What an index is encoded from, independent of where the sources are: the kind, the instruction settings,
    and each input shard (in chunk order) as its `lamra_pl.formats.shard_fingerprint` (name relative to its source
    folder, size in bytes, digest of its ends); "digest" is the sha256 of all of it (index.json's `inputs`)."""
    shards = []
    for spec in sources:
        root = spec_root(spec)
        shards += [shard_fingerprint(url, root) for url in expand_shards(spec)]
    return inputs_fingerprint(kind, shards, instruction_seed, instructions)


def inputs_fingerprint(
    kind: str, shards: list[list[Any]], instruction_seed: int | None, instructions: bool | None
) -> dict[str, Any]:
    """`fingerprint` of inputs already described one chunk each, as [name, size in bytes, digest] (a shard's
    `shard_fingerprint`; the Python API's lists of items describe their chunks the same way)."""
    fields = {"kind": kind, "instruction_seed": instruction_seed, "instructions": instructions, "shards": shards}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return {**fields, "digest": f"sha256:{digest}"}


def is_complete(folder: str | Path) -> bool:
    """True when `folder` holds a finished index (its index.json, written last)."""
    return (Path(folder) / META).is_file()


def id_ranks(ids: list[str]) -> np.ndarray:
    """Each row's position in id order: the tie key that breaks equal scores by id."""
    order = np.argsort(np.asarray(ids), kind="stable")
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank


def check_same_model(probe: np.ndarray, recorded: dict[str, Any], where: str) -> None:
    """Raise if `probe` (this model's) differs from the probe recorded with an index or its parts."""
    theirs = np.asarray(recorded["probe"], dtype=np.float32)
    if theirs.shape[1] != probe.shape[1]:
        raise LamraError(f"{where} {_built_at(recorded, theirs.shape[1])}; this model embeds at {probe.shape[1]}")
    cosine = (theirs * probe).sum(-1) / (np.linalg.norm(theirs, axis=-1) * np.linalg.norm(probe, axis=-1))
    if cosine.min() < SAME_MODEL_COSINE:
        raise LamraError(
            f"{where} was built by a different model ({recorded.get('path')}): its probe embeddings differ from "
            f"this model's (cosine {cosine.min():.3f} < {SAME_MODEL_COSINE}); use the same checkpoint, or build a "
            "new index into another folder"
        )


def _built_at(recorded: dict[str, Any], width: int) -> str:
    """What an index's (or its parts') model record says of the dimension it was built at, and how to use it."""
    dim, full = recorded.get("dim"), recorded.get("full_dim")
    path = recorded.get("path")
    if isinstance(dim, int) and not isinstance(dim, bool):
        of = f" of a {full}-d model" if isinstance(full, int) else ""
        return (
            f"was built at dim {dim}{of} ({path}): use that model at --settings.dim {dim} (Python: "
            f"settings=ModelSettings(dim={dim}))"
        )
    full_width = " (the model's full width, no dim setting)" if isinstance(full, int) else ""
    return (
        f"was built with {width}-d embeddings{full_width} ({path}): use that model at its full width, without "
        "--settings.dim"
    )


def finished(out: str | Path, sources: list[str], inputs: dict[str, Any], probe: np.ndarray) -> bool:
    """True if `out` is a complete index of the same inputs (`inputs`: their `fingerprint`) by the same model (its
    `probe`), so there is nothing to encode; False if it is not complete; an error if it is another's."""
    if not is_complete(out):
        return False
    index = EmbeddingIndex(out)
    index.check_model(probe)
    recorded = index.meta.get("inputs")
    if recorded is not None:  # the digest of the fingerprint: the same inputs wherever they are now
        if recorded == inputs["digest"]:
            return True
        raise LamraError(
            f"{out} already holds an index of {_named(index.meta.get('sources') or [])} "
            f"(instruction_seed {index.meta.get('instruction_seed')}); this run's inputs differ "
            f"({_named(sources)}: {len(inputs['shards'])} "
            f"{'shards' if sources else 'chunks'}, instruction_seed {inputs['instruction_seed']}); delete {out} or "
            "choose another folder"
        )
    # An index written before its inputs were recorded: compared by what it names, as then.
    if index.meta.get("sources") != list(sources) or index.meta.get("instruction_seed") != inputs["instruction_seed"]:
        raise LamraError(
            f"{out} already holds an index of {index.meta.get('sources')} (instruction_seed "
            f"{index.meta.get('instruction_seed')}); choose another folder"
        )
    return True


class EmbeddingIndex:
    """A complete index folder, read lazily: embeddings are memory-mapped, items read only for display."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            hint = (
                " (its encoding did not finish: run `lamra-pl index` again to resume)"
                if (self.path / PARTS).is_dir()
                else ""
            )
            raise LamraError(f"{self.path} is not a complete index: it has no index.json{hint}")
        self.meta: dict[str, Any] = read_json(meta_file, f"a {FORMAT} v{VERSION} index")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise LamraError(f"{meta_file}: not a {FORMAT} v{VERSION} index")
        if not all(type(self.meta.get(k)) is int and self.meta[k] >= 0 for k in ("count", "dim")):
            raise LamraError(f"{meta_file}: its count and dim are not whole numbers (a damaged {FORMAT})")
        # index.json as written, with its sources resolved against where the index is now (see Paths above)
        marked = self.meta.get("paths") == RELATIVE_TO_INDEX
        sources = self.meta.get("sources")
        if isinstance(sources, list) and all(isinstance(s, str) for s in sources):
            self.meta["sources"] = [resolve_path(s, self.path, marked) for s in sources]

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @cached_property
    def embeddings(self) -> np.ndarray:
        emb = np.load(self.path / EMBEDDINGS, mmap_mode="r")
        if emb.shape != (len(self), self.dim):
            raise LamraError(
                f"{self.path}/embeddings.npy has shape {emb.shape}, index.json says {(len(self), self.dim)}"
            )
        return emb

    @cached_property
    def ids(self) -> list[str]:
        ids = (self.path / IDS).read_text().splitlines()
        if len(ids) != len(self):
            raise LamraError(f"{self.path}/ids.txt has {len(ids)} lines, index.json says {len(self)}")
        return ids

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {i: row for row, i in enumerate(self.ids)}

    @cached_property
    def id_rank(self) -> np.ndarray:
        return id_ranks(self.ids)

    @cached_property
    def modalities(self) -> list[str]:
        """Each row's M-BEIR modality ("text", "image" or "image,text"), from items.jsonl."""
        with open(self.path / ITEMS, "rb") as f:
            rows = [_row(line, self.path / ITEMS, number) for number, line in enumerate(f, start=1)]
        if len(rows) != len(self):
            raise LamraError(f"{self.path}/items.jsonl has {len(rows)} lines, index.json says {len(self)}")
        return [modality(r.get("txt") is not None, bool(r.get("img")), bool(r.get("vid"))) for r in rows]

    def items(self, rows: list[int]) -> list[dict[str, Any]]:
        wanted = set(rows)
        found: dict[int, dict[str, Any]] = {}
        with open(self.path / ITEMS, "rb") as f:
            for row, line in enumerate(f):
                if row in wanted:
                    found[row] = _row(line, self.path / ITEMS, row + 1)
                    if len(found) == len(wanted):
                        break
        return [found[r] for r in rows]

    def check_model(self, probe: np.ndarray) -> None:
        check_same_model(probe, self.meta["model"], f"index {self.path}")


class ChunkStore:
    """`INDEX/parts/`: one finished chunk per input shard, written atomically, so encoding can resume."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.parts = self.out / PARTS

    def chunk_path(self, chunk: int) -> Path:
        return self.parts / f"chunk-{chunk:06d}.npy"

    def done(self) -> set[int]:
        if not self.parts.is_dir():
            return set()
        return {int(p.stem.split("-")[1]) for p in self.parts.glob("chunk-*.npy")}

    def write(self, chunk: int, embeddings: np.ndarray, items: list[dict[str, Any]]) -> None:
        # Items first, embeddings last: the .npy file is what marks a chunk as done.
        atomic_write(self.chunk_path(chunk).with_suffix(".jsonl"), "".join(json.dumps(i) + "\n" for i in items))
        atomic_write(self.chunk_path(chunk), lambda f: np.save(f, embeddings))

    def start(self, manifest: dict[str, Any], probe: np.ndarray) -> None:
        """Record what is being encoded (`manifest`: kind, sources, chunks, instruction_seed, model path, and
        `inputs`, this run's `fingerprint`); on resume, refuse another model or other inputs, leaving the parts as
        they are."""
        path = self.parts / MODEL_FILE
        where = [os.path.abspath(s) for s in manifest["sources"]]
        if path.is_file():
            unreadable = f"{path} is not readable: delete {self.out} and encode again"
            try:
                recorded = read_json(path, "the record of an unfinished index")
                model = recorded["model"]
            except (LamraError, KeyError, TypeError):
                raise LamraError(unreadable) from None
            check_same_model(probe, model, f"the unfinished index in {self.out}")
            try:
                self._check_inputs(recorded, manifest, where)
            except (KeyError, TypeError, ValueError, IndexError):
                raise LamraError(unreadable) from None
            same = {"inputs": manifest["inputs"], "sources": manifest["sources"], "where": where}
            if all(recorded.get(k) == v for k, v in same.items()):
                return
            # The same inputs (shards not yet encoded may have changed): record them as this run reads them.
            manifest = {**recorded, **{k: manifest[k] for k in ("sources", "chunks", "inputs")}}
        else:
            manifest = {**manifest, "model": {**manifest["model"], "probe": probe.tolist()}}
        atomic_write(path, json.dumps({**manifest, "where": where}))

    def _check_inputs(self, recorded: dict[str, Any], manifest: dict[str, Any], where: list[str]) -> None:
        """Raise unless `manifest`'s inputs may continue the parts `recorded` describes (see Inputs above)."""
        fix = f"delete {self.out} or choose another --out"
        theirs, mine = recorded.get("inputs"), manifest["inputs"]
        if not isinstance(theirs, dict):  # parts started before the inputs were recorded
            if recorded.get("chunks") != manifest["chunks"]:
                raise LamraError(f"{self.parts} was encoding other inputs ({recorded.get('sources')}); {fix}")
            return
        for key in ("kind", "instruction_seed", "instructions"):
            if theirs.get(key) != mine[key]:
                raise LamraError(
                    f"{self.parts} was started with {key} {theirs.get(key)}, this run's is {mine[key]}; {fix}"
                )
        old, new = [tuple(s) for s in theirs["shards"]], [tuple(s) for s in mine["shards"]]
        old_names, new_names = [s[0] for s in old], [s[0] for s in new]
        changed = [c for c in sorted(self.done()) if c >= len(new) or c >= len(old) or old[c] != new[c]]
        if old_names == new_names and not changed:
            return
        kind = mine["kind"]
        if recorded.get("where") != where:
            raise LamraError(
                f"{self.parts} was started on {kind} {_named(recorded['sources'])} ({len(old)} shards), this run "
                f"reads {_named(manifest['sources'])} ({len(new)} shards); {fix}"
            )
        if old_names != new_names:
            added, removed = sorted(set(new_names) - set(old_names)), sorted(set(old_names) - set(new_names))
            what = f"{len(old)} shards then, {len(new)} now" + "".join(
                f"; {label} {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                for label, names in (("added", added), ("removed", removed))
                if names
            )
        else:
            (name, then, *_), (_, now, *_) = old[changed[0]], new[changed[0]]
            size = f"{then} bytes then, {now} now" if then != now else "the same size, other bytes"
            what = f"{name} changed after it was encoded: {size}"
        inputs = f"the shards of {_named(manifest['sources'])}" if manifest["sources"] else _named([])
        raise LamraError(f"{inputs} changed since {self.parts} was started ({what}); {fix}")

    def assemble(self, num_chunks: int) -> Path:
        """Concatenate the chunks in order into embeddings.npy, ids.txt, items.jsonl; write index.json last."""
        manifest = read_json(self.parts / MODEL_FILE, "the record of an unfinished index")
        missing = sorted(set(range(num_chunks)) - self.done())
        if missing:
            raise LamraError(f"{self.parts}: chunks {missing[:5]} were not encoded; run the command again to resume")
        arrays = [np.load(self.chunk_path(c), mmap_mode="r") for c in range(num_chunks)]
        dims = {a.shape[1] for a in arrays if len(a)}
        count = sum(len(a) for a in arrays)
        if count == 0:
            raise LamraError(f"{manifest['sources']}: nothing to index, the shards hold no samples")
        (dim,) = dims
        target = self.out / EMBEDDINGS

        def fill(f: Any) -> None:
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
                    "fortran_order": False,
                    "shape": (count, dim),
                },
            )
            for a in arrays:
                if len(a):
                    f.write(np.ascontiguousarray(a, dtype=np.float16).tobytes())

        atomic_write(target, fill)
        rows = [self.chunk_path(c).with_suffix(".jsonl") for c in range(num_chunks)]
        texts = [path.read_text(encoding="utf-8") for path in rows]
        atomic_write(self.out / ITEMS, "".join(texts))
        ids = [
            str(_row(line, path, number)["id"])
            for path, text in zip(rows, texts, strict=True)
            for number, line in enumerate(text.splitlines(), start=1)
        ]
        atomic_write(self.out / IDS, "".join(f"{i}\n" for i in ids))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "count": count,
            "dim": dim,
            "dtype": "float16",
            "kind": manifest["kind"],
            "sources": [portable_path(source, self.out) for source in manifest["sources"]],
            "paths": RELATIVE_TO_INDEX,
            "instruction_seed": manifest.get("instruction_seed"),
            "model": manifest["model"],
            "inputs": manifest["inputs"]["digest"],
        }
        atomic_write(self.out / META, json.dumps(meta))
        shutil.rmtree(self.parts)
        return self.out


def _named(sources: list[str]) -> str:
    """The inputs of an index in a message: its pool shard folders, or (none) the items given in Python
    (`lamra_pl.api.Retriever.build_index`)."""
    return ", ".join(sources) or "items given in Python"


def _row(line: str | bytes, path: Path, number: int) -> dict[str, Any]:
    """One items.jsonl row: an object with an "id"; anything else is a one-line LamraError naming path:line."""
    row = parse_json(line, f"{path}:{number}")
    if not isinstance(row, dict) or "id" not in row:
        raise LamraError(f'{path}:{number}: not an item row (an object with an "id")')
    return row
