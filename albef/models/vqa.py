"""The ALBEF VQA model (``models/model_vqa.py``): answers are generated, not classified.

* ``visual_encoder`` (ViT) and ``text_encoder`` (BERT, text + fusion layers): the question runs through every
  layer, cross-attending to the image; all question token states are kept.
* ``text_decoder``: a BERT language model (``bert.*`` + tied ``cls.predictions.*``, the official
  ``BertLMHeadModel`` names) with causal self-attention and, in every layer, cross-attention to the question
  states. Finetuning initialises it from the pretrained fusion layers (``albef.checkpoint``).
* ``*_m`` momentum twins of all three when ``distill`` is on: they give soft next-token targets.

Training scores every reference answer of a question (``k`` answers per question, weight per answer) with the
summed next-token cross-entropy, mixed with the momentum decoder's soft targets. Inference ranks a fixed answer
list in two stages (:meth:`ALBEFVQA.rank_answer`), exactly as the official code, first-token double count
included (ALBEF-SPEC §1.6-9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import LossSwitches, ModelConfig
from albef.models.base import Encoders, check_text
from albef.models.components import MomentumTwins, distillation_mix, soft_cross_entropies
from albef.models.vision import ImageEncoder
from albef.models.xbert import Mode, TextEncoder, TextEncoderForMLM, text_additive_mask


def decoder_config(cfg: ModelConfig) -> ModelConfig:
    """The decoder's shape as a text-encoder config: no text-only layers, ``decoder_layers`` layers that all
    cross-attend, and cross-attention keys/values of the question-state width."""
    dec = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text), vision=dataclasses.replace(cfg.vision))
    dec.text.text_layers = 0
    dec.text.fusion_layers = cfg.text.decoder_layers
    dec.vision.width = cfg.text.hidden
    return dec


def causal_additive_mask(mask: torch.Tensor, dtype: torch.dtype, value: float) -> torch.Tensor:
    """(B, L) padding mask -> (B, 1, L, L): position i sees the non-pad positions j <= i (official decoder)."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    keep = causal[None] & mask[:, None, :].bool()
    return (1.0 - keep[:, None].to(dtype)) * value


class AnswerDecoder(TextEncoderForMLM):
    """The official ``BertLMHeadModel`` as VQA uses it: ``bert`` (causal, cross-attends to question states)
    and ``cls.predictions`` (tied to the word embeddings), built as the MLM model of the decoder's shape."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(decoder_config(cfg))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_states: torch.Tensor,
        encoder_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits (B, L, vocab) at every position (unshifted: position i predicts token i + 1)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        cfg = self.bert.cfg
        hidden = self.bert.embeddings(input_ids=input_ids)
        self_mask = causal_additive_mask(attention_mask, hidden.dtype, cfg.quirks.text_mask_value)
        # transformers' ``invert_attention_mask`` (official cross-attention masks): -1e9, or -1e4 in float16
        cross_value = -1e4 if hidden.dtype == torch.float16 else -1e9
        cross_mask = text_additive_mask(encoder_mask, hidden.dtype, cross_value)
        hidden = self.bert.encoder(
            hidden, self_mask, encoder_states, 0, cfg.text.num_layers, cross_mask=cross_mask
        )
        return self.cls.predictions(hidden)


def answer_targets(answer_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Shifted next-token targets (B, L - 1): token i + 1 for position i, -100 at padding."""
    targets = answer_ids[:, 1:]
    return targets.masked_fill(targets == pad_token_id, -100)


def answer_sequence_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    soft_targets: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence loss (B,): summed next-token cross-entropy over the non-pad targets; with the teacher's
    ``soft_targets`` (B, L - 1, vocab), ``(1 - alpha) * CE + alpha * soft CE`` (the official decoder loss).

    ``logits``: the decoder output already shifted, (B, L - 1, vocab)."""
    b, n, vocab = logits.shape
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none").view(b, n).sum(1)
    if soft_targets is not None:
        distill = (soft_cross_entropies(logits, soft_targets) * (targets != -100)).sum(1)
        loss = distillation_mix(loss, distill, alpha)
    return loss


@dataclass
class VQAOutput:
    """A training forward; ``loss`` keeps its graph, the rest is detached."""

    loss: torch.Tensor  # sum over answers of weight * answer_loss, divided by the number of questions
    answer_loss: torch.Tensor  # (A,) per reference answer
    teacher_logits: torch.Tensor | None  # (A, L - 1, vocab) momentum decoder, shifted; None without distill

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach(), "loss_vqa": self.loss.detach()}


@dataclass
class AnswerRanking:
    """Both stages of :meth:`ALBEFVQA.rank_answer` (Q questions, A candidate answers, top ``k``)."""

    start_logits: torch.Tensor  # (Q, vocab) decoder logits after [CLS] alone
    prob_first_token: torch.Tensor  # (Q, A) P(first answer wordpiece)
    stage1_probs: torch.Tensor  # (Q, k) the k best first-token probabilities
    stage1_ids: torch.Tensor  # (Q, k) their answer indices
    candidate_ids: torch.Tensor  # (Q * k, L) their answer token ids, question-major
    candidate_logits: torch.Tensor | None  # (Q * k, L, vocab) unshifted (kept on request)
    answer_loss: torch.Tensor  # (Q * k,) summed next-token NLL of each candidate
    log_probs_sum: torch.Tensor  # (Q, k) log P(first) - NLL (the first token counts twice, as official)
    rerank_probs: torch.Tensor  # (Q, k) softmax of log_probs_sum, in stage-1 order
    topk_ids: torch.Tensor  # (Q, k) answer indices, best first
    topk_probs: torch.Tensor  # (Q, k) re-ranked probabilities, descending


class ALBEFVQA(Encoders, MomentumTwins, nn.Module):
    """ViT + BERT question encoder + BERT answer decoder, with momentum twins for distillation."""

    twins = ("visual_encoder", "text_encoder", "text_decoder")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.text_decoder = AnswerDecoder(cfg)
        if cfg.distill:
            self.visual_encoder_m = ImageEncoder(cfg.vision)
            self.text_encoder_m = TextEncoder(cfg)
            self.text_decoder_m = AnswerDecoder(cfg)
            self.copy_params()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.bert.encoder.grad_checkpointing = enable

    # ------------------------------------------------------------------ encoding
    def encode_question(
        self, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens, question states (Q, L, hidden)): every text-encoder layer, fusing the image."""
        check_text(question_ids, question_mask, self.cfg, images.shape[0])
        image_embeds = self.visual_encoder(images)
        states = self.text_encoder(question_ids, question_mask, image_embeds, mode=Mode.MULTIMODAL)
        return image_embeds, states

    # ------------------------------------------------------------------ training
    def forward(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: Sequence[int] | torch.Tensor,
        weights: torch.Tensor,
        alpha: float = 0.0,
        losses: LossSwitches | None = None,
    ) -> VQAOutput:
        """Weighted answer-generation loss. Answers of all questions are stacked: question ``b`` owns the next
        ``k[b]`` rows of ``answer_ids`` (``[CLS] wordpieces [SEP]``, padded), each with a ``weights`` entry.

        With ``distill`` the momentum twins are first advanced one EMA step, then give soft targets weighted by
        ``alpha`` (the stage's ``finetune_vqa.alpha``), unless
        ``losses.mod`` (default: the model's, :meth:`use_losses`) is False: then the teacher is not run."""
        losses = self.losses if losses is None else losses
        per_question = torch.as_tensor(k, dtype=torch.long, device=question_ids.device)
        if per_question.numel() != question_ids.shape[0]:
            raise ValueError(f"k: expected one count per question ({question_ids.shape[0]}), got {len(k)}")
        if int(per_question.sum()) != answer_ids.shape[0] or weights.numel() != answer_ids.shape[0]:
            raise ValueError(
                f"sum(k) = {int(per_question.sum())}, weights {weights.numel()} and answers "
                f"{answer_ids.shape[0]} must agree"
            )
        check_text(answer_ids, answer_mask, self.cfg, None)
        _, states = self.encode_question(images, question_ids, question_mask)
        states = states.repeat_interleave(per_question, dim=0)
        states_mask = question_mask.repeat_interleave(per_question, dim=0)

        teacher = None
        if self.cfg.distill:
            self.momentum_update()
            if losses.mod:
                with torch.no_grad():
                    image_embeds_m = self.visual_encoder_m(images)
                    states_m = self.text_encoder_m(
                        question_ids, question_mask, image_embeds_m, mode=Mode.MULTIMODAL
                    )
                    states_m = states_m.repeat_interleave(per_question, dim=0)
                    teacher = self.text_decoder_m(answer_ids, answer_mask, states_m, states_mask)[:, :-1, :]
        logits = self.text_decoder(answer_ids, answer_mask, states, states_mask)[:, :-1, :]
        targets = answer_targets(answer_ids, self.cfg.text.pad_token_id)
        soft = F.softmax(teacher, dim=-1) if teacher is not None else None
        per_answer = answer_sequence_loss(logits, targets, soft, alpha)
        loss = (weights.to(per_answer.dtype) * per_answer).sum() / images.shape[0]
        return VQAOutput(loss=loss, answer_loss=per_answer.detach(), teacher_logits=teacher)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def rank_answer(
        self,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int,
        keep_logits: bool = False,
    ) -> AnswerRanking:
        """The official two-stage ranking of an answer list (A answers, ``[CLS] wordpieces [SEP]``).

        1. The decoder reads ``answer_ids[0, 0]`` (the [CLS]/BOS token) alone; each answer is scored by the
           probability of its first wordpiece, and the ``k`` best are kept.
        2. The ``k`` candidates are decoded in full with teacher forcing: score = log P(first wordpiece) minus
           the summed NLL of the sequence (which includes the first wordpiece again, as in the official code);
           a softmax over the ``k`` scores gives the final probabilities.
        """
        num_q = question_states.shape[0]
        k = min(k, answer_ids.shape[0])
        bos = answer_ids[0, 0].repeat(num_q, 1)
        start_logits = self.text_decoder(bos, None, question_states, question_mask)[:, 0, :]
        prob_first = F.softmax(start_logits, dim=1).index_select(1, answer_ids[:, 1])
        stage1_probs, stage1_ids = prob_first.topk(k, dim=1)

        flat = stage1_ids.reshape(-1)
        cand_ids, cand_mask = answer_ids[flat], answer_mask[flat]
        states = question_states.repeat_interleave(k, dim=0)
        mask = question_mask.repeat_interleave(k, dim=0)
        logits = self.text_decoder(cand_ids, cand_mask, states, mask)
        targets = answer_targets(cand_ids, self.cfg.text.pad_token_id)
        nll = answer_sequence_loss(logits[:, :-1, :], targets)

        log_probs_sum = stage1_probs.log() - nll.view(num_q, k)
        rerank = F.softmax(log_probs_sum, dim=-1)
        topk_probs, order = rerank.topk(k, dim=1)
        topk_ids = torch.gather(stage1_ids, 1, order)
        return AnswerRanking(
            start_logits=start_logits,
            prob_first_token=prob_first,
            stage1_probs=stage1_probs,
            stage1_ids=stage1_ids,
            candidate_ids=cand_ids,
            candidate_logits=logits if keep_logits else None,
            answer_loss=nll,
            log_probs_sum=log_probs_sum,
            rerank_probs=rerank,
            topk_ids=topk_ids,
            topk_probs=topk_probs,
        )

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        k: int = 128,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(answer indices (Q, k) best first, their probabilities): the official ``train=False`` forward."""
        check_text(answer_ids, answer_mask, self.cfg, None)
        _, states = self.encode_question(images, question_ids, question_mask)
        ranking = self.rank_answer(states, question_mask, answer_ids, answer_mask, k)
        return ranking.topk_ids, ranking.topk_probs
