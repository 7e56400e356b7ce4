"""Every pooling of last-layer states into one embedding per input.

* "before_emb" (LamRA): the state of the token just before the first `<emb>` (the `\\n` ending
  `<|im_start|>assistant\\n`); "last_token": the state of the last non-padding token. Both are a position per row
  (`pooling_index`) and hold for left and right padding.
* "latent_attention" (NV-Embed's, MM-Embed's; spec mmembed_mbeir.md section 1.1), NV-Embed's published block
  (`LatentAttentionPooling`): the last-layer states are the queries of a multi-head cross-attention whose keys and
  values are one trainable latent array (NV-Embed: 512 latents, 8 heads of the hidden size each), both sides
  layer-normalised first; a residual around it; then a pre-norm GEGLU feed-forward (4x wide) with its residual; then
  the mean over the real tokens. Its weights train with the adapter, are saved in the `fit` checkpoint, and
  `lamra-pl merge` writes them beside the merged model (`formats.settings.POOLING_FILE`), from where a model built on
  that folder loads them; a pooling file laid out as NV-Embed's `latent_attention_model` loads too (`NV_EMBED_KEYS`).
* "mean" (U-MARVEL's, NV-Embed's ablation): the mean of the last-layer states over the real tokens (`mean_pool`);
  with a bidirectional decoder (`BackboneSpec.attention`) every one of them has read the whole input.

The two means ("mean", "latent_attention") may leave out the query's task-instruction tokens (the retriever's
`exclude_instruction`, NV-Embed's and MM-Embed's instruction mask): the collator marks them
(`embedding_inputs.instruction_mask`), and they are dropped from the mean only; every token still attends to them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lamra_pl.errors import LamraError
from lamra_pl.formats.settings import POOLING_FILE
from lamra_pl.models.backbone import EMB_TOKEN

Pooling = Literal["before_emb", "last_token", "latent_attention", "mean"]
# The poolings that average over tokens, which may leave the instruction's tokens out.
MEANS = ("mean", "latent_attention")


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


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H]: the mean of [B, L, H] states over the positions where the [B, L] mask is non-zero (real tokens, less
    any left out), in float32 (the sum of thousands of bfloat16 states would round)."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (states.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def refuse_earlier_block(names: Iterable[str], where: str, prefix: str = "") -> None:
    """Weights of the block built before 2026-11-26 (nn.MultiheadAttention + MLP, no norms, residuals or GEGLU: not
    NV-Embed's) cannot be mapped onto this one: one line saying so."""
    if any(name.startswith((prefix + "attention.in_proj", prefix + "mlp.")) for name in names):
        raise LamraError(
            f"{where}: latent-attention weights of the earlier block (attention.*, mlp.*: no norms, residuals or "
            "GEGLU), which is not NV-Embed's and is no longer built; train the pooling again"
        )


# NV-Embed's parameter names (its `LatentAttentionModel`, optionally under `latent_attention_model.`) -> ours.
NV_EMBED_KEYS = {
    "latents": "latents",
    "cross_attend_blocks.0.norm.": "attention_norm.",
    "cross_attend_blocks.0.norm_context.": "latent_norm.",
    "cross_attend_blocks.0.fn.to_q.": "to_q.",
    "cross_attend_blocks.0.fn.to_kv.": "to_kv.",
    "cross_attend_blocks.0.fn.to_out.": "to_out.",
    "cross_attend_blocks.1.norm.": "feed_forward_norm.",
    "cross_attend_blocks.1.fn.net.0.": "feed_forward_in.",
    "cross_attend_blocks.1.fn.net.2.": "feed_forward_out.",
}
NV_EMBED_PREFIX = "latent_attention_model."


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling block, as published.

    Shapes (d = hidden size, r latents, h heads of `head_dim` each, default d as NV-Embed's): states [B, L, d] are
    the queries, `latents` [r, d] the keys and values; `to_q` d -> h*head_dim, `to_kv` d -> 2*h*head_dim, `to_out`
    h*head_dim -> d (no biases); the feed-forward d -> 8d (GEGLU halves it to 4d) -> d. No attention mask: every
    token attends to every latent; padding is dropped by the masked mean at the end.
    """

    def __init__(self, hidden_size: int, latents: int = 512, heads: int = 8, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim or hidden_size
        inner = heads * self.head_dim
        self.latents = nn.Parameter(torch.randn(latents, hidden_size))
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.latent_norm = nn.LayerNorm(hidden_size)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(hidden_size, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.feed_forward_in = nn.Linear(hidden_size, 8 * hidden_size)
        self.feed_forward_out = nn.Linear(4 * hidden_size, hidden_size)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] states and [B, L] mask (1 = a real token) -> [B, H], in this module's dtype."""
        states = states.to(self.latents.dtype)
        batch, length, _ = states.shape
        queries = self._heads(self.to_q(self.attention_norm(states)))
        # the latents' keys and values are the same for every row: computed once, broadcast over the batch
        keys, values = self.to_kv(self.latent_norm(self.latents)).unsqueeze(0).chunk(2, dim=-1)
        keys, values = (self._heads(t).expand(batch, -1, -1, -1) for t in (keys, values))
        attended = F.scaled_dot_product_attention(queries, keys, values)
        hidden = states + self.to_out(attended.transpose(1, 2).reshape(batch, length, -1))
        value, gate = self.feed_forward_in(self.feed_forward_norm(hidden)).chunk(2, dim=-1)
        hidden = hidden + self.feed_forward_out(value * F.gelu(gate))
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, heads * head_dim] -> [B, heads, N, head_dim]."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def load_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load our own layout or NV-Embed's (names mapped by `NV_EMBED_KEYS`); shapes must match."""
        refuse_earlier_block(state, where)
        renamed = {}
        for key, tensor in state.items():
            name = key.removeprefix(NV_EMBED_PREFIX)
            for theirs, ours in NV_EMBED_KEYS.items():
                if name.startswith(theirs):
                    name = ours + name[len(theirs) :]
                    break
            renamed[name] = tensor
        try:
            self.load_state_dict(renamed)
        except RuntimeError as error:
            first = str(error).strip().splitlines()
            raise LamraError(
                f"{where}: these latent-attention weights do not fit this model: {' '.join(first)[:400]}"
            ) from None

    def save(self, folder: str | Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, Path(folder) / POOLING_FILE)

    def load_if_saved(self, folder: str | Path) -> bool:
        path = Path(folder) / POOLING_FILE
        if path.is_file():
            self.load_state(load_file(path), str(path))
        return path.is_file()
