"""`lamra-pl export`: a `fit` checkpoint (or a model folder) -> folders that other libraries load without lamra-pl.

One `Exporter` per target (`TARGETS`): `check` refuses, before any model is built, what the target cannot express,
with the reason in one line; `write` writes the folder. `--to` takes one target (written into OUT) or a list
(each into OUT/<target>); OUT is written whole or not at all (a temporary folder beside it, renamed at the end) and
must not hold files already.

    peft                    a PEFT LoRA adapter folder (`to_peft`), from a checkpoint that trained one:
                              adapter_config.json, adapter_model.safetensors   peft's own `save_pretrained`
                              tokenizer, processor and chat template files     the base's processor with `<emb>`
                              lamra_pl.json, lamra_pl_pooling.safetensors      the module's settings and trained
                                                                               pooling (`lamra_pl.formats.settings`)
                              README.md                                        how to load it and compute what
                                                                               lamra-pl computes
    sentence-transformers   a retriever as a SentenceTransformer folder (`to_sentence_transformers`):
                              the merged model folder (`lamra-pl merge`'s: config, weights, processor, lamra_pl.json)
                              additional_chat_templates/lamra_embedding.jinja  the input as the collator renders it
                              modules.json, sentence_bert_config.json          Transformer (the template above,
                              1_Pooling/config.json, 2_Normalize/config.json   chosen by name) -> last-token (or
                                                                               mean) pooling -> L2 normalisation;
                              config_sentence_transformers.json                the prompts
                              README.md                                        the model card
    vllm                    the merged model folder for `vllm serve` (`to_vllm`), a retriever's or a reranker's:
                              the merged model folder, as above
                              additional_chat_templates/lamra_embedding.jinja  (a retriever) or lamra_rerank.jinja
                                                                               (a reranker's pointwise prompt)
                              README.md                                        the `vllm serve` command

The chat templates (`lamra_pl.models.export_templates`) rebuild from the library's messages the chat lamra-pl's
collator builds and render it with the backbone's own template, cut so that its last token is the one lamra-pl's
pooling reads (`<emb>`'s predecessor); the folder's default chat template stays the backbone's, so the folder is also
a lamra-pl model folder. Refused: latent-attention pooling and `rope: 1d` on a multimodal backbone (neither library
computes them), a reranker for sentence-transformers (it writes retrievers), a reranker trained listwise only for
vLLM (its classifier is the pointwise P(Yes)), CLIP checkpoints. A retriever exported at a Matryoshka dimension
(`--settings.dim D`, `lamra_pl.models.matryoshka`) embeds at it in every target: the settings file records it,
sentence-transformers' config holds `truncate_dim: D`, the `vllm serve` command `dimensions: D`.

A bidirectional retriever (`backbone.attention: bidirectional`) keeps its attention in the merged folder's
config.json (the text config's `is_causal: false`, which transformers' own forward honours), so sentence-transformers
computes it, with "last_token" or "mean" pooling; "before_emb" is refused there (the template cuts the input before
`<emb>`, and a bidirectional decoder reads the tokens after it too). vLLM is refused a bidirectional retriever (its
own decoder implementations attend causally). Neither library is given a mean that leaves the instruction out
(`exclude_instruction`): the instruction sits inside the chat, not at the start where a prompt length could cut it.
PEFT adapters keep all of these in their settings file; their README says how to set the attention.

The PEFT adapter holds the LoRA weights only. `<emb>` is a token lamra-pl adds to the tokenizer: a base with spare
embedding rows (real Qwen2-VL checkpoints) takes it as it is; one without is resized to len(tokenizer) before the
adapter is loaded, as lamra-pl resizes it. The new row's values never change an embedding pooled before `<emb>` (a
causal model reads no later token), so no embedding matrix is saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from lamra_pl.errors import LamraError
from lamra_pl.files import atomic_folder, atomic_write
from lamra_pl.formats.settings import POOLING_FILE, SETTINGS_FILE, ModelSettings, module_args, write_settings
from lamra_pl.models.backbone import EMB_TOKEN, family_of, hf_model, model_type
from lamra_pl.models.base import TrainingModule
from lamra_pl.models.checkpoints import (
    FOLDER,
    argument,
    caller_settings,
    class_path_of,
    load_module,
    module_arguments,
    save_merged,
    stored_module,
)
from lamra_pl.models.clip import CLIPModule
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import ASSISTANT, PROMPTS
from lamra_pl.models.export_templates import (
    EMBEDDING_TEMPLATE,
    RERANK_TEMPLATE,
    TEMPLATE_FOLDER,
    base_template,
    embedding_template,
    rerank_template,
)
from lamra_pl.models.rerank_inputs import NO, POINTWISE_INSTRUCTION, YES
from lamra_pl.models.reranker import RerankModule
from lamra_pl.pipelines.merge import base_dtype

Target = Literal["peft", "sentence-transformers", "vllm"]
# Backbone parts a module may train besides its adapter: weights a LoRA adapter does not carry.
TRAINED_PARTS = ("train_vision_tower", "train_projector", "train_lm_head")
# The sentence-transformers release whose folder layout `to_sentence_transformers` writes (and the tests load).
SENTENCE_TRANSFORMERS = "6.2.0"


def export(
    model: str,
    out: str,
    to: Target | list[Target] = "peft",
    backbone: str | None = None,
    prompts: dict[str, str] | None = None,
    trust_remote_code: bool = False,
    settings: ModelSettings | None = None,
) -> Path:
    """Export a training checkpoint or model folder for other libraries: PEFT, sentence-transformers, vLLM (`--to`).

    `--to peft` writes the LoRA adapter of a `fit` checkpoint as a PEFT folder: load it with
    `PeftModel.from_pretrained(base, OUT)` on the base you load yourself (`base_model_name_or_path` is the backbone
    path as this machine knows it). `--to sentence-transformers` writes a retriever as a folder that
    `SentenceTransformer(OUT)` loads and encodes texts, images and both with (`prompt=INSTRUCTION` for an instructed
    query). `--to vllm` writes the merged model and the chat template that `vllm serve` needs; its README.md holds
    the command. Several targets at once (`--to '[peft, vllm]'`) go into OUT/<target> each. What a target cannot
    express (latent-attention pooling, `rope: 1d` on a multimodal backbone, ...) is refused before anything is
    built or written.

    Args:
        model: a `lamra-pl fit` checkpoint (.ckpt), or a model folder (`lamra-pl merge`'s); peft needs the checkpoint.
        out: output folder; it must not exist or be empty.
        to: the target, or a list of targets: "peft", "sentence-transformers", "vllm".
        backbone: the backbone folder, when it is no longer where the checkpoint says.
        prompts: named instructions for sentence-transformers' `prompts` (`encode(..., prompt_name=NAME)`), e.g.
            {"webqa_task2": "Find a Wikipedia image that answers my question."}.
        trust_remote_code: run code the backbone folder ships (a file never turns this on).
        settings: how the model reads its inputs, over what it records (`--settings.*`, as on `index`);
            `--settings.dim D` exports a retriever that embeds at that Matryoshka dimension (each embedding cut to
            D values, normalised again): its settings file records it, sentence-transformers' config holds
            `truncate_dim: D`, and the `vllm serve` command sets `dimensions: D`.
    """
    targets = _targets(to)
    path = Path(model)
    if not path.exists():
        raise LamraError(f"model {model!r} does not exist: give a `lamra-pl fit` checkpoint or a model folder")
    source = Source.read(path, backbone, settings)
    request = Request(dict(prompts or {}))
    if request.prompts and "sentence-transformers" not in targets:
        raise LamraError("export --prompts are sentence-transformers' prompts: add --to sentence-transformers")
    for name in targets:
        TARGETS[name].check(source, request)
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LamraError(f"export --out {out} exists and is not an empty folder: give a new folder")
    overrides = caller_settings(backbone, trust_remote_code, settings)
    module = load_module(path, backbone={"dtype": "float32", **overrides}, module=module_args(settings))
    with atomic_folder(out_dir) as staged:
        for name in targets:
            TARGETS[name].write(module, staged if len(targets) == 1 else staged / name, request)
    for name in targets:
        print(f"{name} export written to {out_dir if len(targets) == 1 else out_dir / name}")
    return out_dir


def _targets(to: Target | list[Target]) -> list[str]:
    """The requested targets in the order they are written: peft first, while the adapter is still unmerged (the
    other targets merge it into the module's weights)."""
    names = [to] if isinstance(to, str) else list(to)
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise LamraError(f"export --to {to!r}: use one or more of {list(TARGETS)}")
    if len(set(names)) != len(names):
        raise LamraError(f"export --to {to!r} names a target twice")
    return [name for name in TARGETS if name in names]


@dataclass(frozen=True)
class Source:
    """What `model` records, read before anything is built: its class and arguments (`stored_module`), with the
    caller's settings over them."""

    path: Path
    cls: type[TrainingModule]
    args: dict[str, Any]
    backbone_override: str | None = None

    @classmethod
    def read(cls, path: Path, backbone: str | None, settings: ModelSettings | None = None) -> Source:
        module_cls, args = stored_module(path)
        if settings is not None:
            args = {**args, **settings.module_args()}
            if settings.backbone_args():
                stored = args.get("backbone") if isinstance(args.get("backbone"), dict) else {}
                args["backbone"] = {**stored, **settings.backbone_args()}
        return cls(path, module_cls, args, backbone)

    @property
    def is_checkpoint(self) -> bool:
        return self.path.is_file() and self.path.suffix != ".gguf"

    @property
    def backbone(self) -> dict[str, Any]:
        stored = self.args.get("backbone")
        return stored if isinstance(stored, dict) else {}

    def argument(self, name: str) -> Any:
        return argument(self.cls, self.args, name)

    @property
    def text_only(self) -> bool:
        return family_of(model_type(self.backbone_override or self.backbone["path"])).text_only


@dataclass(frozen=True)
class Request:
    """What the caller asked of the targets besides the folder: sentence-transformers' named prompts."""

    prompts: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ peft
def check_peft(source: Source, request: Request) -> None:
    """Refuse, before building the model, what a LoRA adapter cannot reproduce."""
    where = source.path
    if not source.is_checkpoint:
        raise LamraError(
            f"{where} is a model folder, with no adapter of its own: export --to peft takes the `lamra-pl fit` "
            "checkpoint (.ckpt) that trained a LoRA adapter"
        )
    if issubclass(source.cls, CLIPModule):
        raise LamraError(
            f"{where} is a CLIPModule checkpoint: it holds every weight and has no LoRA adapter to export; index, "
            "retrieve and search read it as it is"
        )
    if source.args.get("lora") is None:
        raise LamraError(
            f"{where} fully fine-tuned its language model (lora: null): there is no LoRA adapter to export; write a "
            "model folder with `lamra-pl merge` instead"
        )
    trained = [name for name in TRAINED_PARTS if source.backbone.get(name)]
    if trained:
        raise LamraError(
            f"{where} also trained backbone weights outside its adapter ({', '.join(trained)}), which a LoRA adapter "
            "does not carry; write a model folder with `lamra-pl merge` instead"
        )


def to_peft(module: TrainingModule, out: Path, request: Request) -> Path:
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
    atomic_write(out / "README.md", peft_card(module))  # in place of peft's empty template
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
    if spec.attention == "bidirectional":
        positions += (
            ". Attention: bidirectional; set `base.config.get_text_config().is_causal = False` before the forward "
            "(transformers' switch for a decoder without its causal mask)"
        )
    if isinstance(module, EmbeddingModule):
        kind, tags = "retriever (embedding model)", "feature-extraction"
        use = [
            "Each input is a chat rendered with this folder's chat template (`add_generation_prompt=False`): "
            + _embedding_chat(module),
            "",
            _instructions(module) + _cut(module),
            "",
            "The embedding is the last layer's hidden state after the final norm (`hidden_states[-1]` of a forward "
            f"with `output_hidden_states=True`) at {_pooling(module)}, L2-normalised." + _matryoshka(module),
        ]
    else:
        kind, tags = "reranker", "text-classification"
        use = [
            "Prompts are lamra-pl's reranker chats (`lamra_pl.models.rerank_inputs`), rendered with the chat template "
            "of this folder with the generation prompt. " + _yes_no(module) + _cut(module),
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
            *_training(module),
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


# ------------------------------------------------------------------------------- sentence-transformers
def check_sentence_transformers(source: Source, request: Request) -> None:
    """Refuse what a SentenceTransformer (Transformer -> last-token Pooling -> Normalize) cannot compute."""
    _check_served(source, "sentence-transformers")
    if not issubclass(source.cls, EmbeddingModule):
        raise LamraError(
            f"{source.path} holds a {source.cls.__name__}: export --to sentence-transformers writes a retriever "
            "(a SentenceTransformer); export a reranker with --to vllm or --to peft"
        )
    if request.prompts and not source.argument("instructions"):
        raise LamraError(
            f"{source.path} was trained without task instructions (instructions: false): it has no use for "
            "export --prompts"
        )


def to_sentence_transformers(module: TrainingModule, out: Path, request: Request) -> Path:
    """The retriever as a SentenceTransformer folder: the merged model, its embedding chat template (chosen by name in
    sentence_bert_config.json), last-token pooling, normalisation, the prompts and a README.md."""
    assert isinstance(module, EmbeddingModule)
    text_only = _merged(module, out)
    _write_template(
        out, EMBEDDING_TEMPLATE, embedding_template(base_template(module.processor), module.pooling, text_only)
    )
    hidden = hf_model(module.model).config.get_text_config().hidden_size
    modules = [
        ("", "sentence_transformers.base.modules.transformer.Transformer"),
        ("1_Pooling", "sentence_transformers.sentence_transformer.modules.pooling.Pooling"),
        ("2_Normalize", "sentence_transformers.base.modules.normalize.Normalize"),
    ]
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    files: dict[str, Any] = {
        "modules.json": [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",  # AutoModel: the backbone without its LM head
            # Every input becomes a chat ("message", which the template reads); the plain modalities are listed so
            # that sentence-transformers accepts them, and it converts them to messages.
            "modality_config": {
                **{name: forward for name in (["text"] if text_only else ["text", "image", "image+text"])},
                "message": {**forward, "format": "flat" if text_only else "structured"},
            },
            "module_output_name": "token_embeddings",
            "processing_kwargs": {"chat_template": {"chat_template": EMBEDDING_TEMPLATE}},
            "unpad_inputs": False,  # padded batches: the positions are the model's own, as lamra-pl's
        },
        "1_Pooling/config.json": {
            "embedding_dimension": hidden,
            "pooling_mode": "mean" if module.pooling == "mean" else "lasttoken",
            "include_prompt": True,
        },
        "2_Normalize/config.json": {
            "module_input_name": "sentence_embedding",
            "module_output_name": "sentence_embedding",
        },
        "config_sentence_transformers.json": {
            "__version__": {"sentence_transformers": SENTENCE_TRANSFORMERS},
            "model_type": "SentenceTransformer",
            "prompts": {"query": "", "document": "", **request.prompts},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            # sentence-transformers cuts `encode`'s output to its first truncate_dim values (after Normalize)
            **({} if module.dim is None else {"truncate_dim": module.dim}),
        },
    }
    for name, value in files.items():
        atomic_write(out / name, json.dumps(value, indent=2) + "\n")
    atomic_write(out / "README.md", sentence_transformers_card(module, request))
    return out


def sentence_transformers_card(module: EmbeddingModule, request: Request) -> str:
    """The SentenceTransformer folder's README.md: how to encode, the prompt, pooling, normalisation, instructions
    and how the model was trained."""
    image = not family_of(model_type(module.backbone.spec.path)).text_only
    example = [
        "```python",
        "from PIL import Image",
        "from sentence_transformers import SentenceTransformer",
        "",
        "model = SentenceTransformer(FOLDER)  # the weights' own dtype; model_kwargs={'dtype': torch.float32}",
        *(
            [
                'candidates = model.encode(["a text", Image.open("a.jpg"), {"image": Image.open("b.jpg"), '
                '"text": "a caption"}])',
                'queries = model.encode_query(["a blue square"], prompt="Find the picture of this shape.")',
            ]
            if image
            else [
                'candidates = model.encode(["a text", "another text"])',
                'queries = model.encode_query(["a question"], prompt="Retrieve a passage that answers my question.")',
            ]
        ),
        "scores = model.similarity(queries, candidates)",
        "```",
    ]
    named = [f"- `{name}`: {text!r}" for name, text in request.prompts.items()]
    return "\n".join(
        [
            "---",
            "library_name: sentence-transformers",
            "pipeline_tag: sentence-similarity",
            "tags: [lamra-pl, sentence-transformers, feature-extraction]",
            "---",
            "",
            "# A lamra-pl retriever for sentence-transformers",
            "",
            f"Written by `lamra-pl export --to sentence-transformers` (the layout of sentence-transformers "
            f"{SENTENCE_TRANSFORMERS}): the merged model (base `{module.backbone.spec.path}`) with a chat template "
            "that renders every input as lamra-pl does, so `encode` gives lamra-pl's embeddings.",
            "",
            *example,
            "",
            "## Prompt",
            "",
            f"sentence-transformers renders each input with `{TEMPLATE_FOLDER}/{EMBEDDING_TEMPLATE}.jinja` (chosen by "
            "`processing_kwargs` in sentence_bert_config.json; the folder's default chat template stays the "
            "backbone's): " + _embedding_chat(module),
            "",
            "## Instructions",
            "",
            _instructions(module)
            + " Pass a query's instruction as the prompt: `encode(..., prompt=INSTRUCTION)` (sentence-transformers "
            "hands it to the template as a system message; `encode_query` and `encode_document` use the empty "
            "prompts `query` and `document`)."
            + (" Named instructions in config_sentence_transformers.json (`prompt_name=NAME`):" if named else ""),
            *named,
            "",
            "## Pooling and normalisation",
            "",
            f"The rendered input ends {_rendered_end(module)}: "
            + (
                "the mean of the Transformer module's last hidden states (after the final norm) over every token "
                "(`Pooling`, `mean`) is the embedding"
                if module.pooling == "mean"
                else "the Transformer module's last hidden state (after the final norm) at that last token "
                "(`Pooling`, `lasttoken`) is the embedding"
            )
            + ", L2-normalised (`Normalize`); similarity is the cosine. Positions are the model's own."
            + _attention(module)
            + _st_truncation(module)
            + _cut(module, template=True),
            "",
            *_training(module),
        ]
    )


# ------------------------------------------------------------------------------------------------ vllm
def check_vllm(source: Source, request: Request) -> None:
    """Refuse what vLLM's pooling runner (last-token embedding, or a yes/no classifier from the LM head) cannot
    compute."""
    _check_served(source, "vllm")
    if issubclass(source.cls, RerankModule) and not source.argument("pointwise_weight"):
        raise LamraError(
            f"{source.path} trained its reranker listwise only (pointwise_weight: 0): vLLM serves the pointwise "
            "P(Yes) classifier, which it never trained; rerank with lamra-pl's listwise mode"
        )


def to_vllm(module: TrainingModule, out: Path, request: Request) -> Path:
    """The merged model folder for `vllm serve`, its chat template (the retriever's input, or the reranker's pointwise
    prompt) and a README.md with the command."""
    assert isinstance(module, (EmbeddingModule, RerankModule))
    text_only = _merged(module, out)
    base = base_template(module.processor)
    if isinstance(module, EmbeddingModule):
        _write_template(out, EMBEDDING_TEMPLATE, embedding_template(base, module.pooling, text_only))
    else:
        _write_template(out, RERANK_TEMPLATE, rerank_template(base, text_only))
    atomic_write(out / "README.md", vllm_card(module))
    return out


def vllm_command(module: EmbeddingModule | RerankModule) -> list[str]:
    """The `vllm serve` command lines for the folder (MODEL: its path)."""
    pooler: dict[str, Any] = {"pooling_type": _vllm_pooling(module), "use_activation": True}
    if isinstance(module, EmbeddingModule):
        convert, template, overrides = "embed", EMBEDDING_TEMPLATE, []
        if module.dim is not None:  # vLLM cuts to `dimensions` (its default for every request) before normalising
            pooler["dimensions"] = module.dim
            overrides = [f"  --hf-overrides '{json.dumps({'matryoshka_dimensions': [module.dim]})}' \\"]
    else:
        tokenizer = module.processor.tokenizer
        c = module.collator()
        tokens = tokenizer.convert_ids_to_tokens([c.no_id, c.yes_id])
        hf = json.dumps({"classifier_from_token": tokens, "method": "from_2_way_softmax"})
        convert, template, overrides = "classify", RERANK_TEMPLATE, [f"  --hf-overrides '{hf}' \\"]
    return [
        f'vllm serve "$MODEL" --runner pooling --convert {convert} \\',
        *overrides,
        f'  --chat-template "$MODEL/{TEMPLATE_FOLDER}/{template}.jinja" --chat-template-content-format openai \\',
        f"  --pooler-config '{json.dumps(pooler)}'",
    ]


def vllm_card(module: EmbeddingModule | RerankModule) -> str:
    """The vLLM folder's README.md: the `vllm serve` command, a request, and what the server computes."""
    command = ["```bash", "MODEL=path/to/this/folder", *vllm_command(module), "```"]
    if isinstance(module, EmbeddingModule):
        kind = "retriever"
        request = {
            "model": "MODEL",
            "messages": [
                {"role": "system", "content": "Find the picture of this shape."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "file:///path/to/a.jpg"}},
                        {"type": "text", "text": "a blue square"},
                    ],
                },
            ],
            "encoding_format": "float",
        }
        what = [
            "## What the server computes",
            "",
            "POST the input as chat messages to `/v1/embeddings` (a system message is the query's instruction, "
            "optional; the user message holds an image, a text or both):",
            "",
            "```json",
            json.dumps(request, indent=2),
            "```",
            "",
            "The chat template renders them as lamra-pl does: " + _embedding_chat(module),
            "",
            f"The rendered input ends {_rendered_end(module)}; `--convert embed` with "
            + (
                "`pooling_type: MEAN` averages the last layer's states (after the final norm) over every token"
                if module.pooling == "mean"
                else "`pooling_type: LAST` reads the last layer's state (after the final norm) there"
            )
            + " and `use_activation` L2-normalises it: lamra-pl's embedding. "
            + _vllm_dimensions(module)
            + _instructions(module)
            + _cut(module, template=True),
        ]
    else:
        kind = "reranker"
        request = {
            "model": "MODEL",
            "queries": "Find the picture of this shape. A blue square.",
            "documents": [{"content": [{"type": "image_url", "image_url": {"url": "file:///path/to/a.jpg"}}]}],
        }
        what = [
            "## What the server computes",
            "",
            "POST (query, candidate) pairs to `/score` (or `/rerank`); a query's instruction is part of its text:",
            "",
            "```json",
            json.dumps(request, indent=2),
            "```",
            "",
            "The chat template (a score template: `query` and `document` messages) renders LamRA-Rank's pointwise "
            f"prompt: the instruction {POINTWISE_INSTRUCTION!r}, `Query:`, the query (image, then text), "
            "`Candidate:`, the candidate, then the generation prompt. " + _yes_no(module),
            "",
            "`--convert classify` with `classifier_from_token` and `method: from_2_way_softmax` makes the LM head's "
            "two rows one classifier, logit(Yes) - logit(No), read at the last token; its sigmoid "
            "(`use_activation`) is that P(Yes). lamra-pl's listwise scores have no vLLM form."
            + _cut(module, template=True),
        ]
    return "\n".join(
        [
            "---",
            "library_name: vllm",
            f"tags: [lamra-pl, vllm, {'feature-extraction' if kind == 'retriever' else 'text-ranking'}]",
            "---",
            "",
            f"# A lamra-pl {kind} for vLLM",
            "",
            f"Written by `lamra-pl export --to vllm`: the merged model (base `{module.backbone.spec.path}`) and "
            f"the chat template `{TEMPLATE_FOLDER}/{EMBEDDING_TEMPLATE if kind == 'retriever' else RERANK_TEMPLATE}"
            ".jinja`. Serve it with:",
            "",
            *command,
            "",
            "The flags are those of vLLM's pooling-model documentation (`--runner`/`--convert` from vLLM 0.10, "
            "`--pooler-config` with `use_activation` in current releases; releases up to 0.15 spell the JSON "
            '`{"pooling_type": "LAST", "normalize": true}`, and before 0.11 the flag `--override-pooler-config`). '
            "`--chat-template-content-format openai` hands the template the messages' parts (images, texts) as "
            "they are. Positions are the model's own (mRoPE for Qwen2-VL images), as lamra-pl's.",
            "",
            *what,
            "",
            *_training(module),
        ]
    )


# ---------------------------------------------------------------------------------- shared by the targets
def _check_served(source: Source, target: str) -> None:
    """What neither sentence-transformers nor vLLM computes: they run the backbone's own forward with its own
    positions and pool one position (or a mean)."""
    where = source.path
    if issubclass(source.cls, CLIPModule):
        raise LamraError(
            f"{where} is a CLIPModule checkpoint (open_clip's model), which export --to {target} does not write; "
            "index, retrieve and search read it as it is"
        )
    if issubclass(source.cls, EmbeddingModule) and source.argument("pooling") == "latent_attention":
        raise LamraError(
            f"{where} pools with trained latent attention over every token (pooling: latent_attention), which "
            f"{target} cannot compute (it reads one token's or the mean state); export --to peft keeps it "
            f"({POOLING_FILE})"
        )
    if source.backbone.get("system_prompt", "default") != "default":
        raise LamraError(
            f"{where} reads its chats with system_prompt {source.backbone['system_prompt']!r}; the exported chat "
            f"templates write the template's own system turn, so {target} would read other inputs; export --to "
            "peft keeps the setting"
        )
    if issubclass(source.cls, EmbeddingModule) and source.argument("exclude_instruction"):
        raise LamraError(
            f"{where} leaves the query's instruction tokens out of its mean (exclude_instruction: true); {target} "
            "pools every token of the rendered input (the instruction sits inside the chat, not at its start where "
            "a prompt length could cut it); export --to peft keeps it"
        )
    if source.backbone.get("attention", "causal") == "bidirectional":
        if target == "vllm":
            raise LamraError(
                f"{where} runs its decoder bidirectionally (backbone.attention: bidirectional); vLLM's decoder "
                "implementations attend causally; export --to sentence-transformers or --to peft keeps it"
            )
        if source.argument("pooling") == "before_emb":
            raise LamraError(
                f"{where} pools before {EMB_TOKEN} with a bidirectional decoder, whose state there also reads the "
                f"tokens after it; {target}'s template ends the input before {EMB_TOKEN}, so it would compute "
                "another state; export --to peft keeps it"
            )
    if source.backbone.get("rope", "model") == "1d" and not source.text_only:
        raise LamraError(
            f"{where} ran its backbone with sequential positions (rope: 1d); {target} runs it with the model's own "
            "(mRoPE), which differ for every input with an image; export --to peft, whose README says how to set "
            "them"
        )


def _merged(module: EmbeddingModule | RerankModule, out: Path) -> bool:
    """Write `lamra-pl merge`'s model folder of `module` into `out`; whether the backbone is text-only. Merging
    changes the module's model in place (its adapter is folded into the weights, which take the base's dtype)."""
    save_merged(module, out, base_dtype(module.backbone.spec.path))
    return family_of(model_type(module.backbone.spec.path)).text_only


def _write_template(out: Path, name: str, template: str) -> None:
    atomic_write(out / TEMPLATE_FOLDER / f"{name}.jinja", template)


def _embedding_chat(module: EmbeddingModule) -> str:
    """How the retriever's input chat is built, in prose with LamRA's prompts."""
    return "\n".join(
        [
            "a user turn holding the image (if any), then the text in LamRA's prompt for its modality, and an "
            f"assistant turn `{ASSISTANT}`.",
            "",
            *(f"- {modality}: `{template!r}`" for modality, template in PROMPTS.items()),
        ]
    )


def _rendered_end(module: EmbeddingModule) -> str:
    if module.pooling == "before_emb":
        return (
            f"just before `{EMB_TOKEN}` (the template cuts the chat there, after the assistant turn's opening), so "
            f"its last token is the one lamra-pl pools"
        )
    if module.pooling == "mean":
        return "with the whole chat, as lamra-pl renders it (`pooling: mean`): lamra-pl averages over all its tokens"
    return "with the whole chat, as lamra-pl renders it (`pooling: last_token`), so its last token is lamra-pl's"


def _vllm_pooling(module: EmbeddingModule | RerankModule) -> str:
    """vLLM's `pooling_type` for the module: MEAN for a mean-pooled retriever, otherwise the last token."""
    return "MEAN" if isinstance(module, EmbeddingModule) and module.pooling == "mean" else "LAST"


def _attention(module: EmbeddingModule) -> str:
    if module.backbone.spec.attention == "causal":
        return ""
    return (
        " The decoder attends bidirectionally: config.json's text config says `is_causal: false`, which "
        "transformers' own forward reads (keep it when you copy the folder)."
    )


def _instructions(module: EmbeddingModule) -> str:
    if not module.instructions:
        return "This model was trained without task instructions: give none."
    return (
        "A query's text is `format_text(INSTRUCTION + ' ' + TEXT)` (`lamra_pl.formats.sample.with_instruction`: "
        "stripped, capitalised, ending in punctuation); candidates carry no instruction."
    )


def _yes_no(module: RerankModule) -> str:
    return (
        f"A (query, candidate) pair scores P({YES}) = softmax(logit of {YES!r}'s first token, logit of {NO!r}'s first "
        "token) at the prompt's last token."
    )


def _training(module: EmbeddingModule | RerankModule) -> list[str]:
    """How the model was trained, from the module's own recorded arguments."""
    args = module_arguments(module)
    lora = args.get("lora")
    adapter = (
        f"LoRA r={lora['r']}, alpha={lora['alpha']} on {', '.join(lora['targets'])} (merged into the weights here)"
        if isinstance(lora, dict)
        else "no LoRA (fully fine-tuned language model, or a folder already merged)"
    )
    if isinstance(module, EmbeddingModule):
        objective = (
            f"InfoNCE (query -> candidate, in-batch and hard negatives), temperature {args.get('temperature', 0.05)}"
            f", pooling `{module.pooling}`, task instructions {'on' if module.instructions else 'off'}"
        )
        distill = args.get("distill")
        if isinstance(distill, dict):  # its last fit: distilled from a reranker (lamra_pl.models.distill)
            objective = (
                f"distillation from a reranker: {distill.get('weight')} x KL(teacher || student) over each query's "
                f"candidate list (teacher temperature {distill.get('teacher_temperature')}) + "
                f"{distill.get('infonce_weight')} x {objective}"
            )
    else:
        objective = (
            "causal-LM loss on the answer tokens of LamRA-Rank's pointwise (Yes/No) and listwise chats, weights "
            f"{args.get('pointwise_weight', 1.0)} and {args.get('listwise_weight', 1.0)}"
        )
    return [
        "## How it was trained",
        "",
        f"lamra-pl `{type(module).__name__}` on `{module.backbone.spec.path}`: {objective}; {adapter}; texts cut to "
        f"{module.max_text_tokens} tokens. `{SETTINGS_FILE}` holds every setting as lamra-pl records them (lamra-pl "
        "reads this folder as a model folder too).",
        "",
    ]


def _cut(module: EmbeddingModule | RerankModule, template: bool = False) -> str:
    """The text cut, said for a reader who builds the inputs (or, `template`, whose library renders them)."""
    if module.max_text_tokens is None:
        return ""
    if not template:
        return f" Texts are cut to {module.max_text_tokens} tokens before the prompt is built."
    return (
        f" lamra-pl cuts texts to {module.max_text_tokens} tokens before the prompt is built; a chat template "
        "cannot count tokens, so inputs with longer texts differ unless you cut them first."
    )


def _pooling(module: EmbeddingModule) -> str:
    if module.pooling == "before_emb":
        return f"the token just before the first `{EMB_TOKEN}`"
    if module.pooling == "last_token":
        return "the last non-padding token"
    if module.pooling == "mean":
        left_out = ", less the tokens of a query's task instruction" if module.exclude_instruction else ""
        return f"every real token, averaged (`pooling: mean`{left_out})"
    return (
        f"every real token, pooled by latent attention (`lamra_pl.models.pooling.LatentAttentionPooling`, its weights "
        f"in `{POOLING_FILE}`)"
    )


def _matryoshka(module: EmbeddingModule) -> str:
    """The Matryoshka cut (`dim`), said for a reader who computes the embedding."""
    if module.dim is None:
        return ""
    return (
        f" Then its first {module.dim} values (of {module.full_dim}) are L2-normalised again: this model embeds at "
        f"Matryoshka dimension {module.dim} (lamra-pl's `dim` setting)."
    )


def _st_truncation(module: EmbeddingModule) -> str:
    """How sentence-transformers applies the Matryoshka cut (`truncate_dim`, after `Normalize`)."""
    if module.dim is None:
        return ""
    return (
        f" This model embeds at Matryoshka dimension {module.dim} (lamra-pl's `dim` setting): "
        f"config_sentence_transformers.json's `truncate_dim: {module.dim}` cuts each embedding to its first "
        f"{module.dim} values after `Normalize`, so `encode` gives them as lamra-pl's unit vectors times a "
        "positive factor: the cosine, and every ranking, is the same; `encode(..., normalize_embeddings=True)` "
        "normalises them again (lamra-pl's vectors)."
    )


def _vllm_dimensions(module: EmbeddingModule) -> str:
    """How vLLM applies the Matryoshka cut (`dimensions`, before its normalisation)."""
    if module.dim is None:
        return ""
    return (
        f"This model embeds at Matryoshka dimension {module.dim} (lamra-pl's `dim` setting): `--hf-overrides` "
        f"declares it (`matryoshka_dimensions`, which vLLM requires before it cuts) and the pooler config's "
        f"`dimensions: {module.dim}` (vLLM 0.11 and later) makes it every request's default; vLLM cuts the state to "
        f"its first {module.dim} values before it L2-normalises, as lamra-pl does (on an earlier release, or to be "
        f'explicit, send `"dimensions": {module.dim}` with each request). '
    )


class Exporter(NamedTuple):
    check: Callable[[Source, Request], None]  # refuses, before the model is built, what the target cannot express
    write: Callable[[TrainingModule, Path, Request], Path]


TARGETS: dict[str, Exporter] = {
    "peft": Exporter(check_peft, to_peft),
    "sentence-transformers": Exporter(check_sentence_transformers, to_sentence_transformers),
    "vllm": Exporter(check_vllm, to_vllm),
}
