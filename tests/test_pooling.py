"""Pooling: NV-Embed's latent-attention block as published, loaded from a state dict laid out as NV-Embed's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lamra_pl.errors import LamraError
from lamra_pl.formats.settings import POOLING_FILE
from lamra_pl.models.pooling import LatentAttentionPooling

HIDDEN, LATENTS, HEADS, HEAD_DIM = 16, 6, 2, 16  # NV-Embed's proportions: a head as wide as the hidden size


def nv_embed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under NV-Embed's names and shapes (its `latent_attention_model`)."""
    g = torch.Generator().manual_seed(seed)
    inner = HEADS * HEAD_DIM

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    prefix = "latent_attention_model."
    return {
        prefix + "latents": rand(LATENTS, HIDDEN),
        prefix + "cross_attend_blocks.0.norm.weight": 1 + rand(HIDDEN),
        prefix + "cross_attend_blocks.0.norm.bias": rand(HIDDEN),
        prefix + "cross_attend_blocks.0.norm_context.weight": 1 + rand(HIDDEN),
        prefix + "cross_attend_blocks.0.norm_context.bias": rand(HIDDEN),
        prefix + "cross_attend_blocks.0.fn.to_q.weight": rand(inner, HIDDEN),
        prefix + "cross_attend_blocks.0.fn.to_kv.weight": rand(2 * inner, HIDDEN),
        prefix + "cross_attend_blocks.0.fn.to_out.weight": rand(HIDDEN, inner),
        prefix + "cross_attend_blocks.1.norm.weight": 1 + rand(HIDDEN),
        prefix + "cross_attend_blocks.1.norm.bias": rand(HIDDEN),
        prefix + "cross_attend_blocks.1.fn.net.0.weight": rand(8 * HIDDEN, HIDDEN),
        prefix + "cross_attend_blocks.1.fn.net.0.bias": rand(8 * HIDDEN),
        prefix + "cross_attend_blocks.1.fn.net.2.weight": rand(HIDDEN, 4 * HIDDEN),
        prefix + "cross_attend_blocks.1.fn.net.2.bias": rand(HIDDEN),
    }


def reference(state: dict[str, torch.Tensor], states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NV-Embed's forward written out from its description, on its own tensors, head by head with explicit softmax
    (no code of the project's block): pre-norm attention of the states to the normalised latents, residual, pre-norm
    GEGLU feed-forward, residual, masked mean."""
    w = {k.removeprefix("latent_attention_model."): v.double() for k, v in state.items()}
    x = states.double()
    q_in = F.layer_norm(x, (HIDDEN,), w["cross_attend_blocks.0.norm.weight"], w["cross_attend_blocks.0.norm.bias"])
    lat = F.layer_norm(
        w["latents"],
        (HIDDEN,),
        w["cross_attend_blocks.0.norm_context.weight"],
        w["cross_attend_blocks.0.norm_context.bias"],
    )
    q = q_in @ w["cross_attend_blocks.0.fn.to_q.weight"].T
    k, v = (lat @ w["cross_attend_blocks.0.fn.to_kv.weight"].T).chunk(2, dim=-1)
    heads = []
    for h in range(HEADS):
        cut = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        scores = torch.einsum("bld,rd->blr", q[..., cut], k[:, cut]) / HEAD_DIM**0.5
        heads.append(torch.einsum("blr,rd->bld", scores.softmax(-1), v[:, cut]))
    x = x + torch.cat(heads, -1) @ w["cross_attend_blocks.0.fn.to_out.weight"].T
    f_in = F.layer_norm(x, (HIDDEN,), w["cross_attend_blocks.1.norm.weight"], w["cross_attend_blocks.1.norm.bias"])
    hidden = f_in @ w["cross_attend_blocks.1.fn.net.0.weight"].T + w["cross_attend_blocks.1.fn.net.0.bias"]
    value, gate = hidden.chunk(2, dim=-1)
    x = (
        x
        + (value * F.gelu(gate)) @ w["cross_attend_blocks.1.fn.net.2.weight"].T
        + w["cross_attend_blocks.1.fn.net.2.bias"]
    )
    m = mask.double().unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1)


def test_nv_embed_state_dict_loads_and_pools_as_nv_embed(tmp_path):
    state = nv_embed_state()
    pool = LatentAttentionPooling(HIDDEN, latents=LATENTS, heads=HEADS, head_dim=HEAD_DIM)
    before = pool.to_q.weight.detach().clone()
    save_file(state, tmp_path / POOLING_FILE)
    assert pool.load_if_saved(tmp_path)
    assert not torch.equal(pool.to_q.weight, before)  # it loaded
    states = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    out = pool(states, mask)
    torch.testing.assert_close(out.double(), reference(state, states, mask), atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_row():
    torch.manual_seed(0)
    pool = LatentAttentionPooling(HIDDEN, latents=LATENTS, heads=HEADS)
    row = torch.randn(1, 4, HIDDEN)
    padded = torch.cat([row, torch.randn(1, 3, HIDDEN)], dim=1)
    alone = pool(row, torch.ones(1, 4))
    with_padding = pool(padded, torch.tensor([[1, 1, 1, 1, 0, 0, 0]]))
    torch.testing.assert_close(alone, with_padding, atol=1e-6, rtol=1e-6)


def test_weights_of_another_shape_or_the_earlier_block_are_one_line_refusals():
    pool = LatentAttentionPooling(HIDDEN, latents=LATENTS, heads=HEADS, head_dim=HEAD_DIM)
    wide = LatentAttentionPooling(HIDDEN, latents=LATENTS, heads=HEADS, head_dim=2 * HEAD_DIM)
    with pytest.raises(LamraError, match="do not fit this model") as error:
        pool.load_state(wide.state_dict(), "pooling.safetensors")
    assert "\n" not in str(error.value)
    earlier = {"latents": torch.zeros(LATENTS, HIDDEN), "attention.in_proj_weight": torch.zeros(3 * HIDDEN, HIDDEN)}
    with pytest.raises(LamraError, match="earlier block"):
        pool.load_state(earlier, "pooling.safetensors")


def test_a_fit_checkpoint_with_the_earlier_block_is_refused_with_that_reason(tiny_backbone):
    from lamra_pl.models.backbone import BackboneSpec
    from lamra_pl.models.embedding import EmbeddingModule

    module = EmbeddingModule(BackboneSpec(tiny_backbone), pooling="latent_attention", latents=4, latent_heads=2)
    module.configure_model()
    saved = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    module.check_checkpoint_matches(saved)  # today's layout: accepted
    saved = {k: v for k, v in saved.items() if not k.startswith("latent_pool.")}
    saved["latent_pool.attention.in_proj_weight"] = torch.zeros(3, 3)
    with pytest.raises(LamraError, match="checkpoint: latent-attention weights of the earlier block"):
        module.check_checkpoint_matches(saved)
