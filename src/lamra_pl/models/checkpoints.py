"""The one loader: what is at a path, which module class it is, its settings; and the merged folder it becomes.

A path is one of:

* a `lamra-pl fit` checkpoint (a Lightning .ckpt: trainable tensors + hyperparameters). Its class is the class path
  LightningCLI stored (`_class_path`), one of MODULES; a checkpoint without one (a module built in Python) is told
  apart by its hyperparameters' keys. Hyperparameters of checkpoints written before the typed groups existed (flat
  `backbone: PATH`, `rope`, `min_pixels`, ...) are migrated (`migrate`).
* a model folder: a Hugging Face checkpoint folder, `merge`d (with its settings file, `lamra_pl.formats.settings`,
  naming the class and how it reads inputs) or not (a released or off-the-shelf checkpoint: the caller's default
  class with its defaults);
* a text-only causal LM's .gguf file (a folder's worth of checkpoint in one file).

Loading builds the module from its own typed arguments and loads the tensors; nothing a file names is imported or
called. Every class path a checkpoint or settings file names is checked against ALLOWED (the project's modules,
torch's optimizers and LR schedulers, Lightning's own instantiator) and anything else is refused, naming its key;
the optimizer a checkpoint records is never built. `trust_remote_code` is never taken from a file: it is the
caller's (the user's command line or YAML), and a backbone folder that names code of its own is refused without it.
A checkpoint's relative backbone path is resolved against the checkpoint's folder (`formats/checkpoint.py`);
the caller may override it (`backbone={"path": ...}`, `--backbone`).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Collection
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from lamra_pl.errors import LamraError
from lamra_pl.formats import checkpoint as ckpt_format
from lamra_pl.formats.settings import SETTINGS_FILE, ModelSettings, read_settings, write_settings
from lamra_pl.models.backbone import BackboneSpec, checkpoint, refuse_remote_code
from lamra_pl.models.base import ScheduleSpec, TrainingModule
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.pooling import MEANS
from lamra_pl.models.rerank_inputs import JudgePrompt
from lamra_pl.models.reranker import RerankModule

# Every class path a checkpoint or settings file may name: today's, the package-top alias, and earlier ones.
MODULES: dict[str, type[TrainingModule]] = {
    "lamra_pl.models.embedding.EmbeddingModule": EmbeddingModule,
    "lamra_pl.EmbeddingModule": EmbeddingModule,
    "lamra_pl.models.reranker.RerankModule": RerankModule,
    "lamra_pl.models.rerank.RerankModule": RerankModule,
    "lamra_pl.RerankModule": RerankModule,
    "lamra_pl.models.clip.CLIPModule": CLIPModule,
    "lamra_pl.CLIPModule": CLIPModule,
}


def _classes(module: Any, base: type) -> set[str]:
    return {
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if inspect.isclass(value) and issubclass(value, base) and value is not base and not name.startswith("_")
    }


# Every class path a file may name, besides MODULES: what LightningCLI records with a module (its instantiator, the
# optimizer and scheduler classes torch ships). They are checked, never imported from the file's text.
ALLOWED = {
    *MODULES,
    "lightning.pytorch.cli.instantiate_module",
    *_classes(torch.optim, torch.optim.Optimizer),
    *_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
}
# The attention implementations of transformers itself: what a file may ask for (other values name kernels to fetch).
ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
# Hyperparameters that are the Trainer's business or Lightning's bookkeeping, never a module's argument here.
NOT_ARGUMENTS = ("_class_path", "_instantiator", "optimizer", "max_nonfinite_steps")
# What a folder of merged weights changes about the module that wrote it: the adapter is merged (no LoRA), the dtype
# is the folder's own, nothing trains, and code is never trusted from a file.
FOLDER = {"dtype": "auto", "gradient_checkpointing": False, "trust_remote_code": False}


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_class_paths(values: dict[str, Any], where: str, key: str, also: Collection[str] = ()) -> None:
    """Refuse, naming its key, any class path in `values` (a checkpoint's hyper-parameters, a settings file's
    arguments) that is not in ALLOWED, nor in `also` (class paths the user's own config names)."""
    for found_key, class_path in ckpt_format.class_paths(values, key):
        if class_path not in ALLOWED and class_path not in also:
            raise LamraError(
                f"{where}: {found_key} names {class_path!r}, which lamra-pl does not load from a file (it imports "
                "nothing a file names: only its own modules and torch's optimizers and schedulers)"
            )


def module_class(class_path: str, where: str) -> type[TrainingModule]:
    if class_path not in MODULES:
        raise LamraError(
            f"{where} names the class {class_path!r}, which is not a lamra-pl module (one of "
            f"{sorted({class_path_of(c) for c in MODULES.values()})}); nothing else is loaded from a file"
        )
    return MODULES[class_path]


def migrate(cls: type[TrainingModule], args: dict[str, Any]) -> dict[str, Any]:
    """A module's arguments in today's typed groups, from hyperparameters or settings of any lamra-pl version.

    Before the groups (version 1), the backbone's settings, the schedule and GradCache were flat arguments
    (`backbone: PATH`, `rope`, `min_pixels`, ..., `warmup_ratio`, `gradcache_chunk_size`)."""
    args = {k: v for k, v in args.items() if k not in NOT_ARGUMENTS}
    if issubclass(cls, (EmbeddingModule, RerankModule)) and not isinstance(args.get("backbone", {}), dict):
        spec = {f.name for f in fields(BackboneSpec)} - {"path"}
        args["backbone"] = {"path": args.pop("backbone"), **{k: args.pop(k) for k in spec & set(args)}}
    schedule = {f.name for f in fields(ScheduleSpec)} & set(args)
    if schedule:
        args["schedule"] = {k: args.pop(k) for k in schedule}
    if "gradcache_chunk_size" in args:
        chunk, clip = args.pop("gradcache_chunk_size"), args.pop("gradcache_clip_norm", None)
        args["gradcache"] = None if chunk is None else {"chunk_size": chunk, "clip_norm": clip}
    return args


def build(cls: type[TrainingModule], args: dict[str, Any], where: str) -> TrainingModule:
    """`cls(**args)`, after checking that every argument is one of its own."""
    unknown = sorted(set(args) - set(inspect.signature(cls).parameters))
    if unknown:
        raise LamraError(f"{where}: {unknown} are not arguments of {cls.__name__}")
    return cls(**args)


def read_checkpoint(
    path: str | Path, also: Collection[str] = ()
) -> tuple[type[TrainingModule], dict[str, Any], dict[str, Any]]:
    """(class, its arguments, the checkpoint) of a `lamra-pl fit` checkpoint, loaded with weights_only=True, its
    class paths checked (`check_class_paths`, `also`: those the user's config names) and its backbone path resolved
    (`formats.checkpoint.backbone_path`)."""
    ckpt = ckpt_format.read(path)
    return (*checkpoint_arguments(ckpt, path, also), ckpt)


def checkpoint_arguments(
    ckpt: dict[str, Any], path: str | Path, also: Collection[str] = ()
) -> tuple[type[TrainingModule], dict[str, Any]]:
    """`read_checkpoint` of a checkpoint already read from `path`: (class, its arguments)."""
    hparams = ckpt.get("hyper_parameters") or {}
    if not isinstance(hparams, dict):
        raise LamraError(f"checkpoint {path}: 'hyper_parameters' is not a mapping")
    hparams = dict(hparams)
    check_class_paths(hparams, f"checkpoint {path}", "hyper_parameters", also)
    if "_class_path" in hparams:
        cls = module_class(hparams["_class_path"], f"checkpoint {path}")
    elif "clip_model" in hparams:  # the CLIP baseline's (its only model argument)
        cls = CLIPModule
    elif "loss_reduction" in hparams:  # a reranker's hyperparameters name its loss
        cls = RerankModule
    else:
        cls = EmbeddingModule
    args = migrate(cls, hparams)
    backbone = args.get("backbone")
    if isinstance(backbone, dict):
        _check_file_values(backbone, f"checkpoint {path}: hyper_parameters.backbone")
    if isinstance(backbone, dict) and isinstance(backbone.get("path"), str):
        args["backbone"] = {**backbone, "path": ckpt_format.backbone_path(backbone["path"], ckpt, path)}
    return cls, args


def _check_file_values(backbone: dict[str, Any], where: str) -> None:
    """Refuse backbone settings read from a file that would make transformers fetch or run code: an attention
    implementation other than transformers' own (a Hub kernel repository is code)."""
    attention = backbone.get("attn_implementation")
    if attention is not None and attention not in ATTENTION:
        raise LamraError(
            f"{where}.attn_implementation is {attention!r}; from a file lamra-pl takes only {sorted(ATTENTION)} "
            "(another value, e.g. a kernel repository, only from your command line or YAML)"
        )


def load_module(
    path: str | Path,
    kind: type[TrainingModule] | None = None,
    backbone: dict[str, Any] | None = None,
    module: dict[str, Any] | None = None,
) -> TrainingModule:
    """The module at `path` (a checkpoint, a model folder or a .gguf file), built and loaded, in eval mode.

    `kind`: the class a model folder is read as when its settings file names none of that kind, with that class's
    defaults: a folder without settings (a released or off-the-shelf checkpoint), or one with the settings of
    another kind of module (a merged retriever read as a zero-shot judge). Without `kind`, a folder is what its
    settings say, an EmbeddingModule when they say nothing. `backbone`: the caller's settings that override the
    backbone's (e.g. {"dtype": "float32"}, {"path": DIR} for a checkpoint whose backbone moved,
    {"trust_remote_code": True}, which no file can set); `module`: the caller's values of the module's own arguments
    (`ModelSettings.module_args`: pooling, max_text_tokens, exclude_instruction). A folder without a settings file
    is read with the defaults of what the caller did not give, and a warning names each. Activation checkpointing is
    off: a loaded module is not trained.
    """
    p = Path(path)
    overrides = {"gradient_checkpointing": False, **(backbone or {})}
    module_overrides = dict(module or {})
    if p.is_file() and p.suffix != ".gguf":
        cls, args, ckpt = read_checkpoint(p)
        stored = args.get("backbone")
        if isinstance(stored, dict):
            # trust_remote_code is the caller's, never the file's (False unless the caller says otherwise).
            args["backbone"] = {**stored, "trust_remote_code": False, **overrides}
            if stored.get("trust_remote_code") is True:
                where = f"checkpoint {p}: hyper_parameters.backbone.trust_remote_code"
                refuse_remote_code(BackboneSpec(**args["backbone"]), asked_by=where)
        built = build(cls, {**args, **_fitting(cls, module_overrides, p)}, f"checkpoint {p}")
        built.configure_model()
        built.on_load_checkpoint(ckpt)
        built.load_state_dict(ckpt["state_dict"], strict=False)  # trainable tensors only, checked just above
        return built.eval()
    if p.is_dir() or p.suffix == ".gguf":
        checkpoint(p)  # a clear error if it is neither a checkpoint folder nor an existing .gguf file
        if "path" in (backbone or {}):
            raise LamraError(f"{p} is a model folder, its own backbone: a backbone path applies to a fit checkpoint")
        found = read_settings(p) if p.is_dir() else None
        cls, args = kind or EmbeddingModule, {}
        if found is not None:
            where = f"settings {found.path}"
            check_class_paths({"class_path": found.class_path, "init_args": found.init_args}, where, found.path.name)
        if found is not None and issubclass(module_class(found.class_path, where), kind or TrainingModule):
            cls = module_class(found.class_path, where)
            args = migrate(
                cls, {"backbone": str(p), **found.init_args} if "backbone" not in found.init_args else found.init_args
            )
        stored = args.get("backbone", {}) if isinstance(args.get("backbone"), dict) else {}
        if found is not None:
            _check_file_values(stored, f"{found.path}: init_args.backbone")
        folder = {**stored, "path": str(p), **FOLDER, **overrides}
        if stored.get("trust_remote_code") is True and found is not None:
            refuse_remote_code(BackboneSpec(**folder), asked_by=f"{found.path}: init_args.backbone.trust_remote_code")
        if "lora" in args:
            args["lora"] = None
        given = _fitting(cls, module_overrides, p)
        if found is None:
            warn_defaults(p, cls, {**overrides, **given})
        built = build(cls, {**args, **given, "backbone": folder}, f"settings of {p}")
        built.configure_model()
        return built.eval()
    raise LamraError(f"model {str(path)!r} is neither a checkpoint file nor a checkpoint folder")


def _fitting(cls: type[TrainingModule], values: dict[str, Any], path: Path) -> dict[str, Any]:
    """The caller's module arguments, refused (one line) where `cls` has no such argument (a reranker's pooling)."""
    accepted = inspect.signature(cls).parameters
    for name in values:
        if name not in accepted:
            raise LamraError(f"{path} holds a {cls.__name__}, which has no {name!r} setting")
    return values


def warn_defaults(path: Path, cls: type[TrainingModule], given: dict[str, Any]) -> None:
    """One line naming each reading setting a folder without this project's settings file is read with by default:
    a released or off-the-shelf folder read with other positions, pixel bounds or pooling than it was trained with
    gives other numbers, with no error."""
    defaults = {"rope": "model", "min_pixels": "the processor's", "max_pixels": "the processor's"}
    defaults["system_prompt"] = "default"
    parameters = inspect.signature(cls).parameters
    # Not named: attention (a bidirectional folder says so in its config.json, and a causal read of it is refused).
    for name in ("pooling", "max_text_tokens"):
        if name in parameters:
            defaults[name] = parameters[name].default
    if given.get("pooling") in MEANS and "exclude_instruction" in parameters:  # a setting of the means only
        defaults["exclude_instruction"] = parameters["exclude_instruction"].default
    used = {name: value for name, value in defaults.items() if name not in given}
    if used:
        warnings.warn(
            f"{path} has no lamra-pl settings file ({SETTINGS_FILE}); read as {cls.__name__} with the defaults "
            + ", ".join(f"{name}={value}" for name, value in used.items())
            + ": give --settings.NAME (Python: settings=ModelSettings(...)) where the folder was trained otherwise",
            stacklevel=3,
        )


def stored_module(path: str | Path) -> tuple[type[TrainingModule], dict[str, Any]]:
    """(class, arguments) that a checkpoint or model folder records, read without building anything, as
    `load_module(path)` reads them: a checkpoint's hyperparameters (`read_checkpoint`); a folder's settings file, the
    folder itself its backbone; a folder without settings, or a .gguf file, an EmbeddingModule with its defaults.
    The arguments hold only what was recorded: a missing one is the class's default (`argument`)."""
    p = Path(path)
    if p.is_file() and p.suffix != ".gguf":
        cls, args, _ = read_checkpoint(p)
        return cls, args
    checkpoint(p)  # a clear error if it is neither a checkpoint folder nor an existing .gguf file
    found = read_settings(p) if p.is_dir() else None
    if found is None:
        return EmbeddingModule, {"backbone": {"path": str(p)}}
    where = f"settings {found.path}"
    check_class_paths({"class_path": found.class_path, "init_args": found.init_args}, where, found.path.name)
    cls = module_class(found.class_path, where)
    args = migrate(
        cls, {"backbone": str(p), **found.init_args} if "backbone" not in found.init_args else found.init_args
    )
    stored = args.get("backbone") if isinstance(args.get("backbone"), dict) else {}
    return cls, {**args, "backbone": {**stored, "path": str(p)}}


def argument(cls: type[TrainingModule], args: dict[str, Any], name: str) -> Any:
    """The value of `cls`'s argument `name` in recorded `args`, or the class's default where none was recorded."""
    if name in args:
        return args[name]
    return inspect.signature(cls).parameters[name].default


def caller_settings(
    backbone: str | None = None, trust_remote_code: bool = False, settings: ModelSettings | None = None
) -> dict[str, Any]:
    """`load_module`'s backbone overrides from a tool's or the API's arguments: a backbone path for a checkpoint
    whose backbone is elsewhere now, the user's trust in a backbone folder's own code, and the backbone's part of
    the user's `ModelSettings` (the module's part goes as `module=settings.module_args()`)."""
    given = settings.backbone_args() if settings is not None else {}
    return {**({"path": backbone} if backbone is not None else {}), "trust_remote_code": trust_remote_code, **given}


def load_retriever(
    path: str | Path, backbone: dict[str, Any] | None = None, module: dict[str, Any] | None = None
) -> ContrastiveSteps:
    """A retriever in eval mode: a `fit` checkpoint (an EmbeddingModule's or a CLIPModule's) or a model folder.
    `backbone`, `module`: the caller's overrides (`caller_settings`, `ModelSettings.module_args`)."""
    module = load_module(path, kind=EmbeddingModule, backbone=backbone, module=module)
    if not isinstance(module, ContrastiveSteps):
        raise LamraError(f"{path} holds a {type(module).__name__}, not a retriever")
    return module


def load_reranker(
    path: str | Path,
    judge: JudgePrompt | None = None,
    backbone: dict[str, Any] | None = None,
    module: dict[str, Any] | None = None,
) -> RerankModule:
    """A reranker in eval mode from a `fit` checkpoint or a model folder (a merged reranker, released LamRA-Rank
    weights, or an off-the-shelf instruct model for zero-shot reranking, which may also be a text-only causal LM's
    .gguf file). With `judge`, an off-the-shelf model scores with that zero-shot yes/no question (MM-Embed).
    `backbone`, `module`: the caller's overrides (`caller_settings`, `ModelSettings.module_args`)."""
    p = Path(path)
    if judge is not None and not (p.is_dir() or p.suffix == ".gguf"):
        raise LamraError(
            f"zero-shot reranking takes an off-the-shelf model's checkpoint folder (or .gguf file); {str(path)!r} is "
            "neither"
        )
    module = load_module(p, kind=RerankModule, backbone=backbone, module=module)
    if not isinstance(module, RerankModule):
        raise LamraError(f"{path} holds a {type(module).__name__}, not a reranker")
    if judge is not None:
        module.use_judge(judge)
    return module


def module_arguments(module: TrainingModule) -> dict[str, Any]:
    """The module's own arguments, as its hyperparameters hold them (typed groups as mappings)."""
    return migrate(type(module), {k: v for k, v in module.hparams.items()})


def save_merged(module: EmbeddingModule | RerankModule, out: str | Path, dtype: torch.dtype) -> Path:
    """Write `module` as a model folder: its LoRA adapter merged into the base weights (or its trained weights
    written over them), saved in `dtype`; its processor; the settings file; trained pooling weights."""
    merged = module.model.merge_and_unload() if module.backbone.lora is not None else module.model
    out_dir = Path(out)
    merged.to(dtype).save_pretrained(out_dir)
    module.processor.save_pretrained(out_dir)
    args = module_arguments(module)
    args.pop("lora", None)  # merged
    args["backbone"] = {k: v for k, v in asdict(module.backbone.spec).items() if k != "path" and k not in FOLDER}
    write_settings(out_dir, class_path_of(type(module)), json.loads(json.dumps(args)))
    latent_pool = getattr(module, "latent_pool", None)
    if latent_pool is not None:  # trained latent-attention pooling: not part of the HF model
        latent_pool.save(out_dir)
    return out_dir
