"""Classification on the fused [CLS] state: :class:`DistilledClassifier`, the base of SNLI-VE and NLVR2, and the
SNLI-VE model (``models/model_ve.py``). With ``distill`` (the official default) the momentum twins of both
encoders and ``cls_head`` give soft targets (:func:`distillation_loss`) and take one EMA step per training
forward, before the teacher runs, as the official forward does. State-dict keys are the official ones.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import LossSwitches, ModelConfig
from albef.models.base import Encoders, check_text
from albef.models.components import MomentumTwins, distillation_mix, soft_cross_entropy
from albef.models.vision import ImageEncoder
from albef.models.xbert import Mode, TextEncoder

#: SNLI-VE labels as the official VE dataset numbers them
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


@dataclass
class ClassifierOutput:
    """One training forward: the loss (with its graph), the student logits and the teacher's (or None)."""

    loss: torch.Tensor
    logits: torch.Tensor  # (B, classes), detached
    logits_m: torch.Tensor | None  # teacher logits after this step's momentum update

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach()}


def classifier_head(hidden: int, classes: int) -> nn.Sequential:
    """The official ``cls_head``: keys ``0.*`` and ``2.*``."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def distillation_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """``(1 - alpha) * CE + alpha * soft-CE(softmax(teacher), logits)``; plain CE without a teacher."""
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is None:
        return loss
    return distillation_mix(loss, soft_cross_entropy(logits, F.softmax(teacher_logits, dim=1)), alpha)


class DistilledClassifier(Encoders, MomentumTwins, nn.Module):
    """ViT + fusion BERT + ``cls_head`` on the fused [CLS], with momentum twins when ``cfg.distill``."""

    num_classes: int = 2
    twins = ("visual_encoder", "text_encoder", "cls_head")

    def __init__(self, cfg: ModelConfig, text_encoder: TextEncoder, text_encoder_m: TextEncoder | None):
        super().__init__(cfg)
        hidden = cfg.text.hidden
        self.text_encoder = text_encoder
        self.cls_head = classifier_head(hidden, self.num_classes)
        if cfg.distill:
            if text_encoder_m is None:
                raise ValueError("distill needs a momentum text encoder")
            self.visual_encoder_m = ImageEncoder(cfg.vision)
            self.text_encoder_m = text_encoder_m
            self.cls_head_m = classifier_head(hidden, self.num_classes)
            self.copy_params()

    def encode_image(self, images: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        return (self.visual_encoder_m if momentum else self.visual_encoder)(images)

    @abc.abstractmethod
    def fused_states(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        """Last hidden states (B, L, hidden) of the text fused with its image(s): one image (SNLI-VE) or a
        pair (NLVR2), as each task defines."""

    def logits(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        """Class logits (B, classes) from the fused [CLS] state (the official ``train=False`` forward)."""
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_states(images, input_ids, attention_mask, momentum)[:, 0, :])

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.logits(images, input_ids, attention_mask).argmax(dim=1)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        targets: torch.Tensor,
        alpha: float = 0.0,
        losses: LossSwitches | None = None,
    ) -> ClassifierOutput:
        """One training step's loss. With ``distill`` this updates the momentum twins (EMA) first, as the
        official forward does, so call it once per optimisation step. ``alpha``: the teacher's weight (the
        stage's ``alpha``). ``losses.mod`` (default: the model's,
        :meth:`use_losses`) False: the plain cross-entropy, the teacher is not run (the twins still follow)."""
        if targets.dim() != 1 or targets.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"targets: expected one label per text ({input_ids.shape[0]}), got shape {tuple(targets.shape)}"
            )
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
            raise ValueError(f"targets: labels must lie in [0, {self.num_classes}), got {targets.tolist()}")
        losses = self.losses if losses is None else losses
        logits = self.logits(images, input_ids, attention_mask)
        teacher = None
        if self.cfg.distill:
            with torch.no_grad():
                self.momentum_update()
                if losses.mod:
                    teacher = self.logits(images, input_ids, attention_mask, momentum=True)
        loss = distillation_loss(logits, targets, teacher, alpha)
        return ClassifierOutput(loss=loss, logits=logits.detach(), logits_m=teacher)


class ALBEFVE(DistilledClassifier):
    """SNLI-VE (``models/model_ve.py``): (image, hypothesis) -> contradiction 0 / neutral 1 / entailment 2."""

    num_classes = 3

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, TextEncoder(cfg), TextEncoder(cfg) if cfg.distill else None)

    def fused_states(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        check_text(input_ids, attention_mask, self.cfg, images.shape[0])
        image_embeds = self.encode_image(images, momentum)
        encoder = self.text_encoder_m if momentum else self.text_encoder
        return encoder(input_ids, attention_mask, image_embeds, mode=Mode.MULTIMODAL)
