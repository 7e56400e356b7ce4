"""Chat templates that make another library render an input exactly as lamra-pl's collators do.

sentence-transformers and vLLM take an input as chat messages and render it with a chat template; neither runs
lamra-pl's collators. The templates here take the messages those libraries build and rebuild from them the chat the
collator would have built, then render it with the backbone's own template (pasted inside, so any backbone family
works), in its non-thinking form as the collators render it (`backbone.render_chats`). What they read:

* a `system` message: the task instruction (a query's), prepended to the text as `with_instruction` does
  (`format_text(INSTRUCTION + " " + TEXT)`: stripped, capitalised, ending in punctuation); sentence-transformers puts
  its `prompt` there, vLLM takes it from the request's messages;
* the other messages' parts: images (`{"type": "image", ...}`, also `image_url`), kept in order and handed to the
  backbone's template as they are (the library pairs them with the image data), and text parts, joined.

`embedding_template`: the retriever's chat (`embedding_inputs.embedding_messages`: LamRA's prompt for the modality,
assistant turn `<emb>.`), cut just before the first `<emb>` when the module pools there ("before_emb"), so the last
token of the rendered text is the pooled one and a library's last-token pooling reads it; whole for "last_token"
and "mean" (a library's mean pooling then averages the tokens lamra-pl averages).
`rerank_template`: the reranker's pointwise chat (`rerank_inputs.pointwise_messages`) from a `query` and a `document`
message (vLLM's score-template roles), with the generation prompt: the last token is the one whose yes/no logits
score the pair. A text-only backbone's template gets string contents (as `backbone.TextProcessor` flattens them) and
refuses an image.

The collators also cut a text to `max_text_tokens` tokens before the prompt is built; a template cannot count
tokens, so inputs with longer texts differ (the model cards say so).
"""

from __future__ import annotations

import json

from lamra_pl.models.backbone import EMB_TOKEN, chat_template_of
from lamra_pl.models.embedding_inputs import ASSISTANT, PROMPTS
from lamra_pl.models.pooling import Pooling
from lamra_pl.models.rerank_inputs import POINTWISE_INSTRUCTION

# Their names in a model folder: `additional_chat_templates/<name>.jinja`, which transformers loads as a named
# template beside the folder's default one (`apply_chat_template(..., chat_template=NAME)`).
EMBEDDING_TEMPLATE = "lamra_embedding"
RERANK_TEMPLATE = "lamra_rerank"
TEMPLATE_FOLDER = "additional_chat_templates"

# Collects the parts of `messages` into ns: the system text (the instruction), and per role group the images and
# the joined text (none when there is no text part). `ROLES` is a Jinja mapping role -> group name.
_COLLECT = r"""
{%- set ns = namespace(instruction='', query_text=none, query_images=[], document_text=none,
    document_images=[]) -%}
{%- for message in messages -%}
{%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string
    else message['content'] -%}
{%- set group = @ROLES@.get(message['role']) -%}
{%- if message['role'] != 'system' and group is none -%}
{{- raise_exception('lamra-pl template: a message of role ' ~ message['role'] ~ ' has no place here (roles: '
    ~ 'system, ' ~ (@ROLES@.keys() | join(', ')) ~ ')') -}}
{%- endif -%}
{%- for part in parts -%}
{%- set kind = part['type'] if part is mapping and 'type' in part else 'text' -%}
{%- if message['role'] == 'system' -%}
{%- if kind == 'text' -%}{%- set ns.instruction = ns.instruction ~ part['text'] -%}{%- endif -%}
{%- elif kind in ('image', 'image_url', 'input_image') -%}
{%- if group == 'query' -%}{%- set ns.query_images = ns.query_images + [part] -%}
{%- else -%}{%- set ns.document_images = ns.document_images + [part] -%}{%- endif -%}
{%- elif kind == 'text' -%}
{%- if group == 'query' -%}
{%- set ns.query_text = part['text'] if ns.query_text is none else ns.query_text ~ part['text'] -%}
{%- else -%}
{%- set ns.document_text = part['text'] if ns.document_text is none else ns.document_text ~ part['text'] -%}
{%- endif -%}
{%- else -%}
{{- raise_exception('lamra-pl template: an input part of type ' ~ kind ~ ' is neither text nor an image') -}}
{%- endif -%}
{%- endfor -%}
{%- endfor -%}
{%- if ns.instruction -%}
{%- set t = (ns.instruction ~ ' ' ~ (ns.query_text or '')).replace('\r', '').strip().strip('"').strip() -%}
{%- if t -%}
{%- set t = t[0].upper() ~ t[1:] -%}{%- if t[-1] not in '.?!' -%}{%- set t = t ~ '.' -%}{%- endif -%}
{%- endif -%}
{%- set ns.query_text = t -%}
{%- endif -%}
"""

_NO_IMAGES = (
    "{%- if ns.query_images or ns.document_images -%}"
    "{{- raise_exception('lamra-pl template: this backbone is a text-only causal LM; it reads no images') -}}"
    "{%- endif -%}"
)


def embedding_template(base: str, pooling: Pooling, text_only: bool) -> str:
    """The retriever's chat around `base` (the backbone's chat template): a user turn (the image, then the text in
    LamRA's prompt for its modality) and the assistant turn `<emb>.`, rendered without a generation prompt; cut just
    before `<emb>` for "before_emb" pooling, whole otherwise ("last_token", "mean"). `pooling` "latent_attention"
    has no last token to read: refused by the exporters before this is called."""
    text_pre, text_post = PROMPTS["text"].split("{text}")
    both_pre, both_post = PROMPTS["image,text"].split("{text}")
    image_only = PROMPTS["image"]
    prompt = "\n".join(
        [
            "{%- if ns.query_images and ns.query_text is not none -%}",
            f"{{%- set prompt = {_literal(both_pre)} ~ ns.query_text ~ {_literal(both_post)} -%}}",
            "{%- elif ns.query_images -%}",
            f"{{%- set prompt = {_literal(image_only)} -%}}",
            "{%- else -%}",
            f"{{%- set prompt = {_literal(text_pre)} ~ (ns.query_text or '') ~ {_literal(text_post)} -%}}",
            "{%- endif -%}",
        ]
    )
    if text_only:
        chat = f"[{{'role': 'user', 'content': prompt}}, {{'role': 'assistant', 'content': {_literal(ASSISTANT)}}}]"
    else:
        user = "{'role': 'user', 'content': ns.query_images + [{'type': 'text', 'text': prompt}]}"
        chat = f"[{user}, {{'role': 'assistant', 'content': [{{'type': 'text', 'text': {_literal(ASSISTANT)}}}]}}]"
    rendered = _render(base, chat, generation_prompt=False)
    if pooling == "before_emb":
        rendered = rendered.replace("{{- rendered -}}", f"{{{{- rendered.split({_literal(EMB_TOKEN)})[0] -}}}}")
    return "\n".join(
        [_header("embedding"), _collect({"user": "query"}), _NO_IMAGES if text_only else "", prompt, rendered]
    )


def rerank_template(base: str, text_only: bool) -> str:
    """The reranker's pointwise chat around `base`: LamRA-Rank's instruction, "Query:", the query (image, text),
    "Candidate:", the candidate (image, text), from the `query` and `document` messages (a `user` message is the
    query), rendered with the generation prompt."""
    parts = (
        f"{{%- set parts = [{{'type': 'text', 'text': {_literal(POINTWISE_INSTRUCTION)}}}, "
        "{'type': 'text', 'text': 'Query:'}] + ns.query_images"
        " + ([{'type': 'text', 'text': ns.query_text}] if ns.query_text is not none else [])"
        " + [{'type': 'text', 'text': 'Candidate:'}] + ns.document_images"
        " + ([{'type': 'text', 'text': ns.document_text}] if ns.document_text is not none else []) -%}"
    )
    if text_only:
        chat = "[{'role': 'user', 'content': parts | map(attribute='text') | join('')}]"
    else:
        chat = "[{'role': 'user', 'content': parts}]"
    roles = {"user": "query", "query": "query", "document": "document"}
    rendered = _render(base, chat, generation_prompt=True)
    return "\n".join([_header("pointwise reranker"), _collect(roles), _NO_IMAGES if text_only else "", parts, rendered])


# The chat template a processor (or a text-only backbone's tokenizer) renders with by default.
base_template = chat_template_of


def _render(base: str, chat: str, generation_prompt: bool) -> str:
    # The base template renders inside a block assignment, so that its output can be cut. `{{ '' }}` on both sides
    # keeps Jinja's trim_blocks/lstrip_blocks (transformers' settings) from touching the base's first and last
    # whitespace, which the block tags would otherwise border.
    return "\n".join(
        [
            f"{{%- set messages = {chat} -%}}",
            f"{{%- set add_generation_prompt = {'true' if generation_prompt else 'false'} -%}}",
            # The collators render in the non-thinking form (`backbone.render_chats`); other templates ignore it.
            "{%- set enable_thinking = false -%}",
            "{#- The backbone's own chat template: -#}",
            "{%- set rendered %}{{ '' }}" + base + "{{ '' }}{% endset -%}",
            "{{- rendered -}}",
        ]
    )


def _collect(roles: dict[str, str]) -> str:
    # Every tag trims the whitespace around it (`{%-`, `-%}`), so the line breaks between them render as nothing.
    return _COLLECT.strip().replace("@ROLES@", json.dumps(roles))


def _header(kind: str) -> str:
    return (
        f"{{#- lamra-pl {kind} chat template (lamra_pl.models.export_templates): the input rebuilt as lamra-pl's "
        "collator builds it, rendered with the backbone's own template below. -#}"
    )


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text)
