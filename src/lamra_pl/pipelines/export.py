"""`lamra-pl export`: a `fit` checkpoint -> a folder that another library loads without lamra-pl.

One function per target (`TARGETS`); today's target:

    peft   a PEFT LoRA adapter folder (`to_peft`):
             adapter_config.json, adapter_model.safetensors   peft's own `save_pretrained` of the module's adapter
             tokenizer, processor and chat template files     the base's processor with `<emb>` added
             lamra_pl.json                                    the module's settings (`lamra_pl.formats.settings`):
                                                              pooling, rope, instructions, LoRA
             lamra_pl_pooling.safetensors                     trained latent-attention pooling, when there is one
             README.md                                        how to load it and compute what lamra-pl computes

The adapter holds the LoRA weights only. `<emb>` is a token lamra-pl adds to the tokenizer: a base with spare
embedding rows (real Qwen2-VL checkpoints) takes it as it is; one without is resized to len(tokenizer) before the
adapter is loaded, as lamra-pl resizes it. The new row's values never change an embedding pooled before `<emb>` (a
causal model reads no later token), so no embedding matrix is saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal, NamedTuple

from lamra_pl.errors import LamraError
from lamra_pl.formats.settings import POOLING_FILE, SETTINGS_FILE, write_settings
from lamra_pl.models.backbone import EMB_TOKEN, family_of, model_type
from lamra_pl.models.base import TrainingModule
from lamra_pl.models.checkpoints import (
    FOLDER,
    caller_settings,
    class_path_of,
    load_module,
    module_arguments,
    read_checkpoint,
)
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import ASSISTANT, PROMPTS
from lamra_pl.models.rerank_inputs import NO, YES
from lamra_pl.models.reranker import RerankModule

Target = Literal["peft"]
# Backbone parts a module may train besides its adapter: weights a LoRA adapter does not carry.
TRAINED_PARTS = ("train_vision_tower", "train_projector", "train_lm_head")


def export(
    ckpt: str, out: str, to: Target = "peft", backbone: str | None = None, trust_remote_code: bool = False
) -> Path:
    """Export a training checkpoint for other libraries: a PEFT adapter folder (`--to peft`).

    `--to peft` writes peft's `adapter_config.json` and `adapter_model.safetensors`, the processor with `<emb>`,
    lamra-pl's settings file and a README.md that says how to embed (or score) with it. Load it with
    `PeftModel.from_pretrained(base, OUT)` on the base model you load yourself: `base_model_name_or_path` is the
    backbone path as this machine knows it (the one given here, else the checkpoint's), which another machine may
    not have. A base with fewer embedding rows than the tokenizer has tokens is resized to len(tokenizer) first.

    Args:
        ckpt: Lightning checkpoint written by `lamra-pl fit` that trained a LoRA adapter.
        out: output directory.
        to: the target format: "peft" (a LoRA adapter folder).
        backbone: the backbone folder, when it is no longer where the checkpoint says.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
    """
    path = Path(ckpt)
    if path.is_dir():
        raise LamraError(
            f"{ckpt} is a model folder, with no adapter of its own: export --to {to} takes the `lamra-pl fit` "
            "checkpoint (.ckpt) that trained a LoRA adapter"
        )
    if not path.is_file():
        raise LamraError(f"checkpoint {ckpt!r} does not exist")
    if to not in TARGETS:
        raise LamraError(f"export --to {to!r} is not a target; use one of {sorted(TARGETS)}")
    TARGETS[to].check(path)
    module = load_module(path, backbone={"dtype": "float32", **caller_settings(backbone, trust_remote_code)})
    written = TARGETS[to].write(module, Path(out))
    print(f"{to} export written to {written}")
    return written


# ------------------------------------------------------------------------------------------------ peft
def check_peft(ckpt: Path) -> None:
    """Refuse, before building the model, a checkpoint a LoRA adapter cannot reproduce."""
    cls, args, _ = read_checkpoint(ckpt)
    if issubclass(cls, CLIPModule):
        raise LamraError(
            f"{ckpt} is a CLIPModule checkpoint: it holds every weight and has no LoRA adapter to export; index, "
            "retrieve and search read it as it is"
        )
    if args.get("lora") is None:
        raise LamraError(
            f"{ckpt} fully fine-tuned its language model (lora: null): there is no LoRA adapter to export; write a "
            "model folder with `lamra-pl merge` instead"
        )
    backbone = args.get("backbone") if isinstance(args.get("backbone"), dict) else {}
    trained = [name for name in TRAINED_PARTS if backbone.get(name)]
    if trained:
        raise LamraError(
            f"{ckpt} also trained backbone weights outside its adapter ({', '.join(trained)}), which a LoRA adapter "
            "does not carry; write a model folder with `lamra-pl merge` instead"
        )


def to_peft(module: TrainingModule, out: Path) -> Path:
    """`module`'s LoRA adapter as a PEFT folder (peft's own `save_pretrained`), with the processor, the settings
    file, trained pooling weights and a README.md."""
    if not isinstance(module, (EmbeddingModule, RerankModule)) or module.backbone.lora is None:
        raise LamraError(f"a {type(module).__name__} without a LoRA adapter has nothing to export to peft")
    spec = module.backbone.spec
    model = module.model
    # The backbone path as given or stored (a GGUF file stays a file), not the folder transformers was handed.
    model.peft_config["default"].base_model_name_or_path = spec.path
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    module.processor.save_pretrained(out)
    args = module_arguments(module)
    args["backbone"] = {k: v for k, v in asdict(spec).items() if k != "path" and k not in FOLDER}
    write_settings(out, class_path_of(type(module)), json.loads(json.dumps(args)))
    latent_pool = getattr(module, "latent_pool", None)
    if latent_pool is not None:
        latent_pool.save(out)
    (out / "README.md").write_text(peft_card(module))  # in place of peft's empty template
    return out


def peft_card(module: EmbeddingModule | RerankModule) -> str:
    """The adapter folder's README.md: what the base is and how to compute lamra-pl's embeddings or scores."""
    spec = module.backbone.spec
    vocabulary = len(module.processor.tokenizer)
    positions = (
        "sequential: `position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)` (rope: 1d, the LamRA reference)"
        if spec.rope == "1d"
        else "the model's own (leave `position_ids` unset)"
    )
    if isinstance(module, EmbeddingModule):
        kind, tags = "retriever (embedding model)", "feature-extraction"
        instructions = (
            "A query's text is `format_text(INSTRUCTION + ' ' + TEXT)` (`lamra_pl.formats.sample.with_instruction`: "
            "stripped, capitalised, ending in punctuation)."
            if module.instructions
            else "This model was trained without task instructions."
        )
        use = [
            "Each input is a chat rendered with this folder's chat template (`add_generation_prompt=False`): a user "
            "turn holding the image (if any), then the text in LamRA's prompt for its modality, and an assistant turn "
            f"`{ASSISTANT}`.",
            "",
            *(f"- {modality}: `{template!r}`" for modality, template in PROMPTS.items()),
            "",
            instructions + _cut(module),
            "",
            "The embedding is the last layer's hidden state after the final norm (`hidden_states[-1]` of a forward "
            f"with `output_hidden_states=True`) at {_pooling(module)}, L2-normalised.",
        ]
    else:
        kind, tags = "reranker", "text-classification"
        use = [
            "Prompts are lamra-pl's reranker chats (`lamra_pl.models.rerank_inputs`), rendered with the chat template "
            "of this folder with the generation prompt. A (query, candidate) pair scores "
            f"P({YES}) = softmax(logit of {YES!r}'s first token, logit of {NO!r}'s first token) at the prompt's last "
            "token." + _cut(module),
        ]
    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"tags: [lamra-pl, lora, {tags}]",
            "---",
            "",
            f"# LoRA adapter of a lamra-pl {kind}",
            "",
            f"Written by `lamra-pl export --to peft`. Base model: `{spec.path}`, the backbone path on the machine "
            "that exported it (`base_model_name_or_path`); load your copy of that base yourself.",
            "",
            *_loading(module),
            "",
            f"The tokenizer here has {vocabulary} tokens. Positions: {positions}.",
            "",
            *use,
            "",
            f"`{SETTINGS_FILE}` holds the module's settings as lamra-pl records them"
            + (f"; `{POOLING_FILE}` its trained pooling weights." if getattr(module, "latent_pool", None) else "."),
            "",
        ]
    )


def _loading(module: EmbeddingModule | RerankModule) -> list[str]:
    """How a user loads the base, resizes it for `<emb>` (if it must) and puts the adapter on it."""
    text_only = family_of(model_type(module.backbone.spec.path)).text_only
    model_class = "AutoModelForCausalLM" if text_only else "AutoModelForImageTextToText"
    reader = "tokenizer = AutoTokenizer" if text_only else "processor = AutoProcessor"
    tokenizer = "tokenizer" if text_only else "processor.tokenizer"
    added = f'  # the base\'s, with "{EMB_TOKEN}" added' if isinstance(module, EmbeddingModule) else ""
    return [
        "```python",
        "import torch",
        "from peft import PeftModel",
        f"from transformers import {model_class}, {reader.split(' = ')[1]}",
        "",
        f"{reader}.from_pretrained(ADAPTER){added}",
        f"base = {model_class}.from_pretrained(BASE, dtype=torch.float32)",
        f"if len({tokenizer}) > base.get_input_embeddings().num_embeddings:",
        f"    base.resize_token_embeddings(len({tokenizer}), mean_resizing=False)",
        "model = PeftModel.from_pretrained(base, ADAPTER).eval()",
        "```",
    ]


def _cut(module: EmbeddingModule | RerankModule) -> str:
    if module.max_text_tokens is None:
        return ""
    return f" Texts are cut to {module.max_text_tokens} tokens before the prompt is built."


def _pooling(module: EmbeddingModule) -> str:
    if module.pooling == "before_emb":
        return f"the token just before the first `{EMB_TOKEN}`"
    if module.pooling == "last_token":
        return "the last non-padding token"
    return (
        f"every real token, pooled by latent attention (`lamra_pl.models.pooling.LatentAttentionPooling`, its weights "
        f"in `{POOLING_FILE}`)"
    )


class Exporter(NamedTuple):
    check: Callable[[Path], None]  # refuses, before the model is built, a checkpoint the target cannot express
    write: Callable[[TrainingModule, Path], Path]


TARGETS: dict[str, Exporter] = {"peft": Exporter(check_peft, to_peft)}
