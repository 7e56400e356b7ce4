"""The LMM backbone as a component of a module: which checkpoint and how it trains (`BackboneSpec`), loading it and
its processor by path, `<emb>`, LoRA, freezing, positions and last-layer states (`Backbone`).

This is the one place that touches `from_pretrained`. Image-text-to-text architectures differ only in where
their parts live, which `FAMILIES` records by qualified module name; supporting another one means adding an entry
there. Any other checkpoint whose `model_type` has a causal-LM class (Llama, Mistral, Qwen2, Gemma, ...) loads as
a text-only backbone: `AutoModelForCausalLM` and its tokenizer, behind `TextProcessor` so the collators need not
know (they fail clearly on an image).

`BackboneSpec.attention: bidirectional` removes the causal mask of the language model (U-MARVEL's BiLamRA,
NV-Embed's and MM-Embed's bidirectional decoder) through transformers' own switch, the text config's `is_causal`:
transformers (5.x) reads it in every decoder's mask construction (`masking_utils.create_causal_mask` builds a
bidirectional mask with the padding mask) and its model forwards hand it to the attention functions as `is_causal`
(`utils.generic.merge_with_config_defaults`), so eager, sdpa and flash attention all attend both ways, padded or
not. `save_pretrained` writes it into config.json, so a merged folder carries it to any transformers loader.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchEncoding,
    BatchFeature,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.utils import is_gguf_available

from lamra_pl.errors import LamraError
from lamra_pl.formats import read_json
from lamra_pl.models.video import VIDEO_BUDGET_ATTRIBUTE, VideoBudget

EMB_TOKEN = "<emb>"

DType = Literal["auto", "float32", "bfloat16", "float16"]
Rope = Literal["model", "1d"]
Attention = Literal["causal", "bidirectional"]
# Keys of a collated batch that are for pooling, not inputs of the model (`Backbone.hidden_states` drops them).
POOLING_KEYS = ("instruction_mask",)


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its parts, as qualified names inside the `from_pretrained` model (None: it has
    no such part; the projector may be several modules), and whether its image processor takes
    `min_pixels`/`max_pixels` (Qwen2-VL's dynamic resolution; LLaVA-Next's tiles have the vision tower's fixed
    size)."""

    language_model: str
    vision_tower: str | None
    projector: str | tuple[str, ...] | None
    pixel_bounds: bool = False

    @property
    def text_only(self) -> bool:
        return self.vision_tower is None

    @property
    def projectors(self) -> tuple[str, ...]:
        return (self.projector,) if isinstance(self.projector, str) else self.projector or ()


# Qwen2-VL's layout, which its successors keep: the vision tower's merger projects into the language model.
QWEN_VL = Family("model.language_model", "model.visual", "model.visual.merger", pixel_bounds=True)
FAMILIES: dict[str, Family] = {
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
    # DeepStack: besides the merger, one merger per tapped vision layer feeds an early decoder layer.
    "qwen3_vl": replace(QWEN_VL, projector=("model.visual.merger", "model.visual.deepstack_merger_list")),
    # Qwen3.5 (dense) is natively multimodal: Qwen3-VL's vision tower and processor before a hybrid decoder
    # (Gated DeltaNet and full attention), no DeepStack.
    "qwen3_5": QWEN_VL,
    "llava_next": Family("model.language_model", "model.vision_tower", "model.multi_modal_projector"),
}
# A causal LM keeps its decoder at its `base_model_prefix` ("model" for most, GPT-2's "transformer"): `model_family`
# reads it from the loaded model.
TEXT_ONLY = Family("model", None, None)


@dataclass
class LoraSpec:
    """LoRA on the language model's linear layers (never the vision tower, projector or LM head).

    Args:
        r: the rank of each adapter (LamRA: 64 in stage 1, 128 in stage 2).
        alpha: the adapters' scale numerator: an adapter's update is scaled by alpha / r (LamRA: 2 * r).
        dropout: dropout on each adapter's input, in training.
        targets: names of the language model's linear layers that get an adapter (a layer of the same name in the
            vision tower gets none).
    """

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise LamraError(f"lora.r and lora.alpha must be positive, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LamraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LamraError("lora.targets is empty: name at least one linear layer, e.g. q_proj")


@dataclass
class BackboneSpec:
    """Which checkpoint a module is built on, and how it is loaded and trained (`model.backbone` in a config).

    Args:
        path: local directory of a Hugging Face checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, LLaVA-Next, or
            any text-only causal LM), or a text-only causal LM's .gguf file; never downloaded.
        rope: "model" uses the backbone's own positions (mRoPE for the Qwen-VL families' images, as `generate`
            does); "1d" reproduces the LamRA reference, which ran the decoder with plain sequential positions. Both
            count positions over non-padding tokens, so padding never moves them.
        dtype: weight dtype of the base model ("auto": the checkpoint's). LoRA weights stay float32.
        attn_implementation: the transformers attention implementation ("sdpa", "eager", "flash_attention_2").
        gradient_checkpointing: non-reentrant activation checkpointing in the decoder.
        trust_remote_code: let transformers run code shipped with the checkpoint (off unless you set it).
        min_pixels: the fewest pixels an image is resized to, given to the processor (the Qwen-VL families'
            dynamic resolution; LamRA: 4*28*28).
        max_pixels: the most pixels an image is resized to, given to the processor (the Qwen-VL families'
            dynamic resolution; LamRA: 300*28*28).
        padding_side: override the tokenizer's padding side.
        system_prompt: the system turn of every chat the model reads: "default" (the chat template's own, as
            LamRA: Qwen2-VL's "You are a helpful assistant."; none where the template writes none), "none" (no
            system turn, even where the template writes a default one), or any other text (a system turn with it).
        train_vision_tower: unfreeze the vision tower (frozen by default, as in LamRA); the projector stays frozen
            unless train_projector.
        train_projector: unfreeze the projector between the vision tower and the language model (frozen by
            default, as in LamRA).
        train_lm_head: unfreeze the LM head (a tied head is the input embedding matrix, so training it trains both);
            only the reranker reads it.
        video_fps: sample a video at this many frames per second (when its frame rate is known), at most
            video_max_frames; None (LamRA): video_max_frames frames spread evenly (`lamra_pl.models.video`).
        video_max_frames: the most frames of a video the model reads (None: LamRA's 12 for the retriever, 8 for the
            reranker).
        video_min_pixels: the fewest pixels a video frame is resized to (None: the video processor's, Qwen2-VL's
            128*28*28).
        video_max_pixels: the most pixels a video frame is resized to (None: the video processor's, 768*28*28).
        attention: "causal" (the checkpoint's own decoder) or "bidirectional": every token of the language model
            attends to every real token, later ones included (U-MARVEL, NV-Embed, MM-Embed); the vision tower is
            unchanged. Set through the text config's `is_causal` (transformers' switch), which a merged folder's
            config.json keeps. Qwen3.5's linear-attention (Gated DeltaNet) layers are a left-to-right recurrence
            that no mask changes: there only the full-attention layers attend both ways. Retrievers only: a
            reranker reads the next token, which needs the causal decoder.
    """

    path: str
    rope: Rope = "model"
    dtype: DType = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None
    padding_side: Literal["left", "right"] | None = None
    system_prompt: str = "default"
    train_vision_tower: bool = False
    train_projector: bool = False
    train_lm_head: bool = False
    video_fps: float | None = None
    video_max_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None
    attention: Attention = "causal"

    def __post_init__(self) -> None:
        self.path = str(self.path)
        # The values a checkpoint or settings file can hand in without a parser's type check in between.
        sides = Literal["left", "right"]
        for name, allowed in (("rope", Rope), ("dtype", DType), ("padding_side", sides), ("attention", Attention)):
            value = getattr(self, name)
            if value is not None and value not in get_args(allowed):
                raise LamraError(f"backbone.{name} is {value!r}; use one of {list(get_args(allowed))}")

    @classmethod
    def of(cls, value: BackboneSpec | dict[str, Any]) -> BackboneSpec:
        """The spec itself, or one from its hyperparameters (a mapping of its fields)."""
        if isinstance(value, BackboneSpec):
            return value
        if not isinstance(value, dict) or "path" not in value:
            raise LamraError(f"model.backbone must be a mapping with at least a 'path', got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise LamraError(f"model.backbone has no settings {unknown}")
        return cls(**value)


@dataclass(frozen=True)
class Checkpoint:
    """Where a backbone's files are: a Hugging Face checkpoint folder, or a GGUF file (llama.cpp's format, which
    transformers reads for text-only causal LMs and dequantises) inside `folder`."""

    folder: Path
    gguf_file: str | None = None

    def load_kwargs(self, model: bool = False) -> dict[str, Any]:
        """What `from_pretrained(folder, ...)` needs besides the folder. A model's GGUF weights are unpacked to plain
        tensors: LoRA, training and `save_pretrained` need them so (transformers keeps packed blocks frozen)."""
        if self.gguf_file is None:
            return {}
        unpacked = {"quantization_config": GgufConfig(dequantize=True)} if model else {}
        return {"gguf_file": self.gguf_file, **unpacked}

    def config(self) -> dict[str, Any]:
        if self.gguf_file is None:
            return _json_file(self.folder / "config.json")
        return AutoConfig.from_pretrained(self.folder, gguf_file=self.gguf_file).to_dict()

    def remote_code(self) -> str | None:
        """The first file of the folder that names code of its own for transformers to run (an `auto_map`), or
        None. A folder is data: its code runs only when the user's command line or YAML sets trust_remote_code."""
        if self.gguf_file is not None:
            return None
        for name in REMOTE_CODE_FILES:
            path = self.folder / name
            if path.is_file() and "auto_map" in _json_file(path):
                return name
        return None


# Where a Hugging Face folder can name classes to import from its own .py files.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _json_file(path: Path) -> dict[str, Any]:
    data = read_json(path, "a Hugging Face settings file")
    if not isinstance(data, dict):
        raise LamraError(f"{path}: expected a JSON object")
    return data


def refuse_remote_code(spec: BackboneSpec, asked_by: str) -> None:
    """A one-line refusal when a file (`asked_by`, a checkpoint's or a settings file's key) asked for
    trust_remote_code, which is never taken from a file, and the backbone folder names code of its own that the
    user has not trusted: loaded without that code, it would not be the model the file describes.

    (A folder naming code that no file asks for loads as transformers' own class: without trust_remote_code,
    transformers never imports a folder's code.)"""
    if spec.trust_remote_code:
        return
    ckpt = checkpoint(spec.path)
    named = ckpt.remote_code()
    if named is None:
        return
    raise LamraError(
        f"{asked_by} is true and {ckpt.folder / named} names code of its own (auto_map): lamra-pl runs it only "
        "when you set trust_remote_code yourself (--model.init_args.backbone.trust_remote_code true in fit, "
        "--trust_remote_code true in the tools); a file cannot"
    )


def checkpoint(path: str | Path) -> Checkpoint:
    """The backbone at `path` (a checkpoint folder or a .gguf file), or a clear error if it is neither."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LamraError(f"backbone GGUF file {str(path)!r} does not exist")
        if not is_gguf_available():
            raise LamraError(f"backbone {str(path)!r} is a GGUF file, which needs the gguf package: pip install gguf")
        return Checkpoint(p.parent, p.name)
    if not p.is_dir():
        raise LamraError(
            f"backbone path {str(path)!r} does not exist or is not a directory. Give the local directory of a "
            "Hugging Face checkpoint (config.json + weights + processor files) or a .gguf file; nothing is "
            "downloaded. For a tiny test backbone run: lamra-pl tiny-backbone --out DIR"
        )
    if not (p / "config.json").is_file():
        raise LamraError(f"backbone path {str(p)!r} has no config.json: it is not a Hugging Face checkpoint")
    return Checkpoint(p)


def model_type(path: str | Path) -> str:
    kind = checkpoint(path).config().get("model_type")
    family_of(kind, where=f"{path} (config)")
    return kind


def family_of(kind: str | None, where: str = "the backbone") -> Family:
    """The family of a `model_type`: a known image-text-to-text one, or any text-only causal LM."""
    if kind in FAMILIES:
        return FAMILIES[kind]
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return TEXT_ONLY
    raise LamraError(
        f"{where}: model_type {kind!r} is not supported; supported: {sorted(FAMILIES)} and any text-only causal LM "
        "(a model_type with an AutoModelForCausalLM class, e.g. llama, mistral, qwen2)"
    )


def model_family(model: PreTrainedModel) -> Family:
    """The family of a loaded transformers model, a causal LM's decoder found at its `base_model_prefix`."""
    family = family_of(model.config.model_type)
    return replace(family, language_model=model.base_model_prefix) if family.text_only else family


class TextProcessor:
    """A text-only backbone's tokenizer behind the part of the processor interface the collators use.

    Chats are flattened to string content (the text parts joined, as Qwen2-VL's template joins them), which every
    text model's chat template accepts; an image is a clear error rather than a silently dropped input.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name

    def apply_chat_template(self, conversations: list[list[dict[str, Any]]], **kwargs: Any) -> Any:
        flat = [[{"role": m["role"], "content": self._text(m["content"])} for m in chat] for chat in conversations]
        return self.tokenizer.apply_chat_template(flat, **kwargs)

    def __call__(self, text: list[str], images: list[Any] | None = None, **kwargs: Any) -> BatchEncoding:
        if images:
            raise self._image_error()
        return self.tokenizer(text, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)

    def _text(self, content: str | list[dict[str, Any]]) -> str:
        if isinstance(content, str):
            return content
        if any(part.get("type") in ("image", "video") for part in content):
            raise self._image_error()
        return "".join(part["text"] for part in content)

    def _image_error(self) -> LamraError:
        return LamraError(
            f"backbone {self.name} is a text-only causal LM: it reads no images or videos, but an input holds one. "
            "Train and evaluate it on text-only data (the language-only stage, text tasks)"
        )


def chat_template_of(processor: ProcessorMixin | TextProcessor) -> str:
    """The chat template a processor (or a text-only backbone's tokenizer) renders with by default."""
    template = getattr(processor, "chat_template", None)
    if template is None:
        template = processor.tokenizer.chat_template
    if isinstance(template, dict):
        template = template["default"]
    return template


# The template variable that turns a thinking model's template (Qwen3.5's, Qwen3's) to its non-thinking form.
NO_THINKING = {"enable_thinking": False}


def render_chats(
    processor: ProcessorMixin | TextProcessor, chats: list[list[dict[str, Any]]], generation_prompt: bool
) -> list[str]:
    """The chats as the checkpoint's chat template writes them (special tokens included), in its non-thinking form.

    Every assistant turn here is a direct answer (`<emb>.`, Yes/No, "Ans: (k)"), scored where the generation prompt
    ends: a template that opens a thinking block there by default (Qwen3.5's) would put the scored position inside
    it. `enable_thinking` goes only to a template that reads it (a processor warns of a variable its template does
    not use)."""
    extra = NO_THINKING if "enable_thinking" in chat_template_of(processor) else {}
    system = getattr(processor, SYSTEM_PROMPT_ATTRIBUTE, "default")

    def render(chats: list[list[dict[str, Any]]]) -> list[str]:
        return processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=generation_prompt, **extra)

    if system == "default":
        return render(chats)
    if system != "none":
        return _render_or_refuse(processor, render, [[_system_turn(chat, system), *chat] for chat in chats])
    # No system turn: render with a marker system turn and cut that turn out (`_system_turn_wrappers`).
    rendered = _render_or_refuse(processor, render, [[_system_turn(chat, SYSTEM_MARKER), *chat] for chat in chats])
    wrappers = _system_turn_wrappers(processor, render)
    out = []
    for text in rendered:
        cut = next((p + SYSTEM_MARKER + q for p, q in wrappers if p + SYSTEM_MARKER + q in text), None)
        if cut is None or text.count(SYSTEM_MARKER) != 1:
            raise LamraError(f"{_template_owner(processor)}: system_prompt none: {NO_SYSTEM_TURN}")
        out.append(text.replace(cut, "", 1))
    return out


# The system prompt a backbone's chats are rendered with rides on its processor (`load_processor` sets it from
# `BackboneSpec.system_prompt`), so every collator and tool that renders through `render_chats` applies it.
SYSTEM_PROMPT_ATTRIBUTE = "lamra_system_prompt"
SYSTEM_MARKER, SECOND_MARKER = "\u2063lamra-system-a\u2063", "\u2063lamra-system-b\u2063"
NO_SYSTEM_TURN = "its chat template does not render a system turn that can be cut out; use 'default' or a text"


def _system_turn(chat: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """A system message in the form of the chat's own messages (content a string, or a list of parts)."""
    content = chat[0]["content"] if chat else ""
    return {"role": "system", "content": text if isinstance(content, str) else [{"type": "text", "text": text}]}


def _template_owner(processor: ProcessorMixin | TextProcessor) -> str:
    return str(getattr(processor, "name_or_path", None) or getattr(processor.tokenizer, "name_or_path", "the model"))


def _render_or_refuse(processor: ProcessorMixin | TextProcessor, render: Callable, chats: list) -> list[str]:
    try:
        return render(chats)
    except Exception as err:  # a template that raises on a system turn (jinja's TemplateError, ...)
        raise LamraError(f"{_template_owner(processor)}: its chat template refuses a system turn ({err})") from None


def _system_turn_wrappers(processor: ProcessorMixin | TextProcessor, render: Callable) -> list[tuple[str, str]]:
    """The text a chat template writes around a system message's content, as (before, after) pairs: a second
    system turn inserted into a chat is exactly that text around its content. The inserted span is found up to a
    shift across text repeated on its border, so every shift is returned; cutting any of them out of a chat (where
    it occurs around the marker) gives the same text."""
    user = {"role": "user", "content": [{"type": "text", "text": "x"}]}
    probe = [_system_turn([user], SYSTEM_MARKER), user]
    try:
        one, two = render([probe, [probe[0], _system_turn([user], SECOND_MARKER), user]])
    except Exception:  # a template that allows one system turn only
        raise LamraError(f"{_template_owner(processor)}: system_prompt none: {NO_SYSTEM_TURN}") from None
    length, at = len(two) - len(one), two.find(SECOND_MARKER)
    wrappers = []
    for start in range(max(0, at + len(SECOND_MARKER) - length), at + 1):
        if two[:start] + two[start + length :] == one:
            span = two[start : start + length]
            wrappers.append((span[: at - start], span[at - start + len(SECOND_MARKER) :]))
    return wrappers


def load_processor(spec: BackboneSpec, add_emb_token: bool = True) -> ProcessorMixin | TextProcessor:
    """The checkpoint's processor with `<emb>` added (unless `add_emb_token=False`: the reranker has no use for
    it); image resizing bounds and padding side as the spec says."""
    path, min_pixels, max_pixels, padding_side = spec.path, spec.min_pixels, spec.max_pixels, spec.padding_side
    trust_remote_code = spec.trust_remote_code
    ckpt = checkpoint(path)
    p = ckpt.folder
    kind = model_type(path)
    family = family_of(kind)
    if (min_pixels is not None or max_pixels is not None) and not family.pixel_bounds:
        raise LamraError(
            f"{p}: min_pixels/max_pixels apply to Qwen2-VL-style dynamic resolution only; {kind} images have the "
            "vision tower's fixed size. Leave them unset (null)"
        )
    processor: ProcessorMixin | TextProcessor
    if family.text_only:
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code, **ckpt.load_kwargs())
        processor = TextProcessor(tokenizer, str(path))
    else:
        processor = AutoProcessor.from_pretrained(p, trust_remote_code=trust_remote_code)
    tokenizer = processor.tokenizer
    if getattr(processor, "chat_template", None) is None and tokenizer.chat_template is None:
        raise LamraError(
            f"{path}: the checkpoint has no chat template, and every prompt here is a chat (LamRA's, LamRA-Rank's, the "
            "judge's). Use an instruct/chat checkpoint, or add a chat_template.jinja to the folder"
        )
    if add_emb_token and EMB_TOKEN not in tokenizer.get_vocab():
        # A normal added token (LamRA's choice): it is never a pooling position itself, so its row stays
        # untrained and is only a marker that the pooled position is the token before it.
        tokenizer.add_tokens([EMB_TOKEN])
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and (min_pixels is not None or max_pixels is not None):
        size = dict(image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        image_processor.size = size
    setattr(processor, SYSTEM_PROMPT_ATTRIBUTE, spec.system_prompt)  # read by render_chats
    # read by the collators (lamra_pl.models.video)
    budget = VideoBudget(spec.video_fps, spec.video_max_frames, spec.video_min_pixels, spec.video_max_pixels)
    setattr(processor, VIDEO_BUDGET_ATTRIBUTE, budget)
    return processor


@torch.no_grad()
def mean_new_rows(model: PreTrainedModel, old_rows: int) -> None:
    """Rows added by resizing = the mean of the existing rows, in the input and (untied) output embeddings.

    transformers draws them at random (`mean_resizing=True` samples around the mean), so each load would give
    `<emb>` another vector and, with `pooling: last_token`, another embedding; the mean makes every pooling a pure
    function of the saved base weights, and checkpoints and merged folders need not carry the row.
    """
    seen: set[int] = set()
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(layer, "weight", None)
        if weight is None or id(weight) in seen or weight.shape[0] <= old_rows:
            continue
        seen.add(id(weight))
        weight[old_rows:] = weight[:old_rows].float().mean(0).to(weight.dtype)


def load_backbone(spec: BackboneSpec, vocab_size: int, lora: LoraSpec | None = None) -> PreTrainedModel:
    """The model at `spec.path`, resized to `vocab_size` if needed, with LoRA (or full fine-tuning) and freezing.

    With `lora=None` the language model is fully trainable (what a randomly initialised backbone needs);
    otherwise only the adapters are. The vision tower, projector and LM head are frozen unless asked for (a tied
    LM head is the input embedding matrix, so training it trains both).
    """
    path, dtype = spec.path, spec.dtype
    train_vision_tower, train_projector = spec.train_vision_tower, spec.train_projector
    ckpt = checkpoint(path)
    family = family_of(model_type(path))
    if family.text_only and (train_vision_tower or train_projector):
        raise LamraError(f"{path} is a text-only causal LM: it has no vision tower or projector to train")
    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype)
    auto = AutoModelForCausalLM if family.text_only else AutoModelForImageTextToText
    model = auto.from_pretrained(
        ckpt.folder,
        dtype=torch_dtype,
        attn_implementation=spec.attn_implementation,
        trust_remote_code=spec.trust_remote_code,
        **ckpt.load_kwargs(model=True),
    )
    family = model_family(model)
    set_attention(model, spec.attention, where=str(path))
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        # Real Qwen2-VL checkpoints have spare rows, so `<emb>` fits without resizing; never shrink.
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        mean_new_rows(model, rows)
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    model.requires_grad_(False)
    if lora is None:
        _module(model, family.language_model).requires_grad_(True)
    if train_vision_tower:
        _module(model, family.vision_tower).requires_grad_(True)
        if not train_projector:
            for name in family.projectors:
                _module(model, name).requires_grad_(False)
    if train_projector:
        for name in family.projectors:
            _module(model, name).requires_grad_(True)
    if spec.train_lm_head:
        model.get_output_embeddings().requires_grad_(True)
    if lora is None:
        return model

    from peft import LoraConfig, get_peft_model

    # A regex (full match in peft) keeps LoRA inside the language model: a plain name list would also
    # match vision layers of the same name.
    scope = re.escape(family.language_model)
    names = "|".join(re.escape(t) for t in lora.targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        target_modules=rf"{scope}\..*\.({names})",
    )
    trainable_before = {n for n, q in model.named_parameters() if q.requires_grad}
    peft_model = get_peft_model(model, config)
    # get_peft_model freezes the base; re-open what the user asked to train besides the adapters.
    for name, param in peft_model.get_base_model().named_parameters():
        if name in trainable_before:
            param.requires_grad_(True)
    return peft_model


@torch.no_grad()
def set_attention(model: PreTrainedModel, attention: Attention, where: str) -> None:
    """Make the language model of a freshly loaded `model` attend as `attention` says (see the module docstring).

    "bidirectional" sets the text config's `is_causal` to False, then checks on three tokens that the first one's
    state now depends on the last: a causal LM whose transformers class builds its causal mask some other way, or a
    recurrent one (Mamba), would otherwise stay causal without a word; it is refused. "causal" leaves the model as
    loaded, and refuses a checkpoint whose config.json says `is_causal: false` (a bidirectional folder read as a
    causal one would give other states without an error)."""
    language_model = _module(model, model_family(model).language_model)
    config = language_model.config
    if attention == "causal":
        if getattr(config, "is_causal", True) is False:
            raise LamraError(
                f"{where}: its config.json sets is_causal: false (a bidirectional decoder, as lamra-pl writes a "
                "merged folder of backbone.attention: bidirectional), but backbone.attention is causal: set "
                "backbone.attention: bidirectional (--settings.attention bidirectional in the tools)"
            )
        return
    config.is_causal = False
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]], device=device)
    was_training = language_model.training
    language_model.eval()
    states = language_model(input_ids=ids, use_cache=False).last_hidden_state.float()
    language_model.train(was_training)
    if torch.equal(states[0, 0], states[1, 0]):
        del config.is_causal
        raise LamraError(
            f"{where}: {type(language_model).__name__} stays causal with is_causal false (its transformers class "
            "builds its causal mask another way, or it is recurrent): backbone.attention: bidirectional cannot "
            "apply to it; use causal"
        )


class Backbone:
    """An LMM backbone as a part of a LightningModule: its processor from the start, its model built on demand
    (`build`, from the module's `configure_model`), and its last-layer states under the spec's positions.

    `lora`: LoRA on the language model's linear layers; None for full fine-tuning of the language model. The module
    keeps the built model as its `model` attribute (so checkpoints name its tensors `model.*`); the methods here take
    it as an argument.
    """

    def __init__(self, spec: BackboneSpec, lora: LoraSpec | dict[str, Any] | None, add_emb_token: bool) -> None:
        self.spec = spec
        self.lora = LoraSpec(**lora) if isinstance(lora, dict) else lora  # a dict: from a checkpoint's hparams
        self.processor = load_processor(spec, add_emb_token=add_emb_token)

    def build(self, module: LightningModule) -> PreTrainedModel:
        """The model, with LoRA and freezing, in the module's training mode, and sharded when the module runs
        under FSDP2 (its `device_mesh`)."""
        model = load_backbone(self.spec, vocab_size=len(self.processor.tokenizer), lora=self.lora)
        # from_pretrained returns eval mode and Lightning does not call train(): without this, LoRA dropout and
        # activation checkpointing (both active only in training mode) would silently stay off during fit.
        model.train(module.training)
        if module.device_mesh is not None:  # FSDP2Strategy (ModelParallelStrategy): shard before the optimizer
            bf16 = str(module.trainer.precision).startswith("bf16")
            fully_shard_backbone(model, trunk(model), module.device_mesh["data_parallel"], bf16=bf16)
        return model

    def position_ids(self, model: torch.nn.Module, inputs: BatchFeature) -> torch.Tensor:
        mask = inputs["attention_mask"]
        base = trunk(model)
        visual = "image_grid_thw" in inputs or "video_grid_thw" in inputs
        if self.spec.rope == "model" and visual and hasattr(base, "get_rope_index"):
            # Videos too: their frames' temporal positions (Qwen2.5-VL spaces them by `second_per_grid_ts`).
            extra = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
            positions, _ = base.get_rope_index(
                inputs["input_ids"],
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=mask,
                **extra,
            )
            return positions
        # Sequential positions over real tokens, as generate() builds them for left padding.
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, model: torch.nn.Module, inputs: BatchFeature) -> torch.Tensor:
        """[B, L, H] last-layer states (after the final norm), with the spec's positions. Keys of the batch that are
        for pooling (`POOLING_KEYS`) are not given to the model."""
        positions = self.position_ids(model, inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in POOLING_KEYS}
        return trunk(model)(**model_inputs, position_ids=positions, use_cache=False).last_hidden_state


def refuse_unsharded_trainables(module: torch.nn.Module) -> None:
    """Under FSDP2, every trainable tensor must be sharded: a replicated one's gradients would never be reduced
    across ranks, so each rank would train its own copy."""
    unsharded = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if unsharded:
        raise LamraError(
            f"FSDP2 shards the backbone's trunk only, but {unsharded} are trainable outside it "
            "(learnable_temperature, backbone.train_lm_head, latent_attention pooling): turn them off or use DDP"
        )


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone without its LM head (its forward gives last-layer hidden states)."""
    return hf_model(model).base_model


def fully_shard_backbone(model: torch.nn.Module, trunk: torch.nn.Module, mesh: DeviceMesh, bf16: bool) -> None:
    """FSDP2: shard each decoder layer of the language model (the architecture's `_no_split_modules`), then
    `trunk`, the module whose forward the LightningModule calls, as the root. With `bf16`, compute in bfloat16 and
    reduce gradients in float32.

    The vision tower stays in the root group, gathered at every forward: a rank whose batch holds no image skips
    the vision tower, so separate vision groups would leave the ranks' collectives mismatched (a hang or a gloo
    size error) on mixed text/image batches. It costs one unsharded vision tower per rank during the forward.
    """
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mesh": mesh, **({"mp_policy": policy} if policy is not None else {})}
    inner = hf_model(model)
    blocks = set(inner._no_split_modules or [])
    language_model = _module(inner, model_family(inner).language_model)
    layers = [m for m in language_model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise LamraError(f"{type(inner).__name__}: no decoder layer ({sorted(blocks)}) found to shard")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(trunk, **kwargs)


def hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base is not None else model


def _module(model: torch.nn.Module, name: str | None) -> torch.nn.Module:
    if name is None:
        raise LamraError(f"{type(model).__name__} has no such part (a text-only model has no vision tower)")
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise LamraError(f"backbone has no module {name!r}: the architecture table does not match") from err
