"""FSDP2 for LoRA backbones: Lightning's `ModelParallelStrategy` set up for pure data-parallel sharding, with
adapter-only checkpoints (lightning.md section 2).

    lamra-pl fit -c experiments/lamra_ret/stage2_instruct.yaml -c experiments/strategies/fsdp2.yaml

The sharding itself (`fully_shard` over every decoder layer and vision block, then the trunk as the root) is
`lamra_pl.models.backbone.fully_shard_backbone`, called from the module's `configure_model`, where Lightning
expects it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lamra_pl.errors import LamraError


class FSDP2Strategy(ModelParallelStrategy):
    """Every process holds a shard of the frozen base and of the adapters (data parallelism only, no tensor
    parallelism), on one node or many.

    Checkpoints hold the trainable tensors only, gathered whole on rank 0 into one file (written through the
    Trainer's CheckpointIO, so atomically); a resume loads them into the shards, and the optimizer state with
    them. The frozen base is never gathered.

    Args:
        process_group_backend: "nccl" on GPUs, "gloo" on CPU (the default follows the device).
        timeout: collective timeout.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta = timedelta(minutes=30)) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (tensor parallelism inside a
        # node); here every process is a data-parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # A collective: every rank takes part, rank 0 receives the full trainable tensors, on CPU.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():
            raise LamraError(f"checkpoint {path} is not a file (FSDP2Strategy writes single-file checkpoints)")
        # Lightning loads the tensors straight into the shards and skips missing ones when loading is not
        # strict (checkpoints hold trainable tensors only), so check the keys first, as the DDP path does.
        saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"]
        check = getattr(self.lightning_module, "check_checkpoint_matches", None)
        if check is not None:
            check(saved)
        return super().load_checkpoint(path, weights_only=True)
