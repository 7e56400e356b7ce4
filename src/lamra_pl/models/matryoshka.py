"""Matryoshka dimensions: a retriever's embeddings cut to their first `dim` values, then L2-normalised again.

A retriever embeds at a chosen dimension with its `dim` argument (`--settings.dim D` on `index`, `retrieve`,
`search`; `ModelSettings(dim=D)` in Python; `model.dim` in a config; `export --settings.dim D`). Every embedding a
retriever computes goes through `truncate` at the end of its `embed` (`EmbeddingModule`, `CLIPModule`): the index's
rows, the queries of `retrieve`, the Python API's vectors, the probe embeddings an index records to tell models
apart, and the embeddings of training steps. Cutting a unit vector and normalising it again is the same as cutting
the raw pooled state and normalising it once (normalisation only rescales), so the result depends on the pooled
state alone. None is the full width (no cut).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lamra_pl.errors import LamraError

SETTING = "dim (--settings.dim, model.dim)"


def check_dim(dim: int | None, width: int | None = None) -> None:
    """Refuse, in one line naming the setting, a `dim` that is not a whole number >= 1 or (once the model's
    embedding `width` is known) is more than it."""
    if dim is None:
        return
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise LamraError(f"{SETTING} must be a whole number >= 1 (None: the full width), got {dim!r}")
    if width is not None and dim > width:
        raise LamraError(
            f"{SETTING} is {dim}, more than the {width} dimensions of this model's embeddings: give at most {width}"
        )


def truncate(embeddings: torch.Tensor, dim: int | None) -> torch.Tensor:
    """[..., dim] unit vectors: the first `dim` values of each row of `embeddings`, L2-normalised (all of them,
    normalised, when `dim` is None)."""
    return F.normalize(embeddings if dim is None else embeddings[..., :dim], dim=-1)
