"""What the models share: the text-batch check and the encoders' access (every model), and for pretraining and
retrieval two encoders, projections, ITM head, temperature, momentum twins and feature queues, and the ITC/ITM
computations."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import LossSwitches, ModelConfig
from albef.models.components import (
    ChoiceSource,
    MomentumTwins,
    RandomChoices,
    enqueue,
    gather_no_grad,
    itc_targets,
    negative_probabilities,
    soft_cross_entropy,
)
from albef.models.vision import ImageEncoder
from albef.models.xbert import Mode, TextEncoder


@dataclass
class ITCResult:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # online image vs [momentum texts ; text queue] / temp, (B, B + Q)
    sim_t2i: torch.Tensor
    sim_i2t_m: torch.Tensor | None  # teacher logits (momentum vs momentum)
    sim_t2i_m: torch.Tensor | None
    targets_i2t: torch.Tensor
    targets_t2i: torch.Tensor


@dataclass
class ITMResult:
    loss: torch.Tensor
    # (3B, 2): positives, (text, negative image), (negative text, image); column 1 = match
    logits: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor  # (3B,) bool: False for negative rows that had no candidate (left out of the loss)
    neg_image_idx_for_text: torch.Tensor  # (B,), -1 where a text had no valid negative image
    neg_text_idx_for_image: torch.Tensor


@dataclass(kw_only=True)
class ContrastiveOutput:
    """What every ITC + ITM forward computes; losses keep their graph, everything else is detached.

    With ITC switched off (:class:`~albef.config.LossSwitches`) its fields are None and ``loss_itc`` is not a
    loss term."""

    loss: torch.Tensor  # the sum of every loss term
    loss_itc: torch.Tensor | None
    loss_itm: torch.Tensor
    sim_i2t: torch.Tensor | None  # online image vs [momentum texts ; queue] / temp, (B, B + Q)
    sim_t2i: torch.Tensor | None
    itc_targets: torch.Tensor | None  # hard targets before distillation, (B, B + Q)
    itm_logits: torch.Tensor  # (3B, 2): positives first; column 1 = match
    itm_labels: torch.Tensor
    itm_valid: torch.Tensor  # (3B,) bool: rows in the ITM loss (a negative row without a candidate is not)
    neg_image_idx_for_text: torch.Tensor  # -1 where a text had no valid negative image
    neg_text_idx_for_image: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    image_feat_m: torch.Tensor | None
    text_feat_m: torch.Tensor | None
    # the temperature used, detached (a tensor: reading it as a float would wait for the GPU)
    temp: torch.Tensor

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """Every loss term computed, detached, on the model's device (the trainer averages them there and reads
        them on the host only when it logs)."""
        terms = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith("loss")}
        return {name: value.detach() for name, value in terms.items() if value is not None}


def check_text(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: ModelConfig, batch: int | None
) -> None:
    """Fail early, naming what was expected, on malformed token batches."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape (batch, length), got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if batch is not None and input_ids.shape[0] != batch:
        raise ValueError(f"batch mismatch: {batch} images but {input_ids.shape[0]} texts")
    if input_ids.shape[1] > cfg.text.max_positions:
        raise ValueError(
            f"input_ids: length {input_ids.shape[1]} exceeds text.max_positions ({cfg.text.max_positions})"
        )
    if input_ids.device.type != "cpu":
        # Reading the range of ids on a GPU would stall the step for it; there an id out of range stops the
        # embedding lookup with a device-side assert, and every stage checks its tokenizer against the model's
        # vocabulary when it loads it (``ALBEFTokenizer.check_compatible``).
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.text.vocab_size:
        raise ValueError(
            f"input_ids: token ids must lie in [0, {cfg.text.vocab_size}), got range [{lo}, {hi}]"
        )


class Encoders:
    """The ViT ``visual_encoder`` (built here, once the config is validated) and the BERT ``text_encoder`` (the
    model's own) every model has."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.visual_encoder = ImageEncoder(cfg.vision)

    @property
    def text_backbone(self) -> TextEncoder:
        """The BERT encoder: ``text_encoder``, or the ``bert`` inside it when it carries an MLM head."""
        return getattr(self.text_encoder, "bert", self.text_encoder)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual_encoder.set_grad_checkpointing(enable)
        self.text_backbone.encoder.grad_checkpointing = enable


class ContrastiveModel(Encoders, MomentumTwins, nn.Module):
    """ViT + BERT with ITC (momentum distillation, queues) and ITM (contrastive hard negatives)."""

    #: extra index queue of image ids (retrieval) or not (pretraining)
    uses_idx_queue = False
    twins = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, cfg: ModelConfig, text_encoder: nn.Module, text_encoder_m: nn.Module):
        super().__init__(cfg)
        text_width = cfg.text.hidden
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

        self.visual_encoder_m = ImageEncoder(cfg.vision)
        self.vision_proj_m = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_encoder_m = text_encoder_m
        self.text_proj_m = nn.Linear(text_width, cfg.embed_dim)
        self.copy_params()

        q = cfg.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, q), dim=0))
        if self.uses_idx_queue:
            self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ structure
    @property
    def text_backbone_m(self) -> TextEncoder:
        return getattr(self.text_encoder_m, "bert", self.text_encoder_m)

    def use_losses(self, losses: LossSwitches) -> None:
        """Train with ``losses``. Without ITC its projections and temperature get no gradient: they are frozen,
        so DDP does not wait for their gradients (AdamW would leave them as they are either way)."""
        self.losses = losses.validate()
        for p in (*self.vision_proj.parameters(), *self.text_proj.parameters(), self.temp):
            p.requires_grad_(losses.itc)

    # ------------------------------------------------------------------ features
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(all image tokens, L2-normalised projected CLS)."""
        embeds = self.visual_encoder(images)
        return embeds, F.normalize(self.vision_proj(embeds[:, 0, :]), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(text-layer hidden states, L2-normalised projected CLS)."""
        embeds = self.text_backbone(input_ids, attention_mask, mode=Mode.TEXT)
        return embeds, F.normalize(self.text_proj(embeds[:, 0, :]), dim=-1)

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        first_only: bool = False,
        self_attended: bool = False,
    ) -> torch.Tensor:
        """Fusion layers on text hidden states cross-attending to image tokens (``first_only``: the [CLS]
        state only, (B, 1, hidden); ``self_attended``: ``text_embeds`` come from
        ``text_backbone.fusion_self_attention``)."""
        return self.text_backbone(
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            mode=Mode.FUSION,
            text_embeds=text_embeds,
            first_only=first_only,
            self_attended=self_attended,
        )

    def itm_logits(
        self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (B, 2) for aligned rows of text states and image tokens; column 1 = match."""
        return self.itm_head(self.fuse(text_embeds, attention_mask, image_embeds)[:, 0, :])

    @torch.no_grad()
    def momentum_features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(momentum image tokens, momentum image feature, momentum text feature)."""
        image_embeds_m = self.visual_encoder_m(images)
        image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
        text_embeds_m = self.text_backbone_m(input_ids, attention_mask, mode=Mode.TEXT)
        text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0, :]), dim=-1)
        return image_embeds_m, image_feat_m, text_feat_m

    # ------------------------------------------------------------------ losses
    def itc(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        hard_targets: torch.Tensor,
        alpha: float,
        distill: bool = True,
    ) -> ITCResult:
        """Contrastive loss of online features against [momentum batch ; queue] with distilled targets
        (``distill`` False, or a model without ``cfg.distill``: the hard targets, no teacher similarities)."""
        with torch.no_grad():
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = sim_t2i_m = None
            if self.cfg.distill and distill:
                sim_i2t_m = image_feat_m @ text_feat_all / self.temp
                sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            targets_i2t = itc_targets(hard_targets, sim_i2t_m, alpha)
            targets_t2i = itc_targets(hard_targets, sim_t2i_m, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
        return ITCResult(loss, sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets_i2t, targets_t2i)

    def itm(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        sim_i2t: torch.Tensor | None,
        sim_t2i: torch.Tensor | None,
        positive: torch.Tensor,
        choices: ChoiceSource,
    ) -> ITMResult:
        """ITM on the B positives and, for every text an image and for every image a text, one hard
        negative drawn in proportion to the in-batch ITC similarity (never a positive pair). Without
        similarities (None) the negative is drawn uniformly from the non-positive ones instead."""
        bs = image_embeds.shape[0]
        with torch.no_grad():
            if sim_i2t is None or sim_t2i is None:
                probs_t2i = probs_i2t = (~positive).float()  # random negatives (the paper's ablation)
            else:
                probs_t2i = negative_probabilities(sim_t2i[:, :bs], positive)
                probs_i2t = negative_probabilities(sim_i2t[:, :bs], positive)
            neg_img = choices.negatives(probs_t2i, ~positive, "image_for_text")
            neg_txt = choices.negatives(probs_i2t, ~positive, "text_for_image")
        # One fusion pass over [positives ; (text, hard negative image) ; (hard negative text, image)]: the
        # official code runs the positives and the negatives separately, with identical per-row results.
        # A row with no valid negative (batch of one, all captions of one image) is fused with a stand-in
        # (row 0) and weighted 0 in the loss, instead of being cut out with a boolean index, whose size the
        # host would have to wait for at every step on a GPU.
        # Negatives are gathered with index_select, not x[idx]: an image or text drawn as the negative of
        # several rows repeats in idx, and the backward of x[idx] (index_put with accumulate) sums those
        # rows in an order that varies between processes on a multi-threaded CPU, so two runs of one seed
        # drifted apart; index_select's backward (index_add) sums them in index order.
        has_img, has_txt = neg_img >= 0, neg_txt >= 0
        img_rows, txt_rows = neg_img.clamp(min=0), neg_txt.clamp(min=0)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds.index_select(0, txt_rows)], dim=0)
        mask_all = torch.cat(
            [attention_mask, attention_mask, attention_mask.index_select(0, txt_rows)], dim=0
        )
        image_all = torch.cat([image_embeds, image_embeds.index_select(0, img_rows), image_embeds], dim=0)
        fused = self.fuse(text_all, mask_all, image_all)[:, 0, :]
        logits = self.itm_head(fused)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:bs] = 1
        valid = torch.cat([torch.ones_like(has_img), has_img, has_txt])
        weight = valid.float()
        loss = (F.cross_entropy(logits.float(), labels, reduction="none") * weight).sum() / weight.sum()
        return ITMResult(loss, logits, labels, valid, neg_img, neg_txt)

    @torch.no_grad()
    def dequeue_and_enqueue(
        self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor | None = None
    ) -> None:
        """Write the momentum features of every rank (and the image ids) into the queues."""
        queues = [self.image_queue, self.text_queue]
        values = [gather_no_grad(image_feat_m), gather_no_grad(text_feat_m)]
        if self.uses_idx_queue:
            if idx is None:
                raise ValueError("this model keeps an image-id queue: pass idx")
            queues.append(self.idx_queue)
            values.append(gather_no_grad(idx.view(-1, 1)))
        enqueue(queues, values, self.queue_ptr)

    def contrastive_fields(
        self,
        itc: ITCResult | None,
        itm: ITMResult,
        hard_targets: torch.Tensor | None,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    ) -> dict:
        """The :class:`ContrastiveOutput` fields from the ITC (None: switched off) and ITM results (losses
        summed by the caller)."""
        image_feat, text_feat, image_feat_m, text_feat_m = features
        return dict(
            loss_itc=None if itc is None else itc.loss,
            loss_itm=itm.loss,
            sim_i2t=None if itc is None else itc.sim_i2t.detach(),
            sim_t2i=None if itc is None else itc.sim_t2i.detach(),
            itc_targets=hard_targets,
            itm_logits=itm.logits.detach(),
            itm_labels=itm.labels,
            itm_valid=itm.valid,
            neg_image_idx_for_text=itm.neg_image_idx_for_text,
            neg_text_idx_for_image=itm.neg_text_idx_for_image,
            image_feat=image_feat.detach(),
            text_feat=text_feat.detach(),
            image_feat_m=image_feat_m,
            text_feat_m=text_feat_m,
            temp=self.temp.detach().clone(),
        )

    def default_choices(self, choices: ChoiceSource | None) -> ChoiceSource:
        return choices if choices is not None else RandomChoices()
