"""Tiny, randomly initialised checkpoint directories for tests and the CPU demo: Qwen2-VL (the demo's), Qwen2.5-VL,
Qwen3-VL, Qwen3.5, LLaVA-Next (MM-Embed's family) and text-only causal LMs.

Each is written the way a real checkpoint is (config.json, model.safetensors, tokenizer and processor files,
chat template), so everything downstream loads it with `from_pretrained(path)`, the same code path as
Qwen2-VL-7B-Instruct or llava-v1.6-mistral-7b-hf. The tokenizers are byte-level BPEs trained here with
`tokenizers`, so any Unicode text tokenizes; each carries its family's special tokens and a chat template of its
family's shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import family_of

# Qwen2-VL's special tokens, in Qwen2-VL's order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-Instruct's chat template (default system turn, vision placeholders).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3's vocabulary (Qwen3-VL's and Qwen3.5's) adds its thinking tags to Qwen2-VL's special tokens.
QWEN3_SPECIAL_TOKENS = [*SPECIAL_TOKENS, "<think>", "</think>"]

# Qwen3-VL-Instruct's chat template without its tool-calling branches: no default system turn, vision placeholders.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system\n"
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}"
    "{% else %}{% for content in messages[0]['content'] %}{% if 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}<|im_start|>user\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3.5's chat template without its tool-calling and reasoning-content branches: contents trimmed, the assistant
# turns after the last user turn opened with a (here empty) thinking block, and a generation prompt that opens a
# thinking block, or writes an empty one when `enable_thinking` is false.
QWEN3_5_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% macro render_content(content, do_vision_count) %}{% if content is string %}{{ content }}"
    "{% else %}{% for item in content %}"
    "{% if 'image' in item or 'image_url' in item or item['type'] == 'image' %}"
    "{% if do_vision_count %}{% set image_count.value = image_count.value + 1 %}{% endif %}"
    "{% if add_vision_id %}{{ 'Picture ' ~ image_count.value ~ ': ' }}{% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'video' in item or item['type'] == 'video' %}"
    "{% if do_vision_count %}{% set video_count.value = video_count.value + 1 %}{% endif %}"
    "{% if add_vision_id %}{{ 'Video ' ~ video_count.value ~ ': ' }}{% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endmacro %}"
    "{% if messages[0]['role'] == 'system' %}"
    "<|im_start|>system\n{{ render_content(messages[0]['content'], false)|trim }}<|im_end|>\n{% endif %}"
    "{% set ns = namespace(last_query_index=-1) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_query_index = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for message in messages %}{% set content = render_content(message['content'], true)|trim %}"
    "{% if message['role'] == 'user' %}<|im_start|>user\n{{ content }}<|im_end|>\n"
    "{% elif message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_query_index %}<think>\n\n</think>\n\n{% endif %}{{ content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)

# Enough text for the BPE merges to cover the prompt scaffolding; user text adds its own vocabulary.
BASE_CORPUS = [
    "You are a helpful assistant.",
    "Summarize above sentence in one word: ",
    "Summarize above image in one word: ",
    "Summarize above image and sentence in one word: ",
    "Find an image that matches the given caption.",
    "Retrieve a caption that describes the image.",
    "Judge whether the candidate matches the query. Answer Yes or No.",
    "user assistant system",
]


# Mistral-Instruct's chat shape ("<s>[INST] ... [/INST] answer</s>"), as LLaVA-v1.6-Mistral uses it, with the
# image placeholder where the image part is.
LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %} {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)

# A text-only Qwen2-Instruct's chat template: string content only, as text models' templates are.
TEXT_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(
    corpus: Iterable[str],
    rows: int,
    special_tokens: list[str],
    bos_token: str | None = None,
    **named: Any,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the prompt scaffolding and `corpus`, whose first ids are `special_tokens`, that
    leaves a few of the model's `rows` embedding rows spare (as real checkpoints do, so `<emb>` fits without
    resizing) and stays small when `rows` is large. `named` (eos_token, pad_token, extra_special_tokens, ...) goes
    to `PreTrainedTokenizerFast`. With `bos_token`, encoding prepends it, as Llama and Mistral tokenizers do."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(rows, 4096) - 8,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*BASE_CORPUS, *corpus], trainer)
    if bos_token is not None:
        bos = (bos_token, tokenizer.token_to_id(bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos_token, padding_side="left", **named)


def text_config(
    model_type: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int | None,
    vocab_size: int,
    tokenizer: PreTrainedTokenizerFast,
) -> dict[str, Any]:
    """The shape of a tiny decoder, as the keys every Llama-like config (llama, mistral, qwen2, ...) takes."""
    return {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "use_cache": False,
    }


def build_tiny_qwen2vl(
    out: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 32,
    vision_heads: int = 2,
    vision_mlp_ratio: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2-VL checkpoint to `out` and return its path.

    `vocab_size` is the number of embedding rows; the tokenizer is trained to leave a few rows spare (as real
    Qwen2-VL checkpoints do), so that `<emb>` fits without resizing; it stays small when `vocab_size` is large.
    The other arguments give any Qwen2-VL shape (the benchmarks build 2B- and 7B-shaped models with them).
    """
    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim % 2:
        raise LamraError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    half = head_dim // 2
    # mRoPE sections (temporal, height, width) must sum to head_dim / 2.
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    tokenizer = qwen_tokenizer(corpus, vocab_size, SPECIAL_TOKENS)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size or 4 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": None,
            "use_cache": False,
        },
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": hidden_size,  # the merger projects into the language model's width
            "num_heads": vision_heads,
            "mlp_ratio": vision_mlp_ratio,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    return _save(Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype), processor, out)


def qwen_tokenizer(corpus: Iterable[str], rows: int, special_tokens: list[str]) -> PreTrainedTokenizerFast:
    """A Qwen-VL family's tokenizer (`train_tokenizer` over `special_tokens`): ends a turn with <|im_end|>, pads with
    <|endoftext|>, and names its vision tokens as the family's processors look them up."""
    return train_tokenizer(
        corpus,
        rows,
        special_tokens,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def _qwen_text_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int | None,
    vocab_size: int,
    head_dim: int | None,
    mrope: list[int],
    rope: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The decoder of a Qwen-VL family, whose rotary pairs split into `mrope` sections (temporal, height, width);
    `head_dim` None: hidden_size / num_heads (the config has no such key)."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        **({} if head_dim is None else {"head_dim": head_dim}),
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope, **(rope or {})},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "use_cache": False,
        **extra,
    }


def _vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The vision token ids a Qwen-VL family's config names."""
    names = ("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>")
    ids = {f"{key}_token_id": tokenizer.convert_tokens_to_ids(token) for key, token in names}
    return {**ids, "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>")}


def _heads(hidden_size: int, num_heads: int) -> int:
    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim % 2:
        raise LamraError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    return head_dim


def build_tiny_qwen2_5_vl(
    out: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 32,
    vocab_size: int = 512,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint to `out`: Qwen2-VL's tokenizer, chat template and 14-pixel patches,
    a vision tower of windowed attention blocks (the last one full attention, as Qwen2.5-VL's every eighth) with
    RMSNorm and SwiGLU, and Qwen2_5_VLProcessor."""
    head_dim = _heads(hidden_size, num_heads)
    half = head_dim // 2
    tokenizer = qwen_tokenizer(corpus, vocab_size, SPECIAL_TOKENS)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        video_processor=Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,  # Qwen2.5-VL-Instruct's is Qwen2-VL's
    )
    shape = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(
            tokenizer,
            hidden_size=hidden_size,
            **shape,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            head_dim=None,
            mrope=[half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8],
        ),
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_dim,
            "intermediate_size": 2 * vision_dim,
            "num_heads": 2,
            "out_hidden_size": hidden_size,  # the merger projects into the language model's width
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save(Qwen2_5_VLForConditionalGeneration._from_config(config), processor, out)


def _qwen3_processor(tokenizer: PreTrainedTokenizerFast, template: str, min_pixels: int, max_pixels: int) -> Any:
    """Qwen3-VL's processor (Qwen3.5's too): 16-pixel patches merged 2x2, images normalised to [-1, 1]."""
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **half),
        video_processor=Qwen3VLVideoProcessor(**half),
        tokenizer=tokenizer,
        chat_template=template,
    )


def _qwen3_vision(vision_depth: int, vision_dim: int, hidden_size: int) -> dict[str, Any]:
    """Qwen3-VL's and Qwen3.5's vision tower: 16-pixel patches with a learned 4x4 position grid (interpolated to
    each image), merged 2x2 into the language model's width."""
    return {
        "depth": vision_depth,
        "hidden_size": vision_dim,
        "intermediate_size": 2 * vision_dim,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
    }


def build_tiny_qwen3_vl(
    out: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 32,
    vocab_size: int = 512,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen3-VL (Instruct) checkpoint to `out`: a Qwen3 decoder (q/k norms) with interleaved
    mRoPE, a vision tower whose first block also feeds the decoder's first layer (DeepStack), Qwen3VLProcessor and
    Qwen3-VL-Instruct's chat template."""
    head_dim = _heads(hidden_size, num_heads)
    half = head_dim // 2
    spatial = half * 5 // 16  # Qwen3-VL's [24, 20, 20] for 64 rotary pairs
    tokenizer = qwen_tokenizer(corpus, vocab_size, QWEN3_SPECIAL_TOKENS)
    processor = _qwen3_processor(tokenizer, QWEN3_VL_CHAT_TEMPLATE, min_pixels, max_pixels)
    shape = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    config = Qwen3VLConfig(
        text_config=_qwen_text_config(
            tokenizer,
            hidden_size=hidden_size,
            **shape,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            head_dim=head_dim,
            mrope=[half - 2 * spatial, spatial, spatial],
            rope={"mrope_interleaved": True},
        ),
        vision_config={**_qwen3_vision(vision_depth, vision_dim, hidden_size), "deepstack_visual_indexes": [0]},
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save(Qwen3VLForConditionalGeneration._from_config(config), processor, out)


def build_tiny_qwen3_5(
    out: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_depth: int = 2,
    vision_dim: int = 32,
    vocab_size: int = 512,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random Qwen3.5 (dense) checkpoint to `out`: the natively multimodal Qwen3.5, whose decoder
    interleaves Gated DeltaNet linear-attention layers with gated full-attention layers (every fourth, and the last
    here), rotary on a quarter of each head, Qwen3-VL's processor and Qwen3.5's chat template (thinking tags)."""
    head_dim = 2 * _heads(hidden_size, num_heads)  # Qwen3.5's heads are wide; a quarter of each is rotary
    pairs = head_dim // 8
    tokenizer = qwen_tokenizer(corpus, vocab_size, QWEN3_SPECIAL_TOKENS)
    processor = _qwen3_processor(tokenizer, QWEN3_5_CHAT_TEMPLATE, min_pixels, max_pixels)
    interval = min(4, num_layers)
    layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    shape = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    config = Qwen3_5Config(
        text_config=_qwen_text_config(
            tokenizer,
            hidden_size=hidden_size,
            **shape,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            head_dim=head_dim,
            mrope=[pairs - 2 * (pairs // 3), pairs // 3, pairs // 3],
            rope={"mrope_interleaved": True, "partial_rotary_factor": 0.25},
            layer_types=layer_types,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_conv_kernel_dim=4,
        ),
        vision_config=_qwen3_vision(vision_depth, vision_dim, hidden_size),
        **_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _save(Qwen3_5ForConditionalGeneration._from_config(config), processor, out)


def build_tiny_llava_next(
    out: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vision_dim: int = 32,
    vision_layers: int = 2,
    image_size: int = 28,
    vocab_size: int = 512,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random LLaVA-Next (CLIP vision tower, 2-layer projector, Mistral decoder) to `out`.

    The vision tower sees `image_size`-pixel tiles in patches of 14 (LLaVA-v1.6: 336 and 14) and AnyRes picks
    among 1x2, 2x1 and 2x2 tiles, so an image costs a few dozen tokens. The tokenizer prepends `<s>` as Mistral's
    does and the chat template writes it too: a collator must not add special tokens to a rendered chat.
    """
    if image_size % 14:
        raise LamraError(f"image_size {image_size} must be a multiple of the patch size, 14")
    tokenizer = train_tokenizer(
        corpus,
        vocab_size,
        LLAVA_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    grid = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=grid,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        text_config=text_config(
            "mistral",
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            intermediate_size=intermediate_size,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
        ),
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": vision_dim,
            "intermediate_size": 2 * vision_dim,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
            "projection_dim": vision_dim,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid,
        image_seq_length=(image_size // 14) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    return _save(LlavaNextForConditionalGeneration._from_config(config), processor, out)


def build_tiny_causal_lm(
    out: str | Path,
    *,
    model_type: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    corpus: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write a tiny random text-only causal LM (`model_type`: qwen2, llama, mistral, ...) and its tokenizer, with
    a Qwen2-Instruct chat template (string content), to `out`. No processor: it is what a text checkpoint holds."""
    tokenizer = train_tokenizer(
        corpus,
        vocab_size,
        TEXT_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = TEXT_CHAT_TEMPLATE
    decoder = text_config(
        model_type,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
    )
    config = AutoConfig.for_model(**decoder, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _save(AutoModelForCausalLM.from_config(config), tokenizer, out)


def _save(model: PreTrainedModel, processor: Any, out: str | Path) -> Path:
    """Save a model and its processor (or tokenizer) to `out`, as a real checkpoint is laid out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_gguf(folder: str | Path, out: str | Path) -> Path:
    """Write a tiny Qwen2 causal LM checkpoint folder (`build_tiny_causal_lm`) as one GGUF file, laid out as
    llama.cpp's converter lays one out: the architecture's metadata, the byte-level BPE vocabulary padded to the
    embedding rows, its merges and chat template, and float32 tensors under llama.cpp's names."""
    import gguf
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "qwen2":
        raise LamraError(f"{folder}: write_gguf writes Qwen2 models only, not {config.get('model_type')!r}")
    spec = json.loads((folder / "tokenizer.json").read_text())
    special = {t["content"]: t["id"] for t in spec["added_tokens"]}
    by_id = {i: t for t, i in {**spec["model"]["vocab"], **special}.items()}
    rows = config["vocab_size"]
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(rows)]
    kinds = [
        gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        for i, t in enumerate(tokens)
    ]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, "qwen2")
    writer.add_name(folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template((folder / "chat_template.jinja").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for name, tensor in load_file(folder / "model.safetensors").items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


QWEN_VL_BUILDERS = {
    "qwen2_vl": build_tiny_qwen2vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_5": build_tiny_qwen3_5,
}


def tiny_backbone(
    out: str,
    model_type: str = "qwen2_vl",
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    vision_dim: int = 32,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    corpus: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny randomly initialised checkpoint (for tests and the CPU demo).

    Args:
        out: output directory.
        model_type: "qwen2_vl" (the demo's), "qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_next" (MM-Embed's
            family), or a text-only causal LM's model_type ("qwen2", "llama", "mistral", ...).
        hidden_size: language model width (the vision projector maps into it).
        num_layers: decoder layers.
        vocab_size: embedding rows; the byte-level BPE tokenizer is trained to leave a few spare.
        vision_dim: vision tower width (multimodal models).
        min_pixels: smallest image area the processor resizes to (the Qwen-VL families).
        max_pixels: largest image area the processor resizes to (the Qwen-VL families).
        corpus: optional text file (one text per line) to train the tokenizer on besides the prompts.
        seed: weight initialisation seed.
    """
    lines: list[str] = []
    if corpus is not None:
        if not Path(corpus).is_file():
            raise LamraError(f"corpus file {corpus!r} does not exist")
        lines = Path(corpus).read_text(encoding="utf-8").splitlines()
    shape = {"hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size}
    if model_type in QWEN_VL_BUILDERS:
        pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        path = QWEN_VL_BUILDERS[model_type](out, **shape, vision_dim=vision_dim, **pixels, corpus=lines, seed=seed)
    elif model_type == "llava_next":
        path = build_tiny_llava_next(out, **shape, vision_dim=vision_dim, corpus=lines, seed=seed)
    elif family_of(model_type, where="--model_type").text_only:
        path = build_tiny_causal_lm(out, model_type=model_type, **shape, corpus=lines, seed=seed)
    else:
        raise LamraError(
            f"--model_type {model_type!r}: a tiny builder exists for {', '.join(QWEN_VL_BUILDERS)}, llava_next and "
            "causal LMs"
        )
    print(f"tiny {model_type} written to {path}")
    return path
