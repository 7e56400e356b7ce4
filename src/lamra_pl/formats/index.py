"""The index folder: embeddings of a candidate pool (or of queries) with their ids, memory-mappable.

Layout version VERSION:

    INDEX/
      index.json      written last; its presence means the index is complete:
                      {"format": "lamra-pl-index", "version": 1, "count": N, "dim": D, "dtype": "float16",
                       "kind": "pool" | "queries", "sources": [shard folders], "instruction_seed": null | int,
                       "model": {"path": ..., "probe": [[D floats], ...]}}
      embeddings.npy  float16 [N, D], L2-normalised rows in shard order: numpy.load(path, mmap_mode="r")
      ids.txt         N lines, the id of each row
      items.jsonl     N lines, {"id", "txt", "img"} per row, for display (img: the image's source path, or
                      `shard.tar#member` when the source path is unknown); queries carry their instruction
      parts/          while encoding only: `chunk-NNNNNN.npy` + `.jsonl`, one per input shard, and `model.json`;
                      a killed run resumes from the chunks present, then assembles the files above

`model.probe` holds the embeddings of PROBE_TEXTS: a model that encodes them differently (another checkpoint,
another dimension) is refused when it searches this index or resumes its encoding. Searches break equal scores by
id order (`id_ranks`), so a ranking does not depend on the order rows were written in.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_write
from lamra_pl.formats.sample import modality

FORMAT, VERSION = "lamra-pl-index", 1
META, EMBEDDINGS, IDS, ITEMS, PARTS = "index.json", "embeddings.npy", "ids.txt", "items.jsonl", "parts"
PROBE_TEXTS = ("lamra-pl index probe: a red square on a white background.", "A dog runs along the beach.")
SAME_MODEL_COSINE = 0.99  # bf16 vs fp32 of one model stays above this; a different model does not


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
        raise LamraError(
            f"{where} was built by a model with {theirs.shape[1]}-d embeddings ({recorded.get('path')}); "
            f"this model's are {probe.shape[1]}-d"
        )
    cosine = (theirs * probe).sum(-1) / (np.linalg.norm(theirs, axis=-1) * np.linalg.norm(probe, axis=-1))
    if cosine.min() < SAME_MODEL_COSINE:
        raise LamraError(
            f"{where} was built by a different model ({recorded.get('path')}): its probe embeddings differ from "
            f"this model's (cosine {cosine.min():.3f} < {SAME_MODEL_COSINE}); use the same checkpoint, or build a "
            "new index into another folder"
        )


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
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise LamraError(f"{meta_file}: not a {FORMAT} v{VERSION} index")

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
        with open(self.path / ITEMS, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        if len(rows) != len(self):
            raise LamraError(f"{self.path}/items.jsonl has {len(rows)} lines, index.json says {len(self)}")
        return [modality(r.get("txt") is not None, bool(r.get("img"))) for r in rows]

    def items(self, rows: list[int]) -> list[dict[str, Any]]:
        wanted = set(rows)
        found: dict[int, dict[str, Any]] = {}
        with open(self.path / ITEMS, encoding="utf-8") as f:
            for row, line in enumerate(f):
                if row in wanted:
                    found[row] = json.loads(line)
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
        """Record what is being encoded; on resume, refuse a different model or different inputs."""
        path = self.parts / "model.json"
        if path.is_file():
            recorded = json.loads(path.read_text())
            check_same_model(probe, recorded["model"], f"the unfinished index in {self.out}")
            if recorded["chunks"] != manifest["chunks"]:
                raise LamraError(
                    f"the unfinished index in {self.out} was encoding other inputs ({recorded['sources']}); "
                    "choose another folder"
                )
            return
        atomic_write(path, json.dumps({**manifest, "model": {**manifest["model"], "probe": probe.tolist()}}))

    def assemble(self, num_chunks: int) -> Path:
        """Concatenate the chunks in order into embeddings.npy, ids.txt, items.jsonl; write index.json last."""
        manifest = json.loads((self.parts / "model.json").read_text())
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
        items_text = "".join(
            self.chunk_path(c).with_suffix(".jsonl").read_text(encoding="utf-8") for c in range(num_chunks)
        )
        atomic_write(self.out / ITEMS, items_text)
        ids = [json.loads(line)["id"] for line in items_text.splitlines()]
        atomic_write(self.out / IDS, "".join(f"{i}\n" for i in ids))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "count": count,
            "dim": dim,
            "dtype": "float16",
            **{k: v for k, v in manifest.items() if k != "chunks"},
        }
        atomic_write(self.out / META, json.dumps(meta))
        shutil.rmtree(self.parts)
        return self.out
