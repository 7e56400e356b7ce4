"""Training on several shard sources at configured ratios (MM-Embed's continual fine-tuning: M-BEIR with mined
hard negatives, then text-retrieval data; spec mmembed_mbeir.md section 3).

`MixDataModule(sources={"data/mined": 0.5, "data/text": 0.5})` keeps everything `ShardDataModule` guarantees
(batches are a pure function of the seed, rank and batch number, so `--ckpt_path last` resumes exactly; unusable
samples are replaced and counted) and draws each query from a source with the given probabilities:

* mixed batches (default): each query slot of the global batch draws its source;
* task-homogeneous batches (`homogeneous: true`): each global batch draws one task (a source's shard folder, e.g.
  `data/mined/mscoco_task0`), with probability ratio(source) x its share of the source's samples, and all its
  queries (on every rank) come from that task, so in-batch negatives are of one task, as UniIR and MM-Embed
  batch M-BEIR;
* interleaved sub-batches (`sub_batch_size: S`, VLM2Vec-V2's interleaved batching): the global batch (world x
  batch_size queries) is cut into world x batch_size / S sub-batches of S consecutive queries, and each sub-batch
  draws one group, with the probabilities above: a source, or with `homogeneous: true` a task (a shard folder, as
  VLM2Vec draws a dataset; its ratio x share of its source). The global batch is laid out in the order the loss
  gathers it, rank 0's batch_size queries, then rank 1's, ...: query j of rank r is place r x batch_size + j, in
  sub-batch (r x batch_size + j) // S. So with S dividing batch_size each rank holds batch_size / S whole
  sub-batches; with S a multiple of batch_size a sub-batch spans S / batch_size ranks; S must divide the global
  batch. The global batch depends on batch_size x world only: 2 ranks of 4 draw the halves of 1 rank's 8. The
  loss is unchanged: each query's in-batch negatives are every candidate of the global batch, the S - 1 of its own
  sub-batch (one source or task: the hard ones) and those of the other sub-batches (other groups: a mix).
  `sub_batch_size` = the global batch with `homogeneous: true` draws one task per global batch as `homogeneous`
  alone does (not the same draws); S = 1 draws a group per query as mixed batches do.

Within a group (a source, or a task), samples come in seeded passes, each sample once per pass (over all ranks). The
draws (of a group per query, per batch or per sub-batch) are an endless seeded sequence read in blocks, so where
batch b stands in each group's passes is computed, not replayed. A sample that cannot be used is replaced in its
place by a sample of the same group (any sample in mixed batches).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lamra_pl.data.datamodule import ShardDataModule
from lamra_pl.data.stream import SampleIndex, TrainStream
from lamra_pl.errors import LamraError
from lamra_pl.formats.shards import expand_shards

log = logging.getLogger(__name__)

BLOCK = 4096  # draws generated at a time


@dataclass(frozen=True)
class Group:
    name: str  # the source, or the source's task folder
    members: np.ndarray  # its sample numbers in the combined index


class Draws:
    """Group numbers u = 0, 1, ... drawn i.i.d. with `weights` (seeded), and how often each came before u."""

    def __init__(self, weights: np.ndarray, seed: int) -> None:
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.seed = seed
        self.blocks: list[np.ndarray] = []
        self.before: list[np.ndarray] = []  # per block: each group's count in all earlier blocks

    def _block(self, i: int) -> np.ndarray:
        while len(self.blocks) <= i:
            n = len(self.blocks)
            drawn = np.random.default_rng([self.seed, 7919, n]).choice(len(self.p), size=BLOCK, p=self.p)
            previous = self.before[-1] + np.bincount(self.blocks[-1], minlength=len(self.p)) if n else None
            self.before.append(np.zeros(len(self.p), np.int64) if previous is None else previous)
            self.blocks.append(drawn)
        return self.blocks[i]

    def group(self, u: int) -> int:
        return int(self._block(u // BLOCK)[u % BLOCK])

    def count_before(self, u: int, group: int) -> int:
        i, offset = divmod(u, BLOCK)
        block = self._block(i)  # also fills self.before up to block i
        return int(self.before[i][group] + np.count_nonzero(block[:offset] == group))


class MixStream(TrainStream):
    """`TrainStream` over the union of the sources, with each query, each batch or each sub-batch drawn from a
    group."""

    def __init__(self, index: SampleIndex, *, groups: list[Group], weights: list[float], homogeneous: bool,
                 sub_batch_size: int | None = None, **settings: Any) -> None:  # fmt: skip
        super().__init__(index, **settings)
        self.groups, self.homogeneous, self.sub_batch_size = groups, homogeneous, sub_batch_size
        if sub_batch_size is not None and (self.batch_size * self.world) % sub_batch_size:
            raise LamraError(sub_batch_error(sub_batch_size, self.batch_size, self.world))
        self.mix = Draws(np.asarray(weights), self.seed)
        self._passes: dict[tuple[int, int], np.ndarray] = {}

    def _member(self, group: int, k: int) -> int:
        """The k-th sample of the group's endless sequence of seeded passes."""
        members = self.groups[group].members
        epoch_pass, position = divmod(k, len(members))
        key = (group, epoch_pass)
        if key not in self._passes:
            if len(self._passes) >= 2 * len(self.groups):
                self._passes.pop(next(iter(self._passes)))
            self._passes[key] = np.random.default_rng([self.seed, group, epoch_pass]).permutation(len(members))
        return int(members[self._passes[key][position]])

    def draws(self, b: int) -> tuple[list[tuple[int, str]], list[np.ndarray | None]]:
        size, world = self.batch_size, self.world
        if self.sub_batch_size is not None:
            s = self.sub_batch_size
            picks, spares = [], []
            for j in range(size):
                place = self.rank * size + j  # in the global batch, as the loss gathers it (rank order)
                unit = b * (size * world // s) + place // s  # the sub-batch's number in the stream
                g = self.mix.group(unit)
                k = self.mix.count_before(unit, g) * s + place % s  # the group's samples used before, + place
                picks.append((self._member(g, k), f"{self.seed}:{g}:{k}"))
                spares.append(self.groups[g].members)
            return picks, spares
        if self.homogeneous:
            g = self.mix.group(b)
            done = self.mix.count_before(b, g) * size * world  # the group's samples used by earlier batches
            ks = [done + j * world + self.rank for j in range(size)]
            return [(self._member(g, k), f"{self.seed}:{g}:{k}") for k in ks], [self.groups[g].members] * size
        picks = []
        for j in range(size):
            unit = (b * size + j) * world + self.rank
            g = self.mix.group(unit)
            k = self.mix.count_before(unit, g)
            picks.append((self._member(g, k), f"{self.seed}:{g}:{k}"))
        return picks, [None] * size


def sub_batch_error(sub_batch_size: int, batch_size: int, world: int) -> str:
    return (
        f"data.sub_batch_size={sub_batch_size} does not divide the global batch, data.batch_size x world = "
        f"{batch_size} x {world} = {batch_size * world}: choose a divisor of it"
    )


def mix_groups(sources: dict[str, float], homogeneous: bool) -> tuple[SampleIndex, list[Group], list[float]]:
    """The combined index of every source's shards, and the groups to draw from with their weights."""
    if not sources:
        raise LamraError("data.sources is empty: give {shard folder or pattern: ratio, ...}")
    bad = {k: v for k, v in sources.items() if not isinstance(v, (int, float)) or not 0 < v < float("inf")}
    if bad:
        raise LamraError(f"data.sources: every ratio must be a finite number > 0, got {bad}")
    urls, source_of = [], []
    for number, spec in enumerate(sources):
        found = expand_shards(spec)
        urls += found
        source_of += [number] * len(found)
    repeated = [u for u, n in Counter(urls).items() if n > 1]
    if repeated:
        raise LamraError(f"data.sources: shards {repeated[:3]} are in more than one source")
    index = SampleIndex.build(urls)
    source = np.asarray(source_of)[index.shard]
    total = sum(sources.values())
    folders = np.asarray([str(Path(u).parent) for u in urls])  # a shard's task: its folder
    groups, weights = [], []
    for number, (spec, ratio) in enumerate(sources.items()):
        members = np.flatnonzero(source == number)
        if len(members) == 0:
            raise LamraError(f"data.sources: {spec!r} has no readable training sample")
        if not homogeneous:
            groups.append(Group(spec, members))
            weights.append(ratio / total)
            continue
        folder = folders[index.shard[members]]
        for task in sorted(set(folder)):
            in_task = members[folder == task]
            groups.append(Group(task, in_task))
            weights.append(ratio / total * len(in_task) / len(members))
    for group, weight in zip(groups, weights, strict=True):
        log.info("mix: %s, %d samples, drawn with probability %.4f", group.name, len(group.members), weight)
    return index, groups, weights


class MixDataModule(ShardDataModule):
    """`ShardDataModule` whose training data are several shard sources mixed at the given ratios.

    Args:
        sources: {shard folder or pattern: ratio}; the ratios are normalised to probabilities.
        homogeneous: draw tasks (a source's shard folder), not sources: one task per global batch or, with
            sub_batch_size, per sub-batch.
        sub_batch_size: interleaved sub-batches (VLM2Vec-V2): the global batch (batch_size x world queries, in rank
            order) is cut into sub-batches of this many consecutive queries, each drawn from one source (one task
            with homogeneous); it must divide batch_size x world. None: a source per query, or a task per batch.
        train_shards: not taken: the training data are `sources` (given, it is refused).
        **kwargs: `ShardDataModule`'s arguments (batch_size, num_negatives, val_tasks, seed, ...), but not
            train_shards.
    """

    def __init__(
        self, sources: dict[str, float], homogeneous: bool = False, sub_batch_size: int | None = None, **kwargs: Any
    ) -> None:
        if kwargs.get("train_shards") is not None:
            raise LamraError("MixDataModule takes data.sources, not data.train_shards")
        if sub_batch_size is not None and (isinstance(sub_batch_size, bool) or not isinstance(sub_batch_size, int)
                                           or sub_batch_size < 1):  # fmt: skip
            raise LamraError(f"data.sub_batch_size must be a whole number >= 1 (or null), got {sub_batch_size!r}")
        super().__init__(**kwargs)
        self.groups: list[Group] = []
        self.weights: list[float] = []
        self.saved: dict[str, Any] | None = None  # the stream settings of a checkpoint being resumed

    def setup(self, stage: str) -> None:
        super().setup(stage)
        s, size = self.hparams.sub_batch_size, self.hparams.batch_size
        if stage == "fit" and s is not None and (size * self.world) % s:
            raise LamraError(sub_batch_error(s, size, self.world))  # before the model is set up

    def train_specs(self) -> list[str]:
        return list(self.hparams.sources)

    def build_index(self) -> SampleIndex:
        index, self.groups, self.weights = mix_groups(self.hparams.sources, self.hparams.homogeneous)
        return index

    def new_stream(self, index: SampleIndex, **settings: Any) -> TrainStream:
        # A key a checkpoint lacks (written before it existed) had its default then: None.
        changed = [] if self.saved is None else sorted(k for k, v in self._settings().items() if self.saved.get(k) != v)
        if changed:
            raise LamraError(
                f"the checkpoint's mixed data stream had other {changed} ({ {k: self.saved.get(k) for k in changed} }"
                f" then, { {k: self._settings()[k] for k in changed} } now): batch b's samples depend on them, so "
                "resume with the same settings or start a new run"
            )
        h = self.hparams
        return MixStream(
            index,
            groups=self.groups,
            weights=self.weights,
            homogeneous=h.homogeneous,
            sub_batch_size=h.sub_batch_size,
            **settings,
        )

    def _settings(self) -> dict[str, Any]:
        h = self.hparams
        return {
            "world": self.world,
            "batch_size": h.batch_size,
            "homogeneous": h.homogeneous,
            "sources": h.sources,
            "sub_batch_size": h.sub_batch_size,
        }

    # Unlike ShardDataModule's stream, batch b's draws are not a position in one sequence: they depend on these.
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mix": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.saved = state.get("mix")
