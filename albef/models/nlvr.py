"""NLVR2: one text, two images (``models/model_nlvr.py``), and its text-assignment (TA) pretraining
(``models/model_pretrain_nlvr.py``).

The two-image text encoder keeps the ``text_layers`` text-only layers and holds each fusion layer twice:
pretrained fusion layer ``T + i`` becomes layers ``T + 2i`` (cross-attends to the left image) and
``T + 2i + 1`` (right image). Within a pair only the cross-attention key and value projections are shared
(the same Parameters, as the official ``share_cross_attention`` makes them); queries, cross-attention output,
self-attention and feed-forward are separate. A ``ModelConfig`` given to these models describes the
pretrained (single-image) model: ``text.fusion_layers = 6`` builds 12 fusion layers, 18 in all for BERT-base,
as the official code's ``num_hidden_layers = 18``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import ModelConfig
from albef.models.base import Encoders, check_text
from albef.models.ve import DistilledClassifier
from albef.models.xbert import Mode, TextEncoder

#: NLVR2 labels (the official dataset: "True" -> 1, "False" -> 0)
NLVR_LABELS = {"False": 0, "True": 1}
#: TA labels: the caption's own image is on the left (0), on the right (1), or in neither slot (2)
TA_LABELS = {"left": 0, "right": 1, "neither": 2}
# model_pretrain_nlvr.py samples the other image(s) with a fixed temperature, not the learnable ``temp``
TA_SAMPLING_TEMPERATURE = 0.07


def two_image_text_encoder(cfg: ModelConfig) -> TextEncoder:
    """The two-image text encoder (module docstring; in each pair the first layer takes the second's key and
    value Parameters). Given a list of two image-token tensors, fusion layer ``j`` attends to image
    ``(j - text_layers) % 2``."""
    doubled = copy.deepcopy(cfg)
    doubled.text.fusion_layers = 2 * cfg.text.fusion_layers
    encoder = TextEncoder(doubled)
    layers = encoder.encoder.layer
    for first in range(cfg.text.text_layers, len(layers), 2):
        a, b = layers[first].crossattention.self, layers[first + 1].crossattention.self
        for name in ("key", "value"):
            getattr(a, name).weight = getattr(b, name).weight
            getattr(a, name).bias = getattr(b, name).bias
    return encoder


def split_pair(images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape[0] != 2 * batch:
        raise ValueError(
            f"images: expected the left and right images stacked, (2 x {batch} texts, 3, H, W), "
            f"got {tuple(images.shape)}"
        )
    return images[:batch], images[batch:]


class ALBEFNLVR(DistilledClassifier):
    """NLVR2 (``models/model_nlvr.py``): does the sentence hold for the (left, right) image pair? 0 / 1.

    ``images`` is ``cat([left, right])`` (2B images for B texts), the batch the official script passes: one
    ViT pass over both.
    """

    num_classes = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__(
            cfg, two_image_text_encoder(cfg), two_image_text_encoder(cfg) if cfg.distill else None
        )

    def fused_states(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        split_pair(images, batch)
        check_text(input_ids, attention_mask, self.cfg, batch)
        embeds = self.encode_image(images, momentum)
        encoder = self.text_encoder_m if momentum else self.text_encoder
        return encoder(input_ids, attention_mask, list(split_pair(embeds, batch)), mode=Mode.MULTIMODAL)


# ---------------------------------------------------------------------------- text assignment pretraining


class TAChoices(Protocol):
    """Where each caption's images come from in TA pretraining."""

    def assign(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From (B, B) sampling weights (zero diagonal) -> (left image index, right image index, label)."""
        ...


class RandomAssignment:
    """The official draws, in the official order on the global torch generator: per caption ``b``, with
    probability 2/3 one other image ``j ~ weights[b]`` and the caption's own image left (label 0) or right
    (label 1) with probability 1/2; otherwise two other images without replacement (label 2)."""

    def assign(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows: list[tuple[int, int, int]] = []  # (left, right, label)
        for b in range(weights.shape[0]):
            if torch.rand(1) > 1 / 3:
                j = int(torch.multinomial(weights[b], 1).item())
                rows.append((b, j, 0) if torch.rand(1) > 0.5 else (j, b, 1))
            else:
                first, second = torch.multinomial(weights[b], 2).tolist()
                rows.append((first, second, 2))
        left, right, labels = torch.tensor(rows, dtype=torch.long, device=weights.device).T
        return left, right, labels


@dataclass
class RecordedAssignment:
    """Replay given assignments (tests, parity)."""

    left: torch.Tensor
    right: torch.Tensor
    labels: torch.Tensor

    def assign(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.left, self.right, self.labels


@dataclass
class TAOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # (B, 3), detached
    labels: torch.Tensor
    left: torch.Tensor  # image index in the left slot, per caption
    right: torch.Tensor

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach()}


class ALBEFTextAssignment(Encoders, nn.Module):
    """TA pretraining (``models/model_pretrain_nlvr.py``): which slot of an image pair holds the caption's
    image, if any. No momentum encoders and no distillation; ``text_proj`` and ``temp`` are kept (unused)
    so the official checkpoint keys match."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_encoder = two_image_text_encoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.ta_head = nn.Linear(cfg.text.hidden, 3)

    @torch.no_grad()
    def sampling_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """softmax over other images of the cosine similarity of projected image [CLS] / 0.07, self excluded."""
        feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        weights = F.softmax(feat @ feat.t() / TA_SAMPLING_TEMPERATURE, dim=1)
        return weights.fill_diagonal_(0)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        choices: TAChoices | None = None,
    ) -> TAOutput:
        """``images[b]`` is caption ``b``'s image; the batch needs at least 3 images (two others per caption)."""
        batch = images.shape[0]
        check_text(input_ids, attention_mask, self.cfg, batch)
        if batch < 3:
            raise ValueError(
                f"text assignment draws two images other than the caption's own: the batch needs at least 3 "
                f"images, got {batch}"
            )
        image_embeds = self.visual_encoder(images)
        weights = self.sampling_weights(image_embeds)
        left, right, labels = (choices or RandomAssignment()).assign(weights)
        # index_select, not image_embeds[left]: an image drawn for several captions repeats in the index, and
        # x[idx]'s backward sums its rows in a thread-dependent order on CPU (see ContrastiveModel.itm)
        pair = [image_embeds.index_select(0, left), image_embeds.index_select(0, right)]
        hidden = self.text_encoder(input_ids, attention_mask, pair, mode=Mode.MULTIMODAL)
        logits = self.ta_head(hidden[:, 0, :])
        loss = F.cross_entropy(logits, labels)
        return TAOutput(loss=loss, logits=logits.detach(), labels=labels, left=left, right=right)
