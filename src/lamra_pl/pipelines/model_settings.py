"""`lamra-pl settings`: the settings file (`lamra_pl.formats.settings`) of a model folder this project did not write.

A released LamRA folder or a Qwen-VL download has no `lamra_pl.json`, so every tool reads it with the defaults (and
warns). Writing the file once, with the settings it was trained with, makes every tool and the Python API read it
that way without `--settings.*` each time.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

from lamra_pl.errors import LamraError
from lamra_pl.formats.settings import ModelSettings, read_settings, write_settings
from lamra_pl.models.backbone import checkpoint
from lamra_pl.models.checkpoints import class_path_of
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.reranker import RerankModule

KINDS = {"retriever": EmbeddingModule, "reranker": RerankModule}


def model_settings(
    model: str,
    kind: Literal["retriever", "reranker"] = "retriever",
    settings: ModelSettings | None = None,
    write: bool = False,
) -> dict[str, Any]:
    """Print a model folder's settings file, as it is or with the settings given; --write saves it into the folder.

    Args:
        model: a model folder (a released LamRA folder, a Qwen-VL download, a merged folder).
        kind: what the folder's weights are: a retriever (EmbeddingModule) or a reranker (RerankModule).
        settings: how it reads its inputs (`--settings.rope 1d`, `--settings.max_pixels N`, ...); unset fields keep
            what the folder's settings file says, or the defaults, which the file then states.
        write: write the file (lamra_pl.json) into the folder; without it, only print what would be written.
    """
    folder = Path(model)
    if not folder.is_dir():
        raise LamraError(f"{model!r} is not a model folder")
    checkpoint(folder)  # a clear error if it is not a checkpoint folder
    cls = KINDS[kind]
    found = read_settings(folder)
    args: dict[str, Any] = {}
    if found is not None:
        if found.class_path != class_path_of(cls):
            raise LamraError(f"{found.path} says the folder is a {found.class_path}, not a {kind} ({cls.__name__})")
        args = json.loads(json.dumps(found.init_args))
    given = settings or ModelSettings()
    backbone = args.get("backbone") if isinstance(args.get("backbone"), dict) else {}
    backbone = {
        "rope": "model",
        "system_prompt": "default",
        **({"attention": "causal"} if cls is EmbeddingModule else {}),
        **backbone,
    }
    backbone.update(given.backbone_args())
    args["backbone"] = backbone
    parameters = inspect.signature(cls).parameters
    for name, value in given.module_args().items():
        if name not in parameters:
            raise LamraError(f"a {kind} has no {name!r} setting")
        args[name] = value
    for name in ("pooling", "max_text_tokens", "exclude_instruction"):  # the file states the defaults it is read with
        if name in parameters:
            args.setdefault(name, parameters[name].default)
    content = {"class_path": class_path_of(cls), "init_args": args}
    print(json.dumps(content, indent=2))
    if write:
        path = write_settings(folder, content["class_path"], args)
        print(f"written: {path}")
    return content
