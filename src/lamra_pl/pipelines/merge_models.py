"""`lamra-pl merge-models`: several fits' weights -> one model folder, by weighted averaging or task arithmetic.

LoRA souping (RzenEmbed) and Qwen3-VL-Embedding's merge of the embedder before and after distillation: the inputs
are `fit` checkpoints (a LoRA adapter, or fully fine-tuned weights) and model folders (`lamra-pl merge`'s, or this
tool's), in any mix; the output is a model folder as `merge` writes it, so index, retrieve, search, rerank, export,
the Python API and `fit` (`backbone.path`) read it.

The arithmetic, per tensor, in float32 (each input loaded in float32, its adapter merged into its base weights as
`merge` does; ties of tensors kept):

    average           theta = sum_i w_i theta_i             weights sum to 1 (default: 1/n each)
    task_arithmetic   theta = base + sum_i w_i (theta_i - base)     (default: 1 each)

Both are computed as r + sum_i w_i (theta_i - r), with r the first model (average) or the base (task arithmetic), so a
tensor no input changed is r's, bit for bit, and two copies of one model average to that model exactly.

LoRA (`--lora`): `delta` (the default) combines the merged weights, W + s B_i A_i, so the adapters combine as their
weight deltas, s * sum_i w_i B_i A_i: exact and linear in the weights, whatever the adapters' ranks. `factors`
(average only, every input a checkpoint with the same LoRA r, alpha and targets) averages the adapters' A and B
tensors separately, then merges the one averaged adapter, W + s (sum_i w_i B_i)(sum_i w_i A_i), as LoRA-soup
recipes average adapter weights; it is not the average of the deltas (their cross terms differ), which is why it is
not the default.

Every tensor of the module is combined, not only the language model's: a trained vision tower, projector or LM head
(in a fully fine-tuned or `train_*` checkpoint), latent-attention pooling weights (whose base, for task arithmetic,
is the base folder's pooling file; a base without one is refused), and the retriever's temperature (fixed or
learned), combined as its log scale and recorded as the folder's `temperature` setting (`learnable_temperature` if
any input learned it); it changes no embedding, only a later fit's validation loss. The other training settings
(optimizer, schedule, loss weights) are the first model's.

What must agree, checked before anything loads (one line naming the file and the key where not): the module class
(retriever with retriever, reranker with reranker; CLIP checkpoints hold no model folder and are refused), every
setting that changes what the weights compute (positions, pixel bounds, pooling, text cut, instructions, ...; not
the training ones), and the backbone's architecture (config.json, vocabulary size aside); then, as each model loads,
every tensor's name and shape, and the tokenizer (its length and chat template). The tensors' values are not
compared: models fine-tuned from different bases of the same shape merge, and average to whatever that gives.

OUT is written whole or not at all (a temporary folder beside it, renamed at the end, as `export` does) and must be
new or empty. Beside `merge`'s files it holds RECORD_FILE, how it was made: the models, the weights, the method, the
base.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import torch

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_folder, atomic_write
from lamra_pl.formats.settings import POOLING_FILE
from lamra_pl.models.backbone import BackboneSpec, chat_template_of, checkpoint
from lamra_pl.models.base import TrainingModule
from lamra_pl.models.checkpoints import (
    FOLDER,
    argument,
    build,
    caller_settings,
    load_module,
    save_merged,
    stored_module,
)
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.contrastive import ContrastiveSteps
from lamra_pl.pipelines.merge import base_dtype
from lamra_pl.progress import progress

Method = Literal["average", "task_arithmetic"]
LoraMerge = Literal["delta", "factors"]
RECORD_FILE = "merge_models.json"
RECORD_FORMAT, RECORD_VERSION = "lamra-pl-merge-models", 1
# The module's and the backbone's arguments that say how a model trains, not what its weights compute: inputs may
# differ in them. Every other setting (rope, pixel bounds, pooling, max_text_tokens, instructions, and any added
# later) must agree. ("loss" and "distill": the loss options and distillation of later versions.)
TRAINING_ONLY = {
    "lora",
    "temperature",
    "learnable_temperature",
    "gradcache",
    "optimizer",
    "schedule",
    "pointwise_weight",
    "listwise_weight",
    "loss_reduction",
    "labels",
    "loss",
    "distill",
}
# (padding_side: embeddings and scores are the same under either, tests/test_embedding.py and test_rerank.py.)
BACKBONE_TRAINING_ONLY = {
    "path",
    "dtype",
    "attn_implementation",
    "gradient_checkpointing",
    "trust_remote_code",
    "padding_side",
    "train_vision_tower",
    "train_projector",
    "train_lm_head",
}
# Keys of config.json that do not shape the weights (or, vocab_size, that the loaded model's embedding shape checks).
CONFIG_NOT_COMPARED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "vocab_size"}
TEMPERATURE = "log_logit_scale"  # a retriever's temperature, combined as its log scale
SUM_TOLERANCE = 1e-6


def merge_models(
    models: list[str],
    out: str,
    weights: list[float] | None = None,
    method: Method = "average",
    base: str | None = None,
    lora: LoraMerge = "delta",
    backbone: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Merge several fits into one model folder: a weighted average, or task arithmetic, of their weights.

    `--method average` (the default) writes sum_i w_i theta_i, the weights summing to 1 (default: equal). `--method
    task_arithmetic` writes base + sum_i w_i (theta_i - base) (default weights: 1 each); the base defaults to the
    backbone the checkpoints were trained on. Adapters combine as their merged weight deltas (`--lora delta`, exact
    and linear), or, `--lora factors`, as the average of their A and B tensors (LoRA souping; average only). Every
    trained tensor is combined (vision tower, projector, LM head, latent-attention pooling, the temperature). The
    models must share the module class, the settings that change what the weights compute, and the backbone's shapes;
    each mismatch is refused, naming the file and the key. OUT is a model folder, as `lamra-pl merge` writes.

    Args:
        models: the fits to merge: `lamra-pl fit` checkpoints (.ckpt) and model folders (`lamra-pl merge`'s), in any
            mix, e.g. '[runs/a/checkpoints/last.ckpt, runs/b/checkpoints/last.ckpt]'.
        out: output folder (model, processor, chat template, settings, merge_models.json); new or empty.
        weights: one weight per model, in order (average: they sum to 1; default: 1/n each; task_arithmetic: any
            values; default: 1 each).
        method: "average" or "task_arithmetic".
        base: task arithmetic's base: a model folder (the backbone the checkpoints trained on, or a merged folder);
            default: the checkpoints' backbone, when they all name the same one.
        lora: how LoRA adapters combine: "delta" (their merged weight deltas) or "factors" (their A and B tensors
            averaged separately, then merged).
        backbone: the backbone folder of the checkpoints, when it is no longer where they say.
        trust_remote_code: run code the backbone folders ship (a file never turns this on).
    """
    paths = [Path(m) for m in models]
    if not paths:
        raise LamraError("merge-models --models is empty: give the checkpoints or model folders to merge")
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LamraError(f"merge-models --out {out} exists and is not an empty folder: give a new folder")
    for path in paths:
        if not path.exists():
            raise LamraError(f"model {str(path)!r} does not exist: give a `lamra-pl fit` checkpoint or a model folder")
    w = _weights(weights, len(paths), method)
    stored = [Stored(path, backbone) for path in paths]
    cls = _check_alike(stored)
    if lora == "factors":
        _check_factors(stored, method)
    base_path = _base(stored, base, method)
    base_config = checkpoint(base_path).config() if base_path is not None else None
    if base_config is not None:
        _check_configs(stored[0], base_config, str(base_path))

    settings = caller_settings(None, trust_remote_code)
    with progress(total=len(paths), desc="merge-models", unit="models") as bar:
        if method == "task_arithmetic":
            assert base_path is not None
            reference = _base_module(cls, stored[0], base_path, settings)
            where, inputs = str(base_path), list(zip(stored, w, strict=True))
        else:
            reference = _load(stored[0], backbone, settings, lora)
            bar.update(1)
            where, inputs = str(stored[0].path), list(zip(stored[1:], w[1:], strict=True))
        own = _tensors(reference)
        sums: dict[str, torch.Tensor] = {}
        for model, weight in inputs:
            module = _load(model, backbone, settings, lora)
            _check_processor(module, reference, model.path, where)
            _accumulate(sums, _tensors(module), own, weight, model.path, where)
            del module
            bar.update(1)
    temperature = _apply(reference, own, sums)

    # The folder records the first model's settings, with the combined temperature.
    if isinstance(reference, ContrastiveSteps) and temperature is not None:
        reference.hparams["temperature"] = temperature
        reference.hparams["learnable_temperature"] = any(s.setting("learnable_temperature") for s in stored)
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "method": method,
        "lora": lora,
        "models": [str(p) for p in paths],
        "weights": w,
        "base": None if base_path is None else str(base_path),
    }
    dtype = base_dtype(stored[0].base_path)
    with atomic_folder(out_dir) as staged:
        save_merged(reference, staged, dtype)
        atomic_write(staged / RECORD_FILE, json.dumps(record, indent=1))
    print(f"merged model ({method} of {len(paths)}, weights {w}) written to {out_dir}")
    return out_dir


def _weights(weights: list[float] | None, n: int, method: Method) -> list[float]:
    """The weights given, checked, or the method's default."""
    if weights is None:
        return [1.0 / n] * n if method == "average" else [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise LamraError(f"merge-models --weights has {len(w)} values for {n} models: give one per model")
    if not all(math.isfinite(x) for x in w):
        raise LamraError(f"merge-models --weights {w}: every weight must be a finite number")
    if method == "average" and abs(sum(w) - 1.0) > SUM_TOLERANCE:
        raise LamraError(
            f"merge-models --weights {w} sum to {sum(w):g}: an average's weights sum to 1 (for other sums, "
            "--method task_arithmetic with a --base)"
        )
    return w


class Stored:
    """What a model records, read before anything is built (`stored_module`), and its backbone's config.json."""

    def __init__(self, path: Path, backbone: str | None) -> None:
        self.path = path
        self.cls, self.args = stored_module(path)
        self.is_checkpoint = path.is_file() and path.suffix != ".gguf"
        spec = self.args.get("backbone") if isinstance(self.args.get("backbone"), dict) else {}
        self.backbone: dict[str, Any] = spec
        self.base_path = str(backbone) if backbone is not None and self.is_checkpoint else str(spec.get("path", path))

    def config(self) -> dict[str, Any]:
        return checkpoint(self.base_path).config()

    def setting(self, name: str) -> Any:
        return argument(self.cls, self.args, name)

    def backbone_setting(self, name: str) -> Any:
        default = next(f.default for f in fields(BackboneSpec) if f.name == name)
        return self.backbone.get(name, default)


def _check_alike(stored: list[Stored]) -> type[TrainingModule]:
    """The models' common class, after checking that they are alike: class, reading settings, architecture."""
    first = stored[0]
    for model in stored:
        if issubclass(model.cls, CLIPModule):
            raise LamraError(
                f"{model.path} is a CLIPModule checkpoint: merge-models writes model folders of LMM retrievers and "
                "rerankers, which CLIP checkpoints have no form of"
            )
        if model.cls is not first.cls:
            raise LamraError(
                f"{model.path} holds a {model.cls.__name__}, {first.path} a {first.cls.__name__}: merge models of "
                "one kind"
            )
    names = [n for n in inspect.signature(first.cls).parameters if n not in TRAINING_ONLY and n != "backbone"]
    spec_names = [f.name for f in fields(BackboneSpec) if f.name not in BACKBONE_TRAINING_ONLY]
    for model in stored[1:]:
        for name in names:
            if model.setting(name) != first.setting(name):
                raise LamraError(
                    f"{model.path}: {name} is {model.setting(name)!r}, {first.path} has {first.setting(name)!r}: "
                    "merged models must read their inputs alike"
                )
        for name in spec_names:
            if model.backbone_setting(name) != first.backbone_setting(name):
                raise LamraError(
                    f"{model.path}: backbone.{name} is {model.backbone_setting(name)!r}, {first.path} has "
                    f"{first.backbone_setting(name)!r}: merged models must read their inputs alike"
                )
        _check_configs(first, model.config(), str(model.path))
    return first.cls


def _check_configs(first: Stored, config: dict[str, Any], where: str) -> None:
    """Refuse a backbone config.json that differs from the first model's in a key that shapes the weights."""
    difference = _config_difference(first.config(), config)
    if difference is not None:
        key, mine, theirs = difference
        raise LamraError(
            f"{where}: the backbone's config.json {key} is {theirs!r}, {first.path}'s is {mine!r}: merged models must "
            "share the base model's architecture"
        )


def _config_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first (key, a's value, b's value) where two config mappings differ, ignoring CONFIG_NOT_COMPARED."""
    if isinstance(a, dict) and isinstance(b, dict):
        for name in sorted(set(a) | set(b)):
            if name in CONFIG_NOT_COMPARED:
                continue
            found = _config_difference(a.get(name), b.get(name), f"{key}.{name}" if key else name)
            if found is not None:
                return found
        return None
    return None if a == b else (key, a, b)


def _check_factors(stored: list[Stored], method: Method) -> None:
    """`--lora factors` averages adapters of one shape: every model a checkpoint with the same r, alpha, targets."""
    if method != "average":
        raise LamraError(
            "merge-models --lora factors averages adapters' A and B tensors, which is no sum of weight deltas: "
            "task arithmetic takes --lora delta"
        )
    first = stored[0]
    for model in stored:
        if not model.is_checkpoint or not isinstance(model.args.get("lora"), dict):
            raise LamraError(
                f"{model.path} holds no LoRA adapter (a model folder, or lora: null): --lora factors averages "
                "adapters; --lora delta merges any weights"
            )
        for name in ("r", "alpha", "targets"):
            if model.args["lora"].get(name) != first.args["lora"].get(name):
                raise LamraError(
                    f"{model.path}: hyper_parameters.lora.{name} is {model.args['lora'].get(name)!r}, {first.path} "
                    f"has {first.args['lora'].get(name)!r}: --lora factors averages adapters of one shape (--lora "
                    "delta merges any)"
                )


def _base(stored: list[Stored], base: str | None, method: Method) -> Path | None:
    """Task arithmetic's base folder: the one given, or the backbone every checkpoint names. None for an average."""
    if method == "average":
        if base is not None:
            raise LamraError("merge-models --base is task arithmetic's: an average has none (--method task_arithmetic)")
        return None
    if base is None:
        named = {s.base_path for s in stored if s.is_checkpoint}
        if len(named) != 1 or not all(s.is_checkpoint for s in stored):
            raise LamraError(
                "merge-models --method task_arithmetic needs --base (the model folder the fits started from): "
                + (
                    "the checkpoints name different backbones"
                    if len(named) > 1
                    else "a model folder records no base of its own"
                )
            )
        base = named.pop()
    path = Path(base)
    if not path.is_dir():
        raise LamraError(
            f"merge-models --base {base}: not a model folder (a checkpoint becomes one with `lamra-pl merge`)"
        )
    if _latent(stored[0]) and not (path / POOLING_FILE).is_file():
        raise LamraError(
            f"merge-models --base {base} has no {POOLING_FILE}: the models' latent-attention pooling weights have no "
            "base to take task vectors from (give a merged folder that has them, or --method average)"
        )
    return path


def _latent(model: Stored) -> bool:
    return "pooling" in inspect.signature(model.cls).parameters and model.setting("pooling") == "latent_attention"


def _load(model: Stored, backbone: str | None, settings: dict[str, Any], lora: LoraMerge) -> TrainingModule:
    """A model in float32, in eval mode; its LoRA adapter merged into its weights unless `lora` is "factors"."""
    overrides = {"dtype": "float32", **settings, **({"path": backbone} if backbone and model.is_checkpoint else {})}
    module = load_module(model.path, backbone=overrides)
    if lora == "delta" and module.backbone.lora is not None:
        with torch.no_grad():
            module.model = module.model.merge_and_unload()  # float32: the merge `lamra-pl merge` does
        module.backbone.lora = None
    return module


def _base_module(cls: type[TrainingModule], first: Stored, base: Path, settings: dict[str, Any]) -> TrainingModule:
    """The base as a module of the models' class and settings (the first model's), in float32, no adapter."""
    args = {k: v for k, v in first.args.items() if k != "lora"}
    args["backbone"] = {**first.backbone, "path": str(base), **FOLDER, "dtype": "float32", **settings}
    module = build(cls, args, f"merge-models --base {base}")
    module.configure_model()
    return module.eval()


def _tensors(module: TrainingModule) -> dict[str, torch.Tensor]:
    """Every tensor of the module's state, each once (a tied tensor under its first name), and a retriever's
    temperature as its log scale (TEMPERATURE), fixed or learned."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen or name == TEMPERATURE:
            continue
        seen.add(id(tensor))
        found[name] = tensor
    if isinstance(module, ContrastiveSteps):
        found[TEMPERATURE] = module.log_logit_scale.detach().float()
    return found


@torch.no_grad()
def _accumulate(
    sums: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor],
    weight: float,
    path: Path,
    where: str,
) -> None:
    """sums += weight * (theirs - own), tensor by tensor (zero differences are not stored); a tensor that is not in
    both, or of another shape, is refused naming the key."""
    missing = sorted(set(own) - set(theirs))
    extra = sorted(set(theirs) - set(own))
    if missing or extra:
        key, side = (missing[0], "lacks") if missing else (extra[0], "has")
        raise LamraError(
            f"{path} {side} the tensor {key} ({len(missing)} missing, {len(extra)} more than {where}): merged models "
            "must share the base model's architecture"
        )
    for name, mine in own.items():
        other = theirs[name]
        if other.shape != mine.shape:
            raise LamraError(
                f"{path}: tensor {name} has shape {tuple(other.shape)}, {where}'s {tuple(mine.shape)}: merged models "
                "must share the base model's architecture"
            )
        if not mine.is_floating_point():
            if not torch.equal(other, mine):
                raise LamraError(f"{path}: tensor {name} ({other.dtype}) differs from {where}'s: it cannot be averaged")
            continue
        difference = other.float() - mine.float()
        if difference.any():
            if name in sums:
                sums[name].add_(difference, alpha=weight)
            else:
                sums[name] = difference.mul_(weight)


@torch.no_grad()
def _apply(reference: TrainingModule, own: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> float | None:
    """Add the sums into the reference module's own tensors, in place; the combined temperature (None: the module
    has none)."""
    log_scale = own.pop(TEMPERATURE, None)
    for name, total in sums.items():
        if name != TEMPERATURE:
            own[name].add_(total.to(own[name].dtype))
    if log_scale is None or TEMPERATURE not in sums:  # none differs: the recorded temperature stays as it is
        return None
    combined = float(log_scale) + float(sums[TEMPERATURE])
    return math.exp(-combined)


def _check_processor(module: TrainingModule, reference: TrainingModule, path: Path, where: str) -> None:
    """Refuse a model whose tokenizer or chat template is not the reference's: the same weights would read other
    inputs."""
    mine, theirs = reference.processor, module.processor
    if len(theirs.tokenizer) != len(mine.tokenizer):
        raise LamraError(
            f"{path}: its tokenizer has {len(theirs.tokenizer)} tokens, {where}'s {len(mine.tokenizer)}: merged "
            "models must share the base model's tokenizer"
        )
    if chat_template_of(theirs) != chat_template_of(mine):
        raise LamraError(f"{path}: its chat template differs from {where}'s: merged models must share it")
