"""LamRA-Rank: an LMM reranker trained jointly pointwise (Yes/No) and listwise (the best candidate's number).

Scores come from one forward pass each, never from parsing generated text:

* pointwise: P(Yes) = softmax(logit_Yes, logit_No)[Yes] at the prompt's last token (where `generate` would emit
  its first token; positions are computed the way `generate` computes them, so the two agree);
* listwise: with "Ans: (" appended to the prompt, the next token is the number of the best candidate; the
  softmax over the K number tokens gives every candidate a score, so no malformed answer can shift a row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from transformers import BatchFeature

from lamra_pl.errors import LamraError
from lamra_pl.models.backbone import Backbone, BackboneSpec, LoraSpec, hf_model, refuse_unsharded_trainables
from lamra_pl.models.base import ScheduleSpec, TrainingModule
from lamra_pl.models.losses import Reduction, answer_token_loss
from lamra_pl.models.pooling import pooling_index, states_at
from lamra_pl.models.rerank_inputs import IGNORE, JudgePrompt, LabelSpan, RerankCollator


class RerankModule(TrainingModule):
    """A cross-encoder reranker on an image-text-to-text backbone (spec lamra.md section 4).

    Args:
        backbone: the LMM and how it loads and trains (`BackboneSpec`: path, rope, dtype, pixels, freezing,
            train_lm_head, ...). `backbone.train_lm_head` unfreezes the LM head, which reads the Yes/No and number
            logits: LamRA keeps a pretrained instruct model's head frozen (LoRA only); a backbone whose head was
            never trained (the demo's tiny retriever) needs it. `backbone.attention` must stay causal.
        lora: LoRA on the language model's linear layers (`LoraSpec`); null for full fine-tuning of the language
            model.
        pointwise_weight: weight of the pointwise task's answer tokens (0 turns it off).
        listwise_weight: weight of the listwise task's answer tokens (0 turns it off).
        loss_reduction: "tokens" (LamRA): one weighted mean over every answer token of the batch, so with equal
            weights it is the stock causal-LM loss over the assistant turns; "kinds": the paper's
            L = w_point * mean(pointwise tokens) + w_list * mean(listwise tokens).
        max_text_tokens: query and candidate texts are cut to this many tokens (LamRA: 256).
        labels: which tokens the loss reads: "answer" (the answer and its end-of-turn token) or "assistant_turn"
            (LamRA's code: also the assistant header before the answer and the newline after the turn).
        optimizer: built from the trainable parameters.
        schedule: the learning-rate schedule (`ScheduleSpec`: warmup_ratio, lr_schedule).
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        lora: LoraSpec | None = None,
        pointwise_weight: float = 1.0,
        listwise_weight: float = 1.0,
        loss_reduction: Reduction = "tokens",
        max_text_tokens: int | None = 256,
        labels: LabelSpan = "answer",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: ScheduleSpec | None = None,
    ) -> None:
        if min(pointwise_weight, listwise_weight) < 0 or pointwise_weight + listwise_weight == 0:
            raise LamraError(
                f"model.pointwise_weight and model.listwise_weight must be >= 0 and not both 0, got "
                f"{pointwise_weight} and {listwise_weight}"
            )
        spec = BackboneSpec.of(backbone)
        if spec.attention != "causal":
            raise LamraError(
                f"backbone.attention is {spec.attention!r}: a reranker scores the next token, which only a causal "
                "decoder predicts; bidirectional attention is for retrievers (EmbeddingModule)"
            )
        super().__init__(optimizer=optimizer, schedule=schedule)
        self.backbone = Backbone(spec, lora, add_emb_token=False)
        self.processor = self.backbone.processor
        self.model: torch.nn.Module | None = None
        self.weights = (pointwise_weight, listwise_weight)
        self.loss_reduction: Reduction = loss_reduction
        self.max_text_tokens = max_text_tokens
        self.labels: LabelSpan = labels
        self._collator = RerankCollator(self.processor, max_text_tokens=max_text_tokens, labels=labels)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.backbone.build(self)
        if self.device_mesh is not None:
            refuse_unsharded_trainables(self)

    def collator(self) -> RerankCollator:
        return self._collator

    def use_judge(self, prompt: JudgePrompt) -> None:
        """Score pointwise with a zero-shot yes/no question (MM-Embed) instead of LamRA-Rank's prompt."""
        self._collator = RerankCollator(self.processor, max_text_tokens=self.max_text_tokens, judge=prompt)

    # ---------------------------------------------------------------------------------------- heads
    def _head(self, states: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
        """LM-head logits of some hidden states, over the whole vocabulary or only `token_ids` (cheaper)."""
        head = hf_model(self.model).get_output_embeddings()
        if token_ids is None:
            return head(states)
        rows = torch.tensor(token_ids, device=states.device)
        bias = None if head.bias is None else head.bias[rows]
        return F.linear(states, head.weight[rows], bias)

    def _last_states(self, inputs: BatchFeature) -> torch.Tensor:
        states = self.backbone.hidden_states(self.model, inputs)
        return states_at(states, pooling_index(inputs["input_ids"], inputs["attention_mask"], -1, "last_token"))

    @torch.no_grad()
    def score_pointwise(self, inputs: BatchFeature) -> torch.Tensor:
        """[B] P(Yes) of pointwise prompts (`RerankCollator.pointwise_inputs`); P(True) with a judge prompt."""
        c = self._collator
        logits = self._head(self._last_states(inputs), [c.yes_id, c.no_id]).float()
        return logits.softmax(-1)[:, 0]

    @torch.no_grad()
    def score_listwise(self, inputs: BatchFeature, sizes: list[int]) -> torch.Tensor:
        """[B, max(sizes)] probability that each candidate is the best of its list (0 beyond a list's size)."""
        width = max(sizes)
        logits = self._head(self._last_states(inputs), self._collator.index_ids[:width]).float()
        beyond = (
            torch.arange(width, device=logits.device)[None, :] >= torch.tensor(sizes, device=logits.device)[:, None]
        )
        return logits.masked_fill(beyond, float("-inf")).softmax(-1)

    # ---------------------------------------------------------------------------------------- loss
    def lm_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Causal-LM cross-entropy on the answer tokens only; returns (loss, per-kind losses and accuracies)."""
        inputs, labels, kinds = batch["inputs"], batch["labels"], batch["kinds"]
        states = self.backbone.hidden_states(self.model, inputs)
        targets = labels[:, 1:]  # the state at p predicts the token at p + 1
        rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
        logits = self._head(states[rows, cols]).float()
        token_loss = F.cross_entropy(logits, targets[rows, cols], reduction="none")
        loss, stats = answer_token_loss(token_loss, kinds[rows], self.weights, self.loss_reduction)
        stats.update(self._accuracies(rows, cols, logits, kinds, targets))
        return loss, stats

    @torch.no_grad()
    def _accuracies(
        self, rows: torch.Tensor, cols: torch.Tensor, logits: torch.Tensor, kinds: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Pointwise: Yes/No decided right at the first answer token. Listwise: the right candidate number, argmax
        over the number tokens at the answer's number position."""
        c = self._collator
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]
        out: dict[str, torch.Tensor] = {}
        point = first & (kinds[rows] == 0)
        if point.any():
            yes_no = logits[point][:, [c.yes_id, c.no_id]]
            said_yes = yes_no[:, 0] > yes_no[:, 1]
            out["pointwise_acc"] = (said_yes == (targets[rows[point], cols[point]] == c.yes_id)).float().mean()
        index_ids = torch.tensor(c.index_ids, device=logits.device)
        is_index = torch.isin(targets[rows, cols], index_ids) & (kinds[rows] == 1)
        if is_index.any():
            picked = index_ids[logits[is_index][:, index_ids].argmax(-1)]
            out["listwise_acc"] = (picked == targets[rows[is_index], cols[is_index]]).float().mean()
        return out

    # ---------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, stats = self.lm_loss(batch)
        n = len(batch["query_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        for name, value in stats.items():
            # Not synced: a batch may lack one kind of chat, and per-step syncs must be the same on every rank.
            self.log(f"train/{name}", value, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.lm_loss(batch)
        n = len(batch["query_ids"])
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        for name, value in stats.items():
            self.log(f"val/{name}", value, batch_size=n)  # rank 0's (see training_step)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Scores of a reranking batch (`lamra_pl.pipelines.rerank`): [B] P(Yes), or [B, K] listwise."""
        if batch["mode"] == "pointwise":
            return self.score_pointwise(batch["inputs"])
        return self.score_listwise(batch["inputs"], batch["sizes"])
