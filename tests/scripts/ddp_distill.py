"""One training step of an EmbeddingModule with `model.distill` (KL over each query's list + 0.5 InfoNCE); saves the
loss, its KL term and the gradients (after DDP averaging).

    python ddp_distill.py BACKBONE OUT.safetensors DEVICES [MODE]

The 8 examples of scripts/ddp_grads.py, each with a list of 3 candidates (image and text) and teacher scores; with
DEVICES=2 each gloo rank takes half of them. MODE: "full" (each side of the batch in one forward) or "gradcache"
(GradCache, chunks of 2). The temperature is learnable, so its gradient is compared too.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, Trainer, seed_everything
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_grads import COLORS, PerturbedLoRA, SaveGrads, examples, shape_image

from lamra_pl.formats.sample import Item
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.distill import DistillSpec
from lamra_pl.models.embedding_inputs import Example
from lamra_pl.models.gradcache import GradCacheSpec


def distill_examples() -> list[Example]:
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
    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        part = distill_examples()[rank * 8 // world : (rank + 1) * 8 // world]
        batch = self.trainer.lightning_module.collator()(part)
        return torch.utils.data.DataLoader([batch], batch_size=None)


class SaveGradsAndKL(SaveGrads):
    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.grads["__loss__"] = trainer.callback_metrics["train/loss"].reshape(1)
            self.grads["__kl__"] = trainer.callback_metrics["train/distill_kl"].reshape(1)
            save_file(self.grads, self.out)


def main() -> None:
    backbone, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "full"
    seed_everything(0)
    module = PerturbedLoRA(
        BackboneSpec(backbone, gradient_checkpointing=False),
        lora=LoraSpec(r=4, alpha=8, dropout=0.0),
        learnable_temperature=True,
        optimizer=partial(torch.optim.SGD, lr=0.0),
        gradcache=GradCacheSpec(chunk_size=2) if mode == "gradcache" else None,
        distill=DistillSpec(teacher_temperature=0.2, weight=1.0, infonce_weight=0.5),
    )
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
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
        callbacks=[SaveGradsAndKL(out)],
    )
    trainer.fit(module, datamodule=RankSlice())


if __name__ == "__main__":
    main()
