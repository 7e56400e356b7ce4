"""The training stream: batches that are a pure function of (seed, rank, batch number), so resuming is exact.

Every training sample gets an index entry (its shard and byte range, `lamra_pl.formats.tar_index`) when the
DataModule sets up.
The stream is an endless sequence of passes over that index, each pass in its own seeded permutation; the
sequence is dealt to ranks in turn (entry k goes to rank k mod world), and batch b is the next `batch_size`
entries of every rank's share, read by byte range. Hence:

* any DataLoader worker can make any batch: worker w makes batches b = w, w + W, ..., which the DataLoader's
  round robin returns in order, so the data do not depend on the number of workers;
* a resumed run needs one number, the batches consumed (the DataModule's `state_dict`), to continue with exactly
  the data the uninterrupted run would have seen: no replay, nothing read twice to get there;
* within a pass every sample is used once over all ranks (except replacements, below).

A sample that cannot be used (an unreadable or oversized image, a record missing a field, an error while
preparing it) is replaced, in its place in the batch, by a sample drawn with a generator seeded by (seed, rank,
batch) from the samples that place may hold (`TrainStream.draws`: any sample, or its group's for a mixing stream),
so every batch stays full (DDP gathers need equal sizes), laid out as drawn, and still a pure function. Each
replacement is counted under its reason and reported with the batch; the index's own losses ride on rank 0's
batch 0:

* `unreadable_shard`: a shard of which no sample can be read (not a tar, a dangling link, a zeroed file, damage
  before the end of its first sample); a file of zeros reads as an empty tar of any size, so one longer than an
  empty tar as tar tools write it by default (`lamra_pl.formats.tar_index.EMPTY_TAR`) is counted as a zeroed file;
* `damaged_shard`: a shard read up to damage (a truncated file, a corrupt header): the samples before it are used;
* `empty_shard`: a complete tar holding no sample (only the end-of-archive blocks, at most EMPTY_TAR bytes of
  zeros);
* `repeated_key`: a sample whose key an earlier sample of the same shard has: the first one is used, the later
  ones are counted (one each) and left out (`lamra_pl.formats.tar_index.scan_tar`).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lamra_pl.data.collate import Collator
from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import SKIP_REASONS, UnreadableImage, decode_record
from lamra_pl.formats.tar_index import EMPTY_TAR, parse_sample, scan_tar

log = logging.getLogger(__name__)

OPEN_SHARDS = 64  # descriptors a reading process keeps open
WARNINGS_PER_REASON = 5  # printed per process; later skips are only counted
_EMPTY = object()  # a place in a batch not yet filled


@dataclass
class SampleIndex:
    """Where every readable training sample is: shard number and byte range, in shard order."""

    urls: list[str]
    shard: np.ndarray  # [N] int32
    start: np.ndarray  # [N] int64
    end: np.ndarray  # [N] int64
    lost: Counter[str] = field(default_factory=Counter)  # skip reason -> shards or samples lost while indexing
    _open: dict[int, int] = field(default_factory=dict, repr=False)  # shard -> descriptor, this process's
    _pid: int = field(default=-1, repr=False)

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def build(cls, urls: list[str]) -> SampleIndex:
        shard, start, end = [], [], []
        lost: Counter[str] = Counter()
        for number, url in enumerate(urls):
            try:
                scan = scan_tar(url)
            except Exception as err:  # unreadable file, not a tar at all
                lost["unreadable_shard"] += 1
                log.warning("skipping shard %s: it cannot be read (%s: %s)", url, type(err).__name__, err)
                continue
            if not scan.samples:
                what = f"all its {scan.size} bytes are zero" if scan.zeroed else scan.damage
                if scan.damage is not None or (scan.zeroed and scan.size > EMPTY_TAR):
                    lost["unreadable_shard"] += 1
                    log.warning("skipping shard %s: it cannot be read, no sample in it (%s)", url, what)
                else:
                    lost["empty_shard"] += 1
                    zeros = " (all zero)" if scan.zeroed else ""
                    log.warning("shard %s holds no sample: an empty tar of %d bytes%s", url, scan.size, zeros)
                continue
            if scan.damage is not None:
                lost["damaged_shard"] += 1
                log.warning(
                    "shard %s is damaged, %s: its %d samples before the damage are used",
                    url,
                    scan.damage,
                    len(scan.samples),
                )
            if scan.repeated:
                lost["repeated_key"] += len(scan.repeated)
                named = ", ".join(f"{s.key!r} (byte {s.start})" for s in scan.repeated[:WARNINGS_PER_REASON])
                more = len(scan.repeated) - WARNINGS_PER_REASON
                log.warning(
                    "shard %s: %d samples repeat the key of an earlier sample of the shard and are skipped (the "
                    "first sample with a key is used): %s%s",
                    url,
                    len(scan.repeated),
                    named,
                    f" and {more} more" if more > 0 else "",
                )
            shard += [number] * len(scan.samples)
            start += [s.start for s in scan.samples]
            end += [s.end for s in scan.samples]
        if not shard:
            raise LamraError(f"no readable training samples in {len(urls)} shards (first: {urls[0]})")
        return cls(urls, np.asarray(shard, np.int32), np.asarray(start, np.int64), np.asarray(end, np.int64), lost)

    def samples_per_shard(self) -> list[int]:
        """How many samples of each of `urls` the index holds."""
        return np.bincount(self.shard, minlength=len(self.urls)).tolist()

    def sample(self, i: int) -> dict[str, Any]:
        url = self.urls[self.shard[i]]
        start, end = int(self.start[i]), int(self.end[i])
        return parse_sample(os.pread(self._descriptor(int(self.shard[i])), end - start, start), url)

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of a shard, kept per process (pread has no shared offset, so a forked worker may
        use an inherited one); at most OPEN_SHARDS stay open."""
        if self._pid != os.getpid():
            self._pid, self._open = os.getpid(), {}
        fd = self._open.pop(shard, None)
        if fd is None:
            fd = os.open(self.urls[shard], os.O_RDONLY)
            if len(self._open) >= OPEN_SHARDS:
                os.close(self._open.pop(next(iter(self._open))))
        self._open[shard] = fd  # last used last
        return fd


class TrainStream(IterableDataset):
    """Batches `start_batch`, `start_batch + 1`, ...: batch b holds global entries from
    `start_entry + (b - start_batch) * batch_size * world` on, this rank's every `world`-th.

    Each `__iter__` is one epoch: up to the next multiple of `batches_per_epoch`. The object (a persistent
    worker's copy included) remembers where its next epoch starts.
    """

    def __init__(
        self,
        index: SampleIndex,
        *,
        collate: Collator,
        batch_size: int,
        num_negatives: int,
        seed: int,
        rank: int,
        world: int,
        batches_per_epoch: int,
        start_batch: int = 0,
        start_entry: int = 0,
        max_replacements: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        self.index, self.collate = index, collate
        self.batch_size, self.num_negatives, self.seed = batch_size, num_negatives, seed
        self.rank, self.world, self.batches_per_epoch = rank, world, batches_per_epoch
        self.start_batch, self.start_entry = start_batch, start_entry
        self.max_replacements = 4 * batch_size + 16 if max_replacements is None else max_replacements
        self.max_image_pixels = max_image_pixels
        self._next = start_batch
        self._permutations: dict[int, np.ndarray] = {}
        self._warned: Counter[str] = Counter()

    def entry_of(self, batch: int) -> int:
        """The global entry where `batch` starts (its rank 0 entry)."""
        return self.start_entry + (batch - self.start_batch) * self.batch_size * self.world

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self._next
        end = (first // self.batches_per_epoch + 1) * self.batches_per_epoch
        self._next = end
        for b in range(first + worker, end, workers):
            yield self.batch(b)

    # ------------------------------------------------------------------------------------------ batches
    def _sample_of(self, entry: int) -> int:
        n = len(self.index)
        epoch_pass, position = divmod(entry, n)
        if epoch_pass not in self._permutations:
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch_pass] = np.random.default_rng([self.seed, epoch_pass]).permutation(n)
        return int(self._permutations[epoch_pass][position])

    def draws(self, b: int) -> tuple[list[tuple[int, str]], list[np.ndarray | None]]:
        """This rank's batch b: (sample number, seed of its choices) per query, and per query the sample numbers a
        replacement in its place is drawn from (None: any sample)."""
        first = self.entry_of(b) + self.rank
        entries = [first + j * self.world for j in range(self.batch_size)]
        return [(self._sample_of(k), f"{self.seed}:{k}") for k in entries], [None] * self.batch_size

    def batch(self, b: int) -> dict[str, Any]:
        draws, spares = self.draws(b)
        spare = random.Random(f"{self.seed}:replace:{self.rank}:{b}")
        skipped: Counter[str] = Counter()
        examples: list[Any] = [_EMPTY] * self.batch_size
        todo = list(enumerate(draws))  # (place in the batch, (sample number, choice seed)) still to fill
        replaced = 0
        while True:
            for place, (sample_number, choice_seed) in todo:
                try:
                    examples[place] = self._example(sample_number, choice_seed)
                except _Unusable as err:
                    self._skip(err.reason, str(err), skipped, b)
            missing = [place for place, example in enumerate(examples) if example is _EMPTY]
            if missing:
                todo = []
                for i, place in enumerate(missing):  # in place: a mixing stream's sub-batches keep their group
                    pool = spares[place]
                    pick = spare.randrange(len(self.index) if pool is None else len(pool))
                    number = pick if pool is None else int(pool[pick])
                    todo.append((place, (number, f"{self.seed}:replace:{self.rank}:{b}:{replaced + i}")))
                replaced += len(missing)
                continue
            try:
                batch = self.collate(examples)
                break
            except Exception as err:
                failing = [place for place, example in enumerate(examples) if not _collates(self.collate, example)]
                if not failing:  # the batch fails as a whole (out of memory, a bug): not one sample's fault
                    raise
                for place in failing:
                    query = getattr(getattr(examples[place], "query", None), "id", "?")
                    examples[place] = _EMPTY
                    self._skip("sample_error", f"query {query}: {type(err).__name__}: {err}", skipped, b)
                todo = []
        if b == 0 and self.rank == 0:
            skipped.update(self.index.lost)
        batch["skipped"] = torch.tensor([skipped[r] for r in SKIP_REASONS], dtype=torch.long)
        batch["stream_batch"] = b
        return batch

    def _example(self, sample_number: int, choice_seed: str) -> Any:
        where = f"sample {sample_number} of the index"
        try:
            sample = self.index.sample(sample_number)
            where = f"shard {sample['__url__']}, sample {sample.get('__key__')!r}"
            record = decode_record(sample, max_image_pixels=self.max_image_pixels)
            if len(record.negatives) < self.num_negatives:
                raise BadSampleError(
                    f"{where}: {len(record.negatives)} hard negatives but data.num_negatives is {self.num_negatives}"
                )
            return self.collate.choose(record, random.Random(choice_seed), self.num_negatives)
        except UnreadableImage as err:
            reason = "oversized_image" if err.oversized else "unreadable_image"
            raise _Unusable(reason, f"{where}: {err}") from None
        except BadSampleError as err:
            raise _Unusable("bad_sample", str(err)) from None
        except Exception as err:  # a reader or collator failing on one sample must not end a multi-day run
            raise _Unusable("sample_error", f"{where}: {type(err).__name__}: {err}") from None

    def _skip(self, reason: str, message: str, skipped: Counter[str], b: int) -> None:
        skipped[reason] += 1
        if skipped.total() > self.max_replacements:
            raise LamraError(
                f"batch {b} of rank {self.rank}: more than {self.max_replacements} samples were unusable "
                f"({dict(skipped)}); the last: {message}"
            )
        self._warned[reason] += 1
        if self._warned[reason] <= WARNINGS_PER_REASON:
            log.warning("skipping %s (%s)", message, reason)
            if self._warned[reason] == WARNINGS_PER_REASON:
                log.warning("further %s skips are counted, not printed", reason)


def _collates(collate: Collator, example: Any) -> bool:
    try:
        collate([example])
    except Exception:
        return False
    return True


class _Unusable(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
