"""Skip counts under DDP: each rank's batches carry skipped-sample counts; SkipCounts logs their sums over ranks.

    python ddp_skips.py OUT DEVICES

Rank 1 (or the only rank) skips 2 samples as `bad_sample` in its third batch, rank 0 one `unreadable_image` in
its fifth (with one process both happen on rank 0). Six steps, logged every step, to the TensorBoard run OUT.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lamra_pl.callbacks import SkipCounts
from lamra_pl.formats.sample import SKIP_REASONS


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __iter__(self):
        for i in range(6):
            skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
            if i == 2 and (self.rank == 1 or self.world == 1):
                skipped[SKIP_REASONS.index("bad_sample")] = 2
            if i == 4 and self.rank == 0:
                skipped[SKIP_REASONS.index("unreadable_image")] = 1
            yield {"x": torch.ones(2, 1), "skipped": skipped}


class OneWeight(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        return (self.w - batch["x"]).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(Batches(self.global_rank, self.trainer.world_size), batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)) if devices > 1 else "auto"
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=6,
        logger=TensorBoardLogger(out.parent, name="", version=out.name),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SkipCounts()],
    )
    trainer.fit(OneWeight())


if __name__ == "__main__":
    main()
