"""What the data pipelines need from a module's collator, which the DataModule is handed (`connect`): the data
layer knows records and batches, the module knows examples and prompts, and neither imports the other."""

from __future__ import annotations

import random
from typing import Any, Protocol

from transformers import BatchFeature

from lamra_pl.formats.sample import Item, Record


class Collator(Protocol):
    """How one record becomes a training example (`choose`, seeded by `rng`; `rng=None` is the deterministic
    evaluation choice) and how examples become a batch."""

    def choose(self, record: Record, rng: random.Random | None, num_negatives: int) -> Any: ...

    def __call__(self, examples: list[Any]) -> dict[str, Any]: ...


class ItemEncoder(Protocol):
    """How a retriever's collator encodes items (queries or candidates) for embedding: a batch of inputs, each
    item's approximate length in tokens (the bucketing key), and whether queries carry their instruction."""

    instructions: bool

    def encode(self, items: list[Item]) -> BatchFeature: ...

    def length(self, item: Item) -> int: ...
