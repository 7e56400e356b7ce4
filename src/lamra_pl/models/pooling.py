"""Every pooling of last-layer states into one embedding per input.

* "before_emb" (LamRA): the state of the token just before the first `<emb>` (the `\\n` ending
  `<|im_start|>assistant\\n`); "last_token": the state of the last non-padding token. Both are a position per row
  (`pooling_index`) and hold for left and right padding.
* "latent_attention" (NV-Embed's, MM-Embed's; spec mmembed_mbeir.md section 1.1): the last-layer states are the
  queries of a multi-head cross-attention whose keys and values are one trainable latent array (r latents;
  NV-Embed: 512 latents, 8 heads); an MLP (Linear, GELU, Linear) follows, then the mean over the real tokens
  (`LatentAttentionPooling`). Its weights train with the adapter, are saved in the `fit` checkpoint, and
  `lamra-pl merge` writes them beside the merged model (`formats.settings.POOLING_FILE`), from where a model built on
  that folder loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lamra_pl.errors import LamraError
from lamra_pl.formats.settings import POOLING_FILE
from lamra_pl.models.backbone import EMB_TOKEN

Pooling = Literal["before_emb", "last_token", "latent_attention"]


def pooling_index(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, emb_token_id: int, pooling: Pooling
) -> torch.Tensor:
    """Per row, the position whose last-layer state is the embedding ("before_emb" or "last_token")."""
    if pooling == "last_token":
        # argmax returns the first maximum of the running count, i.e. the last real token.
        return attention_mask.long().cumsum(-1).argmax(-1)
    hits = (input_ids == emb_token_id) & attention_mask.bool()
    missing = (~hits.any(-1)).nonzero().flatten().tolist()
    if missing:
        raise LamraError(f"rows {missing} of the batch have no {EMB_TOKEN} token to pool before")
    return hits.int().argmax(-1) - 1


def states_at(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, H]: row b's state at position index[b] of [B, L, H] states."""
    return states[torch.arange(index.numel(), device=index.device), index]


class LatentAttentionPooling(nn.Module):
    def __init__(self, hidden_size: int, latents: int = 512, heads: int = 8) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] states and [B, L] mask (1 = a real token) -> [B, H], in this module's dtype."""
        states = states.to(self.latents.dtype)
        latents = self.latents.unsqueeze(0).expand(states.shape[0], -1, -1)
        attended, _ = self.attention(states, latents, latents, need_weights=False)
        out = self.mlp(attended)
        weights = mask.to(out.dtype).unsqueeze(-1)
        return (out * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def save(self, folder: str | Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, Path(folder) / POOLING_FILE)

    def load_if_saved(self, folder: str | Path) -> bool:
        path = Path(folder) / POOLING_FILE
        if path.is_file():
            self.load_state_dict(load_file(path))
        return path.is_file()
