"""One training step of the EmbeddingModule; saves the loss and the gradients (after DDP averaging).

    python ddp_grads.py BACKBONE OUT.safetensors DEVICES [MODE [LORA_DROPOUT [STRATEGY [LOSS]]]]

With DEVICES=2 each gloo rank takes half of the same 8 examples that DEVICES=1 takes in one batch. MODE:
"full" encodes each side of the batch in one forward; "chunked" encodes it in chunks of 2 inputs, all on one
graph (the same dropout draws, in the same order, as GradCache's first pass); "gradcache" is GradCache with
chunks of 2. STRATEGY: "ddp" (gloo; the default) or "fsdp2" (FSDP2Strategy; gradients are gathered whole).
Under DDP the temperature is learnable, so its gradient is compared too (FSDP2 refuses a trainable tensor
outside the sharded trunk). LOSS: "plain" (LamRA's InfoNCE; the default), "options" (every `LossSpec` option
on: OPTIONS below, with per-task temperatures for the examples' tasks 0..2 and a query without a task) or "distill"
(`model.distill`: KL over each query's list of 3 candidates with teacher scores + 0.5 InfoNCE; the KL term is saved
too, as "__kl__").
"""

from __future__ import annotations

import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import shape_image
from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.distill import DistillSpec
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator, Example
from lamra_pl.models.gradcache import GradCacheSpec
from lamra_pl.models.loss_spec import LossSpec
from lamra_pl.strategies import FSDP2Strategy

COLORS = ["red", "green", "blue", "yellow"]
TASKS = [0, 1, 2, None, 2, 1, 0, 0]  # each rank's half holds several tasks; query 3 has none (the shared temperature)
OPTIONS = LossSpec(
    false_negative_margin=0.005,  # no score within 9e-4 of a threshold here: the drops are the same in every run
    query_query=True,
    candidate_candidate=True,
    hardness_beta=2.0,
    task_temperatures=3,
    matryoshka_dims=[8, 32],
    matryoshka_weights=[0.5, 0.25],
)


def examples() -> list[Example]:
    out = []
    for i in range(8):
        color, shape = COLORS[i % 4], ["circle", "square"][i // 4]
        if i == 5:  # same positive as example 1, which sits on the other rank: masked across ranks
            color, shape = COLORS[1], "circle"
        positive = Item(f"img:{color}-{shape}", text=None, image=shape_image(color, shape))
        negative = Item(f"img:{COLORS[(i + 1) % 4]}-{shape}", image=shape_image(COLORS[(i + 1) % 4], shape))
        if i % 3:  # text queries
            query = Item(f"q{i}", text=f"{color} {shape}")
        else:  # image + text queries
            query = Item(f"q{i}", text="same shape, other color", image=shape_image(color, shape, 70))
        out.append(Example(query, positive, [negative], [positive.id], TASKS[i]))
    return out


def distill_examples() -> list[Example]:
    """`examples()`, each with a list of 3 candidates (image and text) and teacher scores."""
    out = []
    for i, example in enumerate(examples()):
        other = COLORS[(i + 2) % 4]
        example.candidates = [
            example.negatives[0],
            Item(f"img:{other}-square", image=shape_image(other, "square")),
            Item(f"txt:{i % 3}", text=f"a {COLORS[i % 4]} thing, number {i % 3}"),
        ]
        if i % 4 == 1:  # the query's own positive in its list: the teacher ranks it first, InfoNCE masks it
            example.candidates[1] = example.positive
        example.teacher_scores = [0.2 + 0.05 * i, 0.9 if i % 4 == 1 else 0.4 - 0.03 * i, 0.6 - 0.1 * (i % 3)]
        out.append(example)
    return out


class RankSlice(LightningDataModule):
    def __init__(self, distill: bool = False) -> None:
        super().__init__()
        self.distill = distill

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        part = (distill_examples() if self.distill else examples())[rank * 8 // world : (rank + 1) * 8 // world]
        batch = self.trainer.lightning_module.collator()(part)
        return torch.utils.data.DataLoader([batch], batch_size=None)


class SaveGrads(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.detach() for n, p in pl_module.named_parameters() if p.requires_grad}
        self.grads = {n: (g.full_tensor() if isinstance(g, DTensor) else g).clone() for n, g in grads.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.grads["__loss__"] = trainer.callback_metrics["train/loss"].reshape(1)
            if "train/distill_kl" in trainer.callback_metrics:
                self.grads["__kl__"] = trainer.callback_metrics["train/distill_kl"].reshape(1)
            save_file(self.grads, self.out)


class PerturbedLoRA(EmbeddingModule):
    def configure_model(self) -> None:
        super().configure_model()
        generator = torch.Generator().manual_seed(1)
        for name, param in self.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would zero the gradient of A
                value = 0.1 * torch.randn(param.shape, generator=generator)
                if isinstance(param, DTensor):  # each FSDP2 rank keeps its shard of the same tensor
                    value = distribute_tensor(value, param.device_mesh, param.placements)
                with torch.no_grad():
                    param.copy_(value)


class ChunkedOnOneGraph(PerturbedLoRA):
    def collator(self) -> EmbeddingCollator:
        return EmbeddingCollator(self.processor, max_text_tokens=self.max_text_tokens, chunk_size=2)


def main() -> None:
    backbone, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "full"
    dropout = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    fsdp2 = len(sys.argv) > 6 and sys.argv[6] == "fsdp2"
    loss = sys.argv[7] if len(sys.argv) > 7 else "plain"
    seed_everything(0)
    module = (ChunkedOnOneGraph if mode == "chunked" else PerturbedLoRA)(
        BackboneSpec(backbone, gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=dropout),
        learnable_temperature=not fsdp2,
        optimizer=partial(torch.optim.SGD, lr=0.0),
        gradcache=GradCacheSpec(chunk_size=2) if mode == "gradcache" else None,
        loss=OPTIONS if loss == "options" else None,
        distill=DistillSpec(teacher_temperature=0.2, weight=1.0, infonce_weight=0.5) if loss == "distill" else None,
    )
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    if fsdp2:
        strategy = FSDP2Strategy(process_group_backend="gloo", timeout=timedelta(seconds=120))
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[SaveGrads(out)],
    )
    trainer.fit(module, datamodule=RankSlice(distill=loss == "distill"))


if __name__ == "__main__":
    main()
