"""LamRA's embedding prompts, the retriever's choice of a training example from a record, and the collator that
turns examples into processor batches.

Every input is a two-turn chat whose assistant turn is the literal `<emb>.` (LamRA, spec section 1); the
embedding is read at the position just before `<emb>` (or pooled otherwise: `pooling`). The collator runs in the
data workers. For a pooling that leaves the query's task instruction out, it also marks the instruction's tokens
(`instruction_mask`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import Item, Record, instruction_chars, with_instruction
from lamra_pl.models.backbone import EMB_TOKEN, render_chats
from lamra_pl.models.distill import DistillSpec
from lamra_pl.models.video import EMBEDDING_FRAMES, budget_of, video_inputs, video_tokens

# LamRA's user-turn templates; note the trailing space. The video ones are LamRA's zero-shot video code's (MSR-VTT,
# MSVD), which reads a video as one `{"type": "video"}` part where an image has its image part.
PROMPTS = {
    "text": "{text}\nSummarize above sentence in one word: ",
    "image": "\nSummarize above image in one word: ",
    "image,text": "{text}\nSummarize above image and sentence in one word: ",
    "video": "\nSummarize above video in one word: ",
    "video,text": "{text}\nSummarize above video and sentence in one word: ",
}
# An interleaved item (`Item.parts`: VIST's stories, multi-turn FashionIQ's sessions): its instruction, its parts in
# order, then this line, LamRA's VIST code's. (Its multi-turn FashionIQ code ends with the single-image line,
# "image and sentence", after several images: the one place this project's prompt differs from that code's.)
INTERLEAVED_PROMPT = "\nSummarize above images and sentences in one word: "
ASSISTANT = f"{EMB_TOKEN}."


@dataclass
class Example:
    """One training example after sampling: the query (instruction applied), one positive, k negatives, the
    record's task id (None: it has none); for distillation (`model.distill`), the query's candidate list and the
    teacher's score of each."""

    query: Item
    positive: Item
    negatives: list[Item]
    positive_ids: list[str]
    task_id: int | None = None
    candidates: list[Item] = field(default_factory=list)
    teacher_scores: list[float] = field(default_factory=list)


def choose_example(record: Record, rng: random.Random | None, num_negatives: int, instructions: bool = True) -> Example:
    """One positive, one instruction (prepended to the query text) and `num_negatives` negatives of a record.

    `rng=None` is the deterministic evaluation choice: the first of each. `instructions=False` leaves the query
    text bare (the "no instruction" ablation).
    """
    instruction_choices = record.instructions if instructions else []
    if rng is None:
        positive = record.positives[0]
        instruction = instruction_choices[0] if instruction_choices else None
        negatives = record.negatives[:num_negatives]
    else:
        # LamRA's call order: positive, then instruction.
        positive = rng.choice(record.positives)
        instruction = rng.choice(instruction_choices) if instruction_choices else None
        negatives = rng.sample(record.negatives, num_negatives)
    query = replace(record.query, id=record.qid, text=with_instruction(instruction, record.query.text), source=None)
    query = replace(query, instruction_chars=instruction_chars(instruction, record.query.text))
    task = record.task_id
    if task is not None and (isinstance(task, bool) or not isinstance(task, int) or task < 0):
        raise BadSampleError(f"qid {record.qid}: task_id {task!r} is neither null nor a non-negative integer")
    return Example(query, positive, negatives, [p.id for p in record.positives], task)


def with_teacher_list(example: Example, record: Record, spec: DistillSpec) -> Example:
    """`example` with the record's candidate list and teacher scores (its best-ranked `spec.candidates`, or the
    whole list), in order: no draw, so the same record always gives the same list. A record without a list, or with
    a shorter one, is a BadSampleError (a counted skip in training)."""
    if not record.candidates:
        raise BadSampleError(
            f"query {record.qid} carries no candidate list with teacher scores: model.distill trains on the shards "
            "`lamra-pl distill-data` writes"
        )
    n = len(record.candidates) if spec.candidates is None else spec.candidates
    if len(record.candidates) < n:
        raise BadSampleError(
            f"query {record.qid}: a list of {len(record.candidates)} candidates, model.distill.candidates is {n}"
        )
    example.candidates, example.teacher_scores = record.candidates[:n], record.teacher_scores[:n]
    return example


def stable_id(value: str) -> int:
    """A process-independent non-negative int64 for a string id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def truncate_text(tokenizer: Any, item: Item, max_tokens: int | None) -> Item:
    """`item` with its text cut to `max_tokens` tokens (an encode/decode round trip, as LamRA does). The instruction
    at its head keeps the characters the cut text still shares with it."""
    if item.text is None or max_tokens is None:
        return item
    ids = tokenizer(item.text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return item
    text = tokenizer.decode(ids[:max_tokens])
    shared = min(len(item.text), len(text))  # characters the cut text shares with the original's head
    shared = next((i for i in range(shared) if item.text[i] != text[i]), shared)
    return replace(item, text=text, instruction_chars=min(item.instruction_chars, shared))


def embedding_messages(item: Item) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if item.parts is not None:  # LamRA's VIST layout: the instruction, the parts in order, the prompt
        content = [{"type": "text", "text": item.text}] if item.text is not None else []
        content += [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in item.parts]
        content.append({"type": "text", "text": INTERLEAVED_PROMPT})
        return [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT}]},
        ]
    if item.image is not None:
        content.append({"type": "image"})
    if item.video is not None:
        content.append({"type": "video"})
    content.append({"type": "text", "text": PROMPTS[item.modality].format(text=item.text)})
    return [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT}]},
    ]


class EmbeddingCollator:
    """Examples -> {"query": BatchFeature, "candidates": BatchFeature, ids, task ids} for the EmbeddingModule.

    Candidates are laid out `[positives (B); negatives (B*k, query-major)]`, and with `distill` (`DistillSpec`)
    each record's candidate list after them, `[...; lists (B*K, query-major)]`, with "teacher_scores" [B, K]
    (float32) in the batch. Texts longer than `max_text_tokens` are cut by tokens before the prompt is built, so
    `<emb>` can never be cut off.
    `instructions=False` leaves queries without their task instruction, in training and evaluation alike.
    `instruction_mask=True` adds to every processor batch an "instruction_mask" [B, L] (`instruction_mask`), for a
    pooling that leaves the instruction out.
    With `chunk_size` (GradCache), "query" and "candidates" are lists of processor batches of at most that many
    rows each, in order: each chunk is padded on its own, so no chunk pays for the longest input of the batch.
    """

    distill: DistillSpec | None = None  # the default of a subclass that does not call this __init__ (CLIPCollator)

    def __init__(
        self,
        processor: ProcessorMixin,
        max_text_tokens: int | None = 480,
        chunk_size: int | None = None,
        instructions: bool = True,
        distill: DistillSpec | None = None,
        instruction_mask: bool = False,
    ) -> None:
        self.processor = processor
        self.max_text_tokens = max_text_tokens
        self.chunk_size = chunk_size
        self.instructions = instructions
        self.distill = distill
        self.instruction_mask = instruction_mask

    def choose(self, record: Record, rng: random.Random | None, num_negatives: int) -> Example:
        example = choose_example(record, rng, num_negatives, self.instructions)
        return example if self.distill is None else with_teacher_list(example, record, self.distill)

    def encode(self, items: list[Item]) -> BatchFeature:
        items = [self._truncated(item) for item in items]
        videos = video_inputs(self.processor, items, EMBEDDING_FRAMES)  # {} without videos; refuses them first
        texts = render_chats(self.processor, [embedding_messages(item) for item in items], generation_prompt=False)
        images = [image for item in items for image in item.images]
        # The rendered chat holds its special tokens already (a Mistral template writes <s>): add none.
        batch = self.processor(
            text=texts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False, **videos
        )
        if self.instruction_mask:
            batch["instruction_mask"] = instruction_mask(self.processor.tokenizer, items, texts, batch)
        return batch

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        k = len(examples[0].negatives)
        if any(len(e.negatives) != k for e in examples):
            raise LamraError("all examples of a batch must carry the same number of hard negatives")
        lists = {len(e.candidates) for e in examples}
        if len(lists) > 1:
            raise LamraError(
                f"the examples of a batch carry candidate lists of {sorted(lists)} candidates: set "
                "model.distill.candidates to at most the shortest, or write every list with one `distill-data --k`"
            )
        candidates = [e.positive for e in examples] + [n for e in examples for n in e.negatives]
        candidates += [c for e in examples for c in e.candidates]
        width = max(len(e.positive_ids) for e in examples)
        positive_ids = torch.full((len(examples), width), -1, dtype=torch.long)
        for row, e in enumerate(examples):
            positive_ids[row, : len(e.positive_ids)] = torch.tensor([stable_id(i) for i in e.positive_ids])
        batch = {
            "query": self._encode_rows([e.query for e in examples]),
            "candidates": self._encode_rows(candidates),
            "query_ids": [e.query.id for e in examples],
            "candidate_ids": torch.tensor([stable_id(c.id) for c in candidates], dtype=torch.long),
            "positive_ids": positive_ids,
            # each query's task id, -1 for none (per-task temperatures: `loss_spec.LossSpec.task_temperatures`)
            "task_ids": torch.tensor([-1 if e.task_id is None else e.task_id for e in examples], dtype=torch.long),
        }
        if lists != {0}:
            batch["teacher_scores"] = torch.tensor([e.teacher_scores for e in examples], dtype=torch.float32)
        return batch

    def _encode_rows(self, items: list[Item]) -> BatchFeature | list[BatchFeature]:
        if self.chunk_size is None:
            return self.encode(items)
        return [self.encode(items[s : s + self.chunk_size]) for s in range(0, len(items), self.chunk_size)]

    def _truncated(self, item: Item) -> Item:
        return truncate_text(self.processor.tokenizer, item, self.max_text_tokens)

    def length(self, item: Item) -> int:
        """About how many tokens `item` becomes (text tokens + one per 28x28 image patch): the bucketing key."""
        n = 0
        if item.text is not None:
            n += len(self.processor.tokenizer(item.text, add_special_tokens=False)["input_ids"])
            if self.max_text_tokens is not None:
                n = min(n, self.max_text_tokens)
        for text in item.parts or ():
            if isinstance(text, str):
                n += len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        for image in item.images:
            n += image.width * image.height // (28 * 28)
        return n + video_tokens(item, budget_of(self.processor), EMBEDDING_FRAMES)


def instruction_mask(tokenizer: Any, items: list[Item], texts: list[str], batch: BatchFeature) -> torch.Tensor:
    """[B, L] bool: True at the tokens of each row's task instruction (the first `item.instruction_chars`
    characters of its text; a token that overlaps them counts), False elsewhere (padding included).

    The rendered chat `texts[b]` is tokenised alone, with character offsets, to find the instruction's tokens. The
    processor's own tokens differ from those only where it expands an image placeholder, which comes before the
    text in the chat (`embedding_messages`): so the tokens from the instruction to the end of the row are the same,
    and are found at the end of the row's real tokens; that they match is checked.
    """
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, (item, text) in enumerate(zip(items, texts, strict=True)):
        if not item.instruction_chars or item.text is None:
            continue
        if item.parts is not None:
            raise LamraError(
                f"{item.id}: an interleaved item's images follow its instruction, so its instruction tokens cannot be "
                "located after them: exclude_instruction is for items of one image or video"
            )
        # Every prompt goes on after the text with a line break, which an instruction-bearing text never ends in.
        start = text.rfind(item.text + "\n")
        if start < 0:
            raise LamraError(f"{item.id}: its text is not in its rendered chat, so its instruction cannot be found")
        end = start + item.instruction_chars
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
        tail = encoded["input_ids"][inside[0] :]
        last = int(real[row].nonzero().max()) + 1  # one past the row's last real token (left or right padding)
        first = last - len(tail)
        if first < 0 or ids[row, first:last].tolist() != tail:
            raise LamraError(
                f"{item.id}: the processor's tokens after the instruction differ from the tokenizer's, so its "
                "instruction tokens cannot be located (exclude_instruction needs a fast tokenizer)"
            )
        mask[row, first : first + len(inside)] = True
    return mask
