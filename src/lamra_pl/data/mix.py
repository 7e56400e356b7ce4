"""Training on several shard sources at configured ratios (MM-Embed's continual fine-tuning: M-BEIR with mined
hard negatives, then text-retrieval data; spec mmembed_mbeir.md section 3).

`MixDataModule(sources={"data/mined": 0.5, "data/text": 0.5})` keeps everything `ShardDataModule` guarantees
(batches are a pure function of the seed, rank and batch number, so `--ckpt_path last` resumes exactly; unusable
samples are replaced and counted) and draws each query from a source with the given probabilities:

* mixed batches (default): each query slot of the global batch draws its source;
* task-homogeneous batches (`homogeneous: true`): each global batch draws one task (a source's shard folder, e.g.
  `data/mined/mscoco_task0`), with probability ratio(source) x its share of the source's samples, and all its
  queries (on every rank) come from that task, so in-batch negatives are of one task, as UniIR and MM-Embed
  batch M-BEIR.

Within a group (a source, or a task), samples come in seeded passes, each sample once per pass. The draws are an
endless seeded sequence read in blocks, so where batch b stands in each group's passes is computed, not replayed.
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
    """`TrainStream` over the union of the sources, with each query (or each batch) drawn from a group."""

    def __init__(self, index: SampleIndex, *, groups: list[Group], weights: list[float], homogeneous: bool,
                 **settings: Any) -> None:  # fmt: skip
        super().__init__(index, **settings)
        self.groups, self.homogeneous = groups, homogeneous
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

    def draws(self, b: int) -> tuple[list[tuple[int, str]], np.ndarray | None]:
        size, world = self.batch_size, self.world
        if self.homogeneous:
            g = self.mix.group(b)
            done = self.mix.count_before(b, g) * size * world  # the group's samples used by earlier batches
            ks = [done + j * world + self.rank for j in range(size)]
            return [(self._member(g, k), f"{self.seed}:{g}:{k}") for k in ks], self.groups[g].members
        picks = []
        for j in range(size):
            unit = (b * size + j) * world + self.rank
            g = self.mix.group(unit)
            k = self.mix.count_before(unit, g)
            picks.append((self._member(g, k), f"{self.seed}:{g}:{k}"))
        return picks, None


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
        homogeneous: one task (a source's shard folder) per global batch, instead of a source per query.
        train_shards: not taken: the training data are `sources` (given, it is refused).
        **kwargs: `ShardDataModule`'s arguments (batch_size, num_negatives, val_tasks, seed, ...), but not
            train_shards.
    """

    def __init__(self, sources: dict[str, float], homogeneous: bool = False, **kwargs: Any) -> None:
        if kwargs.get("train_shards") is not None:
            raise LamraError("MixDataModule takes data.sources, not data.train_shards")
        super().__init__(**kwargs)
        self.groups: list[Group] = []
        self.weights: list[float] = []
        self.saved: dict[str, Any] | None = None  # the stream settings of a checkpoint being resumed

    def train_specs(self) -> list[str]:
        return list(self.hparams.sources)

    def build_index(self) -> SampleIndex:
        index, self.groups, self.weights = mix_groups(self.hparams.sources, self.hparams.homogeneous)
        return index

    def new_stream(self, index: SampleIndex, **settings: Any) -> TrainStream:
        if self.saved is not None and self.saved != self._settings():
            changed = sorted(k for k in self._settings() if self.saved.get(k) != self._settings()[k])
            raise LamraError(
                f"the checkpoint's mixed data stream had other {changed} ({ {k: self.saved.get(k) for k in changed} }"
                f" then, { {k: self._settings()[k] for k in changed} } now): batch b's samples depend on them, so "
                "resume with the same settings or start a new run"
            )
        return MixStream(
            index, groups=self.groups, weights=self.weights, homogeneous=self.hparams.homogeneous, **settings
        )

    def _settings(self) -> dict[str, Any]:
        h = self.hparams
        return {"world": self.world, "batch_size": h.batch_size, "homogeneous": h.homogeneous, "sources": h.sources}

    # Unlike ShardDataModule's stream, batch b's draws are not a position in one sequence: they depend on these.
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mix": self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.saved = state.get("mix")
