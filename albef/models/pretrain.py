"""The ALBEF pretraining model: ITC + ITM + MLM, with momentum distillation for ITC and MLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from albef.config import LossSwitches, ModelConfig
from albef.models.base import ContrastiveModel, ContrastiveOutput, check_text
from albef.models.components import ChoiceSource, MaskSpec, distillation_mix, soft_cross_entropies
from albef.models.xbert import Mode, TextEncoderForMLM


@dataclass(kw_only=True)
class PretrainOutput(ContrastiveOutput):
    """Everything one pretraining forward computes: the ITC/ITM fields plus MLM."""

    loss_mlm: torch.Tensor
    mlm_input_ids: torch.Tensor
    mlm_labels: torch.Tensor
    mlm_logits: torch.Tensor
    mlm_teacher_logits: torch.Tensor | None


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, labels) + alpha * soft-CE(softmax(teacher), logits)`` over masked tokens.

    The soft term is taken over the vocabulary axis (the official code's fixed form, b726f8e). A batch
    where no token was masked gives a zero loss that still belongs to the graph instead of NaN.
    """
    # Sums over the masked tokens divided by their count (at least 1), with no branch on the count: a branch
    # would make the host wait for the GPU at every step.
    masked = (labels != -100).float()
    count = masked.sum().clamp(min=1.0)
    vocab = logits.shape[-1]
    hard = F.cross_entropy(
        logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss = hard / count
    if teacher_logits is not None:
        soft = soft_cross_entropies(logits.float(), F.softmax(teacher_logits.float(), dim=-1))
        loss = distillation_mix(loss, (soft * masked).sum() / count, alpha)
    return loss


class ALBEFPretrain(ContrastiveModel):
    """Official ``models/model_pretrain.py`` ALBEF; state-dict keys are the official ones."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, TextEncoderForMLM(cfg), TextEncoderForMLM(cfg))

    def mask_spec(self) -> MaskSpec:
        return MaskSpec.of(self.cfg, self.cfg.mlm_probability)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        choices: ChoiceSource | None = None,
        losses: LossSwitches | None = None,
    ) -> PretrainOutput:
        """One pretraining step's losses. Updates the momentum encoders and the queues as a side effect
        (as the official forward does), so call it once per optimisation step. ``alpha``: the weight of the
        momentum teacher's soft targets (0: hard targets), the training stage's ``pretrain.alpha`` as ramped.

        ``losses`` (default: the model's, :meth:`use_losses`; the full model unless set) switches ITC, hard
        ITM negatives and the distillation of ITC and MLM off for the paper's ablation; what only a
        switched-off term needs is not computed (without ITC: the momentum text features, the similarities
        and the queue update)."""
        check_text(input_ids, attention_mask, self.cfg, images.shape[0])
        choices = self.default_choices(choices)
        losses = (self.losses if losses is None else losses).validate()
        distill_mlm = self.cfg.distill and losses.mod_mlm
        q = self.cfg.quirks
        with torch.no_grad():
            self.temp.clamp_(q.temp_min, q.temp_max)

        image_embeds, image_feat = self.encode_image(images)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        bs = images.shape[0]
        itc = hard = image_embeds_m = image_feat_m = text_feat_m = None
        with torch.no_grad():
            self.momentum_update()  # also without a teacher: the exported twins follow the model
            if losses.itc:
                image_embeds_m, image_feat_m, text_feat_m = self.momentum_features(
                    images, input_ids, attention_mask
                )
                hard = torch.zeros(bs, bs + self.cfg.queue_size, device=images.device)
                hard.fill_diagonal_(1)
            elif distill_mlm:
                image_embeds_m = self.visual_encoder_m(images)
        if losses.itc:
            itc = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, hard, alpha, losses.mod_itc)
            self.dequeue_and_enqueue(image_feat_m, text_feat_m)

        positive = torch.eye(bs, dtype=torch.bool, device=images.device)
        sims = (itc.sim_i2t, itc.sim_t2i) if itc is not None and losses.itm_hard_negatives else (None, None)
        itm = self.itm(image_embeds, text_embeds, attention_mask, *sims, positive, choices)

        mlm_ids, mlm_labels = choices.mlm_mask(input_ids, self.mask_spec())
        teacher = None
        if distill_mlm:
            with torch.no_grad():
                teacher = self.text_encoder_m.mlm_logits(mlm_ids, attention_mask, image_embeds_m)
        mlm_logits = self.text_encoder.mlm_logits(mlm_ids, attention_mask, image_embeds)
        loss_mlm = mlm_loss(mlm_logits, mlm_labels, teacher, alpha)

        loss = itm.loss + loss_mlm if itc is None else itc.loss + itm.loss + loss_mlm
        return PretrainOutput(
            loss=loss,
            loss_mlm=loss_mlm,
            mlm_input_ids=mlm_ids,
            mlm_labels=mlm_labels,
            mlm_logits=mlm_logits.detach(),
            mlm_teacher_logits=teacher,
            **self.contrastive_fields(itc, itm, hard, (image_feat, text_feat, image_feat_m, text_feat_m)),
        )

    def mlm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        return self.text_encoder.mlm_logits(input_ids, attention_mask, image_embeds)

    def multimodal(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        return self.text_backbone(input_ids, attention_mask, image_embeds, mode=Mode.MULTIMODAL)
