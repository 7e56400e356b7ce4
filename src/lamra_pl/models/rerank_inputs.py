"""LamRA-Rank's chat prompts, and the collator that turns reranker examples into labelled processor batches.

Pointwise: the query and one candidate; the assistant answers "Yes" or "No". Listwise: the query and K candidates
numbered (1)..(K); the assistant answers "Ans: (k)" for the best one. The instruction texts are LamRA's, verbatim
(including its runs of spaces and the typo "responed"), so that LamRA-Rank checkpoints see the prompts they were
trained on (spec lamra.md section 4).

Zero-shot judging (MM-Embed, spec mmembed_mbeir.md section 4) is a third prompt, for scoring only: the query, the
candidate, then a yes/no question (`JudgePrompt`; by default MM-Embed's True/False question for the pair's task,
`judge_question`); the score is P(True) over {True, False} at the answer's first token, as P(Yes) is for LamRA's
pointwise prompt.

Training labels cover the assistant's answer and its end-of-turn token (`labels="answer"`), or, as LamRA's code
does, the whole assistant turn: the generation prompt's header before the answer and the template's newline after
the turn too (`labels="assistant_turn"`). Either is found from the chat template's own structure: the
conversation rendered with the answer must extend the prompt rendered with `add_generation_prompt=True` (without,
for the whole turn), and its tail (everything after the prompt) must tokenize to the same ids inside the sequence
as alone. Nothing depends on a tokenizer's special-token ids or on the padding side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from transformers import BatchFeature, ProcessorMixin

from lamra_pl.errors import BadSampleError, LamraError
from lamra_pl.formats.sample import Item, Record, with_instruction
from lamra_pl.models.backbone import render_chats
from lamra_pl.models.embedding_inputs import truncate_text
from lamra_pl.models.video import RERANK_FRAMES, video_inputs

POINTWISE_INSTRUCTION = (
    "I will provide you with a query and a candidate. Please evaluate whether the candidate"
    + " " * 24
    + "meets the requirements of the query. If it does, respond with 'Yes'; if it doesn't, responed with 'No'."
)
LISTWISE_INSTRUCTION = (
    "I will provide you with a query followed by multiple candidates in the format: (1) cand1 (2) cand2, etc. "
    "Each candidate is independent of the others."
    + " "
    * 25
    + "Evaluate each candidate against the query, and respond with the number corresponding to the candidate that "
    "best meets the requirements of the query."
)
YES, NO = "Yes", "No"
LIST_ANSWER = "Ans: ({})"
LIST_PREFIX = LIST_ANSWER.split("{}")[0]  # teacher-forced before the index at scoring time
MAX_LIST = 9  # candidate numbers must be single tokens; "(10)" would be two digits
IGNORE = -100  # the label of every position the loss skips
# The zero-shot judge's question for a task MM-Embed's wording does not cover (or a caller that names no task);
# {candidate} becomes the candidate's modality ("image", "text" or "image and text").
JUDGE_QUESTION = "Does the above {candidate} match the query? True or False"
CANDIDATE_WORDS = {
    "text": "text",
    "image": "image",
    "image,text": "image and text",
    "video": "video",
    "video,text": "video and text",
}
# MM-Embed's per-task wording (spec mmembed_mbeir.md section 4). The paper prints one question, for MSCOCO's
# text-to-image task: "Does the above daily-life image match the caption? True or False", i.e. "Does the above
# <the dataset's kind of candidate> match the <what the query is>?". The other M-BEIR tasks follow that pattern,
# with each dataset's kind of candidate taken from the words of its M-BEIR instructions (query_instructions.tsv:
# "everyday image", "news-related image", "Wikipedia passage", ...). Only the MSCOCO question is the paper's own.
JUDGE_DOMAINS = {  # dataset -> the adjective its instructions give its candidates
    "mscoco": "daily-life",
    "cirr": "daily-life",
    "visualnews": "news",
    "edis": "news",
    "fashion200k": "fashion",
    "fashioniq": "fashion",
    "webqa": "Wikipedia",
    "oven": "Wikipedia",
    "infoseek": "Wikipedia",
    "nights": "",
}
JUDGE_CANDIDATES = {"image": "{domain} image", "text": "{domain} passage", "image,text": "{domain} image and its text"}
JUDGE_CAPTIONS = {"image": "{domain} image", "text": "caption", "image,text": "{domain} image and its caption"}
JUDGE_QUERIES = {  # M-BEIR task id -> what the query is (lamra_pl.recipes.mbeir.TASKS)
    0: "caption",  # text -> image
    1: "question",  # text -> text (WebQA)
    2: "query",  # text -> image and text (EDIS headlines, WebQA questions)
    3: "image",  # image -> text: the candidate is a caption
    4: "reference image",  # image -> image (NIGHTS)
    5: "image",  # image -> image and text
    6: "image and question",  # image and text -> text (OVEN, InfoSeek)
    7: "reference image and its modification",  # image and text -> image (FashionIQ, CIRR)
    8: "image and question",  # image and text -> image and text (OVEN, InfoSeek)
}
QUESTION_DATASETS = {"webqa": "question", "edis": "headline"}  # what a text query of task 2 is, per dataset


def judge_question(dataset: str | None, task_id: int | None, candidate_modality: str) -> str:
    """MM-Embed's zero-shot question for a candidate of an M-BEIR task (`JUDGE_DOMAINS`); `JUDGE_QUESTION` for a
    dataset or task outside M-BEIR's (the candidate's modality filled in)."""
    if dataset not in JUDGE_DOMAINS or task_id not in JUDGE_QUERIES or candidate_modality not in JUDGE_CANDIDATES:
        return JUDGE_QUESTION.format(candidate=CANDIDATE_WORDS[candidate_modality])
    domain = JUDGE_DOMAINS[dataset]
    nouns = JUDGE_CAPTIONS if task_id == 3 else JUDGE_CANDIDATES
    candidate = " ".join(nouns[candidate_modality].format(domain=domain).split())
    query = QUESTION_DATASETS.get(dataset, JUDGE_QUERIES[task_id]) if task_id == 2 else JUDGE_QUERIES[task_id]
    return f"Does the above {candidate} match the {query}? True or False"


LabelSpan = Literal["answer", "assistant_turn"]


@dataclass(frozen=True)
class JudgePrompt:
    """A zero-shot pointwise prompt: "Query:" query, "Candidate:" candidate, then a question; the score is P(yes)
    over {yes, no} at the answer's first token. `question` None asks MM-Embed's question for the pair's task
    (`judge_question`); a text is asked for every task (it may name the candidate's modality as {candidate})."""

    question: str | None = None
    yes: str = "True"
    no: str = "False"

    def __post_init__(self) -> None:
        if self.question is None:
            return
        try:
            self.question.format(candidate="image")
        except (KeyError, IndexError, ValueError) as err:
            raise LamraError(
                f"judge question {self.question!r}: the only placeholder it may hold is {{candidate}} ({err!r})"
            ) from None

    def asks(self, candidate_modality: str, task: tuple[str, int] | None = None) -> str:
        """The question asked of a candidate of `task` ((dataset, M-BEIR task id); None: not known)."""
        if self.question is not None:
            return self.question.format(candidate=CANDIDATE_WORDS[candidate_modality])
        dataset, task_id = task if task is not None else (None, None)
        return judge_question(dataset, task_id, candidate_modality)


@dataclass
class RerankExample:
    """One query's reranker training chats: pointwise (candidate, is it a match) pairs, and one listwise list
    whose `answer` (1-based) is the position of the positive, or no list."""

    query: Item
    pointwise: list[tuple[Item, bool]]
    listwise: list[Item]
    answer: int | None


def _content(item: Item) -> list[dict[str, Any]]:
    # The chat template only needs the placeholder; the image (a video's item) rides along (under a key templates
    # ignore) so that `_images` (`_videos`) can hand the processor every image (video) in placeholder order. A video
    # is one `{"type": "video"}` part, as in LamRA's zero-shot video reranking code. An interleaved item is its text
    # (the instruction) then its parts in order, as LamRA's VIST and multi-turn FashionIQ reranking code has it.
    if item.parts is not None:
        head = [{"type": "text", "text": item.text}] if item.text is not None else []
        return head + [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "_image": p} for p in item.parts
        ]
    parts: list[dict[str, Any]] = [{"type": "image", "_image": item.image}] if item.image is not None else []
    if item.video is not None:
        parts.append({"type": "video", "_video": item})
    return parts + ([{"type": "text", "text": item.text}] if item.text is not None else [])


def pointwise_messages(query: Item, candidate: Item, answer: str | None = None) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": POINTWISE_INSTRUCTION}, {"type": "text", "text": "Query:"}]
    content += [*_content(query), {"type": "text", "text": "Candidate:"}, *_content(candidate)]
    return _chat(content, answer)


def listwise_messages(query: Item, candidates: list[Item], answer: int | None = None) -> list[dict[str, Any]]:
    content = [{"type": "text", "text": LISTWISE_INSTRUCTION}, {"type": "text", "text": "Query:"}]
    content += [*_content(query), {"type": "text", "text": "Candidates:"}]
    for i, candidate in enumerate(candidates, start=1):
        content += [{"type": "text", "text": f"({i}) "}, *_content(candidate)]
    return _chat(content, None if answer is None else LIST_ANSWER.format(answer))


def judge_messages(
    query: Item, candidate: Item, prompt: JudgePrompt, task: tuple[str, int] | None = None
) -> list[dict[str, Any]]:
    question = prompt.asks(candidate.modality, task)
    content = [{"type": "text", "text": "Query:"}, *_content(query), {"type": "text", "text": "Candidate:"}]
    return _chat([*content, *_content(candidate), {"type": "text", "text": question}], None)


def _chat(content: list[dict[str, Any]], answer: str | None) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def rerank_example(record: Record) -> RerankExample:
    """The example stored in a `lamra-pl rerank-data` sample (all choices were made, seeded, when it was written).

    The record's `rerank` field refers to its candidates by number: 0 is `positives[0]`, i > 0 is
    `negatives[i - 1]`: {"pointwise": [[0, true], [1, false]], "listwise": [2, 0, 1], "answer": 2}.
    """
    spec = record.rerank
    if spec is None:
        raise BadSampleError(
            f"sample {record.key!r} (qid {record.qid}) has no 'rerank' field: reranker training reads shards "
            "written by `lamra-pl rerank-data`"
        )
    candidates = [record.positives[0], *record.negatives]
    pointwise_refs = spec.get("pointwise") or []
    listwise_refs = spec.get("listwise") or []
    refs = [ref[0] if isinstance(ref, list) and ref else ref for ref in pointwise_refs] + list(listwise_refs)
    if not all(isinstance(i, int) and 0 <= i < len(candidates) for i in refs):
        raise BadSampleError(
            f"sample {record.key!r} (qid {record.qid}): the 'rerank' field refers to candidates {refs}, but the "
            f"sample holds {len(candidates)}"
        )
    pointwise = [(candidates[i], bool(label)) for i, label in pointwise_refs]
    listwise = [candidates[i] for i in listwise_refs]
    answer = spec.get("answer") if listwise else None
    if listwise and not (isinstance(answer, int) and 1 <= answer <= len(listwise)):
        raise BadSampleError(f"sample {record.key!r}: listwise answer {answer!r} is not in 1..{len(listwise)}")
    instruction = record.instructions[0] if record.instructions else None
    query = replace(record.query, id=record.qid, text=with_instruction(instruction, record.query.text), source=None)
    return RerankExample(query, pointwise, listwise, answer)


class RerankCollator:
    """Reranker examples -> one labelled batch of chats; and unlabelled prompts for scoring.

    Training batches lay rows out as [every pointwise chat; every listwise chat] and carry `labels` (IGNORE
    except at the answer tokens) and `kinds` (0 pointwise, 1 listwise) per row. With a `judge` prompt, pointwise
    scoring asks its question instead of LamRA's, and `yes_id`/`no_id` are its answer words' first tokens.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        max_text_tokens: int | None = 256,
        judge: JudgePrompt | None = None,
        labels: LabelSpan = "answer",
    ) -> None:
        if labels not in ("answer", "assistant_turn"):
            raise LamraError(f"model.labels must be 'answer' or 'assistant_turn', got {labels!r}")
        self.processor = processor
        self.labels = labels
        self.max_text_tokens = max_text_tokens
        self.judge = judge
        tokenizer = processor.tokenizer
        yes, no = (judge.yes, judge.no) if judge is not None else (YES, NO)
        self.yes_id, self.no_id = (self._first_token(w) for w in (yes, no))
        if self.yes_id == self.no_id:
            raise LamraError(f"the tokenizer starts {yes!r} and {no!r} with the same token: P({yes}) is undefined")
        prefix = tokenizer(LIST_PREFIX, add_special_tokens=False)["input_ids"]
        self.index_ids: list[int] = []
        for k in range(1, MAX_LIST + 1):
            ids = tokenizer(f"{LIST_PREFIX}{k}", add_special_tokens=False)["input_ids"]
            if ids[:-1] != prefix:
                raise LamraError(f"the tokenizer splits {LIST_PREFIX + str(k)!r} so that {k} is not one token")
            self.index_ids.append(ids[-1])
        self._refuse_answer_away_from_prompt()

    def _refuse_answer_away_from_prompt(self) -> None:
        """Scores are read where the generation prompt ends, and training teaches the answer there: a template that
        writes something else first (a thinking-only template opening a thinking block) is refused."""
        chat = _chat([{"type": "text", "text": "Query:"}], YES)
        [full] = render_chats(self.processor, [chat], generation_prompt=False)
        [prompt] = render_chats(self.processor, [chat[:-1]], generation_prompt=True)
        if not (full.startswith(prompt) and full[len(prompt) :].lstrip().startswith(YES)):
            after = full[len(prompt) :] if full.startswith(prompt) else full[-len(YES) - 40 :]
            raise LamraError(
                f"the chat template does not write the assistant's answer where its generation prompt ends (it "
                f"renders {after[:40]!r} there; a thinking block?): the answer would be scored and trained at a "
                "position it does not take. Use an instruct (non-thinking) checkpoint or template"
            )

    # ----------------------------------------------------------------------------------- training
    @staticmethod
    def choose(record: Record, rng: random.Random | None, num_negatives: int) -> RerankExample:
        return rerank_example(record)

    def __call__(self, examples: list[RerankExample]) -> dict[str, Any]:
        chats: list[list[dict[str, Any]]] = []
        for e in examples:
            q = self._truncated(e.query)
            chats += [pointwise_messages(q, self._truncated(c), YES if match else NO) for c, match in e.pointwise]
        n_pointwise = len(chats)
        for e in examples:
            if e.listwise:
                q = self._truncated(e.query)
                chats.append(listwise_messages(q, [self._truncated(c) for c in e.listwise], e.answer))
        if not chats:
            raise BadSampleError(f"queries {[e.query.id for e in examples]} have no reranker chat")
        inputs, labels = self.labelled(chats)
        kinds = torch.tensor([0] * n_pointwise + [1] * (len(chats) - n_pointwise), dtype=torch.long)
        return {"inputs": inputs, "labels": labels, "kinds": kinds, "query_ids": [e.query.id for e in examples]}

    def labelled(self, chats: list[list[dict[str, Any]]]) -> tuple[BatchFeature, torch.Tensor]:
        """Processor batch of whole conversations and labels that keep only each assistant answer (+ end of turn),
        or each whole assistant turn (`labels="assistant_turn"`)."""
        full = render_chats(self.processor, chats, generation_prompt=False)
        # where the labels start: after the generation prompt (the answer), or before it (the assistant turn)
        prompts = render_chats(self.processor, [chat[:-1] for chat in chats], generation_prompt=self.labels == "answer")
        whole_turn = self.labels == "assistant_turn"
        tokenizer = self.processor.tokenizer
        tails = []
        for text, prompt in zip(full, prompts, strict=True):
            if not text.startswith(prompt):
                raise LamraError(
                    "the chat template renders a conversation that does not extend its generation prompt, so the "
                    "assistant's answer cannot be located"
                )
            ids = tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"]
            # The answer and its end-of-turn marker; the template's whitespace after the turn is trained only with
            # the whole turn (LamRA's labels).
            while ids and not whole_turn and not tokenizer.decode(ids[-1:]).strip():
                ids.pop()
            tails.append(ids)
        inputs = self._batch(full, chats)
        labels = torch.full_like(inputs["input_ids"], IGNORE)
        mask = inputs["attention_mask"].bool()
        for row, tail in enumerate(tails):
            real = mask[row].nonzero().flatten()
            start = self._locate(inputs["input_ids"][row, real].tolist(), tail, row)
            at = real[start : start + len(tail)]
            labels[row, at] = inputs["input_ids"][row, at]
        return inputs, labels

    @staticmethod
    def _locate(sequence: list[int], tail: list[int], row: int) -> int:
        """Where the answer tokens start in a row's real tokens: they end where the rendered text's last non-space
        token does, and must match the answer tokenized alone."""
        for end in range(len(sequence), 0, -1):
            if sequence[end - len(tail) : end] == tail:
                return end - len(tail)
            if end < len(sequence) - 4:  # only trailing whitespace tokens may follow the answer
                break
        raise LamraError(
            f"row {row}: the assistant's answer tokenizes differently inside the conversation than alone, so its "
            "label mask cannot be built for this tokenizer"
        )

    # ------------------------------------------------------------------------------------ scoring
    def pointwise_inputs(
        self, pairs: list[tuple[Item, Item]], tasks: list[tuple[str, int] | None] | None = None
    ) -> BatchFeature:
        """Prompts (generation prompt included) of (query, candidate) pairs, for P(Yes) at their last token.
        `tasks`: each pair's (dataset, M-BEIR task id), which picks a zero-shot judge's question."""
        if self.judge is not None:
            judge, tasks = self.judge, tasks or [None] * len(pairs)
            chats = [
                judge_messages(self._truncated(q), self._truncated(c), judge, t)
                for (q, c), t in zip(pairs, tasks, strict=True)
            ]
        else:
            chats = [pointwise_messages(self._truncated(q), self._truncated(c)) for q, c in pairs]
        texts = render_chats(self.processor, chats, generation_prompt=True)
        return self._batch(texts, chats)

    def listwise_inputs(self, lists: list[tuple[Item, list[Item]]]) -> BatchFeature:
        """Prompts of (query, candidates) lists with the answer's "Ans: (" already written: the next token is the
        number of the best candidate, so one forward scores every candidate."""
        too_long = [len(c) for _, c in lists if not 1 <= len(c) <= MAX_LIST]
        if too_long:
            raise LamraError(f"a listwise prompt holds 1 to {MAX_LIST} candidates, got {too_long[0]}")
        chats = [listwise_messages(self._truncated(q), [self._truncated(c) for c in cs]) for q, cs in lists]
        texts = render_chats(self.processor, chats, generation_prompt=True)
        return self._batch([t + LIST_PREFIX for t in texts], chats)

    # ------------------------------------------------------------------------------------ helpers
    def _batch(self, texts: list[str], chats: list[list[dict[str, Any]]]) -> BatchFeature:
        images = [part_image for chat in chats for part_image in _images(chat)]
        # LamRA's reranker reads 8 frames of a video (its retriever 12): {} without videos
        videos = video_inputs(self.processor, [video for chat in chats for video in _videos(chat)], RERANK_FRAMES)
        # The rendered chat holds its special tokens already (a Mistral template writes <s>): add none.
        return self.processor(
            text=texts, images=images or None, padding=True, return_tensors="pt", add_special_tokens=False, **videos
        )

    def _truncated(self, item: Item) -> Item:
        return truncate_text(self.processor.tokenizer, item, self.max_text_tokens)

    def _first_token(self, word: str) -> int:
        return self.processor.tokenizer(word, add_special_tokens=False)["input_ids"][0]


def _videos(chat: list[dict[str, Any]]) -> list[Item]:
    """The video items of a chat in the order their placeholders appear."""
    return [part["_video"] for message in chat for part in message["content"] if "_video" in part]


def _images(chat: list[dict[str, Any]]) -> list[Any]:
    """The images of a chat in the order their placeholders appear (the processor pairs them up in order)."""
    return [part["_image"] for message in chat for part in message["content"] if "_image" in part]
