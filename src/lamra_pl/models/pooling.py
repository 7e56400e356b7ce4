"""NV-Embed's latent-attention pooling, MM-Embed's (spec mmembed_mbeir.md section 1.1).

The last-layer hidden states are the queries of a multi-head cross-attention whose keys and values are one
trainable latent array (r latents; NV-Embed: 512 latents, 8 heads); an MLP (Linear, GELU, Linear) follows, then
the mean over the real tokens. Its weights train with the adapter, are saved in the `fit` checkpoint, and
`lamra-pl merge` writes them beside the merged model as POOLING_FILE, from where a model built on that folder
loads them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

POOLING_FILE = "lamra_pl_pooling.safetensors"


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
