"""The ALBEF retrieval model (``models/model_retrieval.py``) and the scoring functions evaluation uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from albef.config import LossSwitches, ModelConfig
from albef.models.base import ContrastiveModel, ContrastiveOutput, check_text
from albef.models.components import ChoiceSource
from albef.models.xbert import TextEncoder


@dataclass(kw_only=True)
class RetrievalOutput(ContrastiveOutput):
    """ITC + ITM finetuning outputs; ``itc_targets`` are uniform over every same-image-id column."""


class ALBEFRetrieval(ContrastiveModel):
    """ITC + ITM finetuning where captions of the same image (same ``idx``) are all positives."""

    uses_idx_queue = True

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, TextEncoder(cfg), TextEncoder(cfg))

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor,
        alpha: float = 0.0,
        choices: ChoiceSource | None = None,
        losses: LossSwitches | None = None,
    ) -> RetrievalOutput:
        """One finetuning step (updates the momentum encoders and the queues). ``alpha``: the weight of the
        teacher's soft ITC targets (the stage's ``finetune_retrieval.alpha``). ``losses.mod`` (default: the
        model's, :meth:`use_losses`) False: hard ITC targets, no teacher similarities computed."""
        check_text(input_ids, attention_mask, self.cfg, images.shape[0])
        if idx.numel() != images.shape[0]:
            raise ValueError(
                f"idx: expected one image id per sample ({images.shape[0]}), got {tuple(idx.shape)}"
            )
        choices = self.default_choices(choices)
        losses = self.losses if losses is None else losses

        image_embeds, image_feat = self.encode_image(images)
        text_embeds, text_feat = self.encode_text(input_ids, attention_mask)

        idx = idx.view(-1, 1).to(self.idx_queue.device)
        with torch.no_grad():
            idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)
            same = torch.eq(idx, idx_all).float()
            hard = same / same.sum(1, keepdim=True)
            self.momentum_update()
            _, image_feat_m, text_feat_m = self.momentum_features(images, input_ids, attention_mask)
        itc = self.itc(image_feat, text_feat, image_feat_m, text_feat_m, hard, alpha, losses.mod)
        self.dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        positive = torch.eq(idx, idx.t())
        itm = self.itm(image_embeds, text_embeds, attention_mask, itc.sim_i2t, itc.sim_t2i, positive, choices)
        return RetrievalOutput(
            loss=itc.loss + itm.loss,
            **self.contrastive_fields(itc, itm, hard, (image_feat, text_feat, image_feat_m, text_feat_m)),
        )


# ---------------------------------------------------------------------------- scoring for evaluation


def _in_batches(encode, batch_size: int, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode``'s two outputs on consecutive ``batch_size`` rows of ``inputs``, each concatenated."""
    size = inputs[0].shape[0]
    parts = [encode(*(x[s : s + batch_size] for x in inputs)) for s in range(0, size, batch_size)]
    return torch.cat([embeds for embeds, _ in parts]), torch.cat([feats for _, feats in parts])


@torch.no_grad()
def image_features(
    model: ContrastiveModel, images: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(image tokens (N, T, C), normalised ITC features (N, D)) for a stack of images, in batches."""
    return _in_batches(model.encode_image, batch_size, images)


@torch.no_grad()
def text_features(
    model: ContrastiveModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-layer states (N, L, H), normalised ITC features (N, D)), in batches."""
    check_text(input_ids, attention_mask, model.cfg, None)
    return _in_batches(model.encode_text, batch_size, input_ids, attention_mask)


@torch.no_grad()
def itm_scores(
    model: ContrastiveModel,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    pairs: torch.Tensor,
    batch_size: int = 128,
    image_chunk: int = 32,
) -> torch.Tensor:
    """ITM match logits for (image index, text index) ``pairs`` (P, 2), computed in batches of pairs.

    The score is the official one: the ITM head's "match" logit (no softmax, no ITC term added). Pairs are
    grouped by image, and each image's cross-attention keys and values are projected once for all the texts
    paired with it (``image_chunk`` images at a time, to bound memory) instead of once per pair.
    Each image's texts are attended as one long query against that image's keys and values (cross-attention
    treats query tokens independently), and each batch is cut to its longest text: padding (masked out in
    every attention) is not computed; the first layer's self-attention, which does not depend on the image,
    is computed once per text; the last layer computes the [CLS] position only, the one the ITM head reads. None of this changes a score beyond float rounding.
    """
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(
            f"pairs: expected shape (P, 2) of (image index, text index), got {tuple(pairs.shape)}"
        )
    device = image_embeds.device
    # The plan (order, batches, widths, groups) is made on the CPU from two small tensors, so the loop below
    # never reads a GPU value on the host: on a GPU each such read would wait for all queued work.
    pairs_cpu = pairs.cpu()
    lengths = text_mask.sum(dim=1).cpu()
    # image-major, shortest texts first within an image: batches of similar length waste little on padding
    order = torch.argsort(lengths[pairs_cpu[:, 1]], stable=True)
    order = order[torch.argsort(pairs_cpu[order, 0], stable=True)]
    images, texts = pairs_cpu[order, 0], pairs_cpu[order, 1]
    texts_on_device = texts.to(text_embeds.device, non_blocking=True)
    # the first fusion layer's self-attention depends on the text alone: once per text, not once per pair
    attended = torch.cat(
        [
            model.text_backbone.fusion_self_attention(text_embeds[s : s + 1024], text_mask[s : s + 1024])
            for s in range(0, text_embeds.shape[0], 1024)
        ]
    )
    scores_sorted = torch.empty(pairs_cpu.shape[0], device=device, dtype=torch.float32)
    unique = torch.unique_consecutive(images)
    for c in range(0, len(unique), image_chunk):
        chunk = unique[c : c + image_chunk]
        projected = model.text_backbone.project_image(image_embeds[chunk.to(device, non_blocking=True)])
        lo = int(torch.searchsorted(images, chunk[0], right=False))
        hi = int(torch.searchsorted(images, chunk[-1], right=True))
        local = torch.searchsorted(chunk, images[lo:hi])
        for b in range(lo, hi, batch_size):
            e = min(b + batch_size, hi)
            txt = texts_on_device[b:e]
            width = int(lengths[texts[b:e]].max())
            fused = model.fuse(
                attended[txt, :width],
                text_mask[txt, :width],
                projected.grouped(local[b - lo : e - lo]),
                first_only=True,
                self_attended=True,
            )
            scores_sorted[b:e] = model.itm_head(fused[:, 0, :])[:, 1].float()
    scores = torch.empty_like(scores_sorted)
    scores[order.to(device, non_blocking=True)] = scores_sorted
    return scores
