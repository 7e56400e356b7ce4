"""Random access to the candidates of pool shards by id, without loading the pool.

Shards are plain (uncompressed) tar files, so a member is a byte range. `CandidateStore` reads every shard's
headers and the `.json` member of each sample once (`lamra_pl.formats.tar_index.scan_whole`: a shard that would lose
or merge candidates is an error, as when the pool is indexed; an empty one is empty), keeps the byte ranges of the
candidates asked for, and later reads just those bytes. Memory grows with the candidates asked for, not with the
pool; image bytes are read when an item is requested, and never re-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import Item, decode_candidate, member_item, modality, sample_location
from lamra_pl.formats.shards import expand_shards
from lamra_pl.formats.tar_index import listed_sizes, scan_whole
from lamra_pl.progress import progress


@dataclass(frozen=True)
class Location:
    url: str
    key: str
    members: tuple[tuple[str, int, int], ...]  # (suffix after the key, data offset, size)
    modality: str  # "text", "image" or "image,text", from the record (M-BEIR's candidate `modality`)


class CandidateStore:
    """Candidates of pool shard folders (`lamra-pl index` sources), by id.

    Args:
        sources: pool shard folders or patterns (see `expand_shards`).
        wanted: the ids to keep byte ranges for (None: every id; fine for small pools).
    """

    def __init__(self, sources: Iterable[str], wanted: set[str] | None = None) -> None:
        self.sources = list(sources)
        self.locations: dict[str, Location] = {}
        self.duplicates = 0  # ids seen again in a later sample: the first one is kept
        self.size = 0  # every candidate in the pool, wanted or not
        sizes: dict[Path, dict[str, Any]] = {}  # each folder's sizes.json, read once
        urls = [url for spec in self.sources for url in expand_shards(spec)]
        for url in progress(urls, desc="reading the pool's shards", unit="shards"):
            folder = Path(url).parent
            if folder not in sizes:
                sizes[folder] = listed_sizes(folder)
            self._scan(url, sizes[folder].get(Path(url).name), wanted)

    def _scan(self, url: str, listed: Any, wanted: set[str] | None) -> None:
        # Every candidate must be found, as when the pool was indexed (`read_samples`): a damaged or zeroed shard, or
        # a repeated key, is an error; an empty shard that sizes.json lists as empty (or not at all) is fine.
        scan = scan_whole(url, listed, read=("json",))
        for sample in scan.samples:
            raw = sample.data.get("json")
            if raw is None:
                raise BadSampleError(f"shard {url}, sample {sample.key!r}: no .json member")
            try:
                record = json.loads(raw)
                did = str(record["id"])
            except (ValueError, RecursionError, KeyError, TypeError) as err:  # not UTF-8 or JSON, too deep, no id
                problem = " ".join(f"not a candidate record ({type(err).__name__}: {err})".split())
                raise BadSampleError(f"shard {url}, sample {sample.key!r}: {problem}") from None
            self.size += 1
            if did in self.locations:
                self.duplicates += 1
            elif wanted is None or did in wanted:
                parts = record.get("parts") if isinstance(record.get("parts"), list) else []
                text = record.get("txt") is not None or any(isinstance(p, dict) and "txt" in p for p in parts)
                kind = modality(text, bool(record.get("img")) or bool(parts), bool(record.get("vid")))
                self.locations[did] = Location(url, sample.key, tuple(sample.members), kind)

    def __contains__(self, did: str) -> bool:
        return did in self.locations

    def __len__(self) -> int:
        return len(self.locations)

    def modality(self, did: str) -> str:
        location = self.locations.get(did)
        if location is None:
            raise LamraError(f"candidate {did!r} is not in the pool {self.sources}")
        return location.modality

    def sample(self, did: str) -> dict[str, Any]:
        """The candidate's raw WebDataset sample: {"__key__", "__url__", "json": bytes, "img.png": bytes, ...}."""
        location = self.locations.get(did)
        if location is None:
            raise LamraError(f"candidate {did!r} is not in the pool {self.sources}")
        sample: dict[str, Any] = {"__key__": location.key, "__url__": location.url}
        with Path(location.url).open("rb") as f:
            for suffix, offset, size in location.members:
                f.seek(offset)
                sample[suffix] = f.read(size)
        return sample

    def item(self, did: str) -> Item:
        return decode_candidate(self.sample(did))

    def record_item(self, did: str) -> dict[str, Any]:
        """The candidate as `encode_record` takes it: {"id", "txt", "image": (bytes, ext) | None, "img_src"} (and
        "video", "fps", "vid_src" for a video)."""
        sample = self.sample(did)
        return {**member_item(sample, json.loads(sample["json"]), sample_location(sample)), "id": did}


def ranked_candidates(
    sources: list[str], rankings: dict[str, dict[str, list[str]]], run_files: dict[str, str]
) -> CandidateStore:
    """The candidates that run files rank (task -> qid -> ids), from the pool of the index they searched
    (`sources`); an id that pool lacks is a one-line refusal naming the task's run file (`run_files`)."""
    store = CandidateStore(sources, {d for top in rankings.values() for ranked in top.values() for d in ranked})
    for name, top in rankings.items():
        unknown = sorted({d for ranked in top.values() for d in ranked if d not in store})
        if unknown:
            raise LamraError(
                f"{run_files[name]} ranks {len(unknown)} ids that are not in the pool {sources}, e.g. {unknown[:3]}"
            )
    return store
