"""GradCache (Gao et al. 2021): a large contrastive batch in the memory of one chunk, with exact gradients.

`GradCacheSpec` switches it on (`model.gradcache` in a config); `gradcache_step` is the optimizer step a module
takes with it, and `check_trainer` the rule it imposes on the Trainer. The step, for a batch collated in chunks:

1. Embed every chunk without a graph, recording the RNG state before each (dropout masks).
2. Compute the loss on the cached embeddings, gathered across ranks with gradient, and its gradient with respect to
   them (and to the loss's own parameters: a learnable temperature, per-task temperatures). The loss is the
   module's `contrastive_loss`, every `LossSpec` option included, so GradCache is exact with each of them.
3. Re-embed each chunk with a graph under its recorded RNG state and back-propagate the surrogate
   <embedding, gradient> (`losses.gradcache_surrogate`): the parameter gradients sum to exactly those of the
   full-batch loss. Only the last chunk's backward reduces gradients across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ParallelStrategy
from torch.distributed.fsdp import FSDPModule

from lamra_pl.errors import LamraError
from lamra_pl.models.losses import gradcache_surrogate

if TYPE_CHECKING:
    from lamra_pl.models.embedding import EmbeddingModule


@dataclass
class GradCacheSpec:
    """GradCache's settings (`model.gradcache`; null: off).

    Args:
        chunk_size: the batch is encoded in chunks of this many inputs, so activation memory is that of one chunk
            while the loss still sees every in-batch negative. Trainer-side gradient clipping and accumulation are
            unavailable (the module steps the optimizer itself): use `clip_norm` for clipping.
        clip_norm: max total gradient norm (None: no clipping).
    """

    chunk_size: int
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise LamraError(f"model.gradcache.chunk_size must be positive, got {self.chunk_size}")

    @classmethod
    def of(cls, value: GradCacheSpec | dict[str, Any] | None) -> GradCacheSpec | None:
        return cls(**value) if isinstance(value, dict) else value


def check_trainer(trainer: Trainer) -> None:
    """GradCache steps the optimizer itself: Trainer-side clipping cannot apply (Lightning refuses it too, with a
    traceback that does not say where the setting went)."""
    if trainer.gradient_clip_val:
        raise LamraError(
            "trainer.gradient_clip_val is not available with model.gradcache (GradCache steps the optimizer itself): "
            "set model.gradcache.clip_norm instead"
        )


def gradcache_step(module: EmbeddingModule, spec: GradCacheSpec, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """One optimizer step of `module` on a chunked batch; returns (loss, in-batch accuracy), detached."""
    optimizer = module.optimizers()
    optimizer.zero_grad()
    chunks = [*batch["query"], *batch["candidates"]]
    device_rng = [module.device] if module.device.type == "cuda" else []
    states = []
    with torch.no_grad():
        cached = []
        for chunk in chunks:
            states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in device_rng]))
            cached.append(module.embed(chunk))
    n_query = len(batch["query"])
    queries = torch.cat(cached[:n_query]).requires_grad_()
    candidates = torch.cat(cached[n_query:]).requires_grad_()
    loss, accuracy = module.contrastive_loss(batch, gather=True, queries=queries, candidates=candidates)
    # Only leaves (and the gather's collective) are on this graph, no parameter of the backbone: no DDP hook. The
    # loss's own parameters (learnable temperature, per-task temperatures) take their gradient from it directly.
    loss_parameters = module.loss_parameters()
    grads = torch.autograd.grad(loss, [queries, candidates, *loss_parameters])
    chunk_grads = [*grads[0].split([len(c["input_ids"]) for c in batch["query"]])]
    chunk_grads += grads[1].split([len(c["input_ids"]) for c in batch["candidates"]])
    for k, (chunk, grad, (cpu_state, device_states)) in enumerate(zip(chunks, chunk_grads, states, strict=True)):
        last = k == len(chunks) - 1
        with _gradient_sync(module, enabled=last), torch.random.fork_rng(devices=device_rng):
            torch.set_rng_state(cpu_state)
            for d, state in zip(device_rng, device_states, strict=True):
                torch.cuda.set_rng_state(state, d)
            surrogate = gradcache_surrogate(module.embed(chunk), grad)
            if last:  # the loss parameters' gradients join the last (synced) backward
                for parameter, parameter_grad in zip(loss_parameters, grads[2:], strict=True):
                    surrogate = surrogate + gradcache_surrogate(parameter, parameter_grad)
            module.manual_backward(surrogate)
    if spec.clip_norm is not None:
        module.clip_gradients(optimizer, gradient_clip_val=spec.clip_norm, gradient_clip_algorithm="norm")
    optimizer.step()  # runs on_before_optimizer_step (the non-finite guard) first
    module.lr_schedulers().step()
    return loss.detach(), accuracy


@contextmanager
def _gradient_sync(module: EmbeddingModule, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only if `enabled` (the last chunk): DDP through `no_sync`,
    FSDP2 through `set_requires_gradient_sync`; without either it changes nothing."""
    strategy, base = module.trainer.strategy, module.trunk
    if enabled:
        yield
    elif isinstance(base, FSDPModule):
        base.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            base.set_requires_gradient_sync(True)
    elif isinstance(strategy, ParallelStrategy):
        with strategy.block_backward_sync():
            yield
    else:
        yield
