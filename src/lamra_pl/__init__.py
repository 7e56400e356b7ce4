"""lamra-pl: LMM universal retrievers and rerankers (LamRA, MM-Embed) on PyTorch Lightning.

The public classes are importable from here (`lamra_pl.EmbeddingModule`, as configs name them), each loaded when
first used. Class paths of earlier versions (`lamra_pl.models.rerank.RerankModule`, `lamra_pl.report.FinalMetrics`)
still import, through LEGACY_MODULES, so old configs and checkpoints keep working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

PUBLIC: dict[str, str] = {
    "EmbeddingModule": "lamra_pl.models.embedding",
    "RerankModule": "lamra_pl.models.reranker",
    "CLIPModule": "lamra_pl.models.clip",
    "BackboneSpec": "lamra_pl.models.backbone",
    "LoraSpec": "lamra_pl.models.backbone",
    "ScheduleSpec": "lamra_pl.models.base",
    "GradCacheSpec": "lamra_pl.models.gradcache",
    "LossSpec": "lamra_pl.models.loss_spec",
    "DistillSpec": "lamra_pl.models.distill",
    "load_module": "lamra_pl.models.checkpoints",
    "load_retriever": "lamra_pl.models.checkpoints",
    "load_reranker": "lamra_pl.models.checkpoints",
    "ShardDataModule": "lamra_pl.data.datamodule",
    "MixDataModule": "lamra_pl.data.mix",
    "SkipCounts": "lamra_pl.callbacks",
    "NonFiniteGuard": "lamra_pl.callbacks",
    "RngResume": "lamra_pl.callbacks",
    "FinalMetrics": "lamra_pl.callbacks",
    "Progress": "lamra_pl.callbacks",
    "FSDP2Strategy": "lamra_pl.strategies",
    "AtomicCheckpointIO": "lamra_pl.formats.checkpoint",
    "CheckpointWriter": "lamra_pl.formats.checkpoint",
    "Retriever": "lamra_pl.api",
    "Reranker": "lamra_pl.api",
    "ModelSettings": "lamra_pl.formats.settings",
}
__all__ = sorted(PUBLIC)

# Module paths of earlier versions -> the module that holds their classes now.
LEGACY_MODULES: dict[str, str] = {
    "lamra_pl.models.rerank": "lamra_pl.models.reranker",
    "lamra_pl.report": "lamra_pl.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'lamra_pl' has no attribute {name!r}")


class _LegacyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an earlier module path as the module that replaced it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in LEGACY_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(LEGACY_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the module it stands for is already executed


if not any(isinstance(finder, _LegacyModules) for finder in sys.meta_path):
    sys.meta_path.append(_LegacyModules())
