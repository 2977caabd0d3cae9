"""BERT text encoder whose upper layers are fusion layers with cross-attention to image tokens.

Built from transformers' BERT pieces (embeddings, feed-forward, output LayerNorms, the MLM transform) and
an attention module of our own, because stock ``BertModel`` only allows cross-attention in a causal decoder
while ALBEF's fusion encoder is bidirectional. Parameter names follow the official ``models/xbert.py`` so
official checkpoints load with no renaming:

    embeddings.*, encoder.layer.{i}.attention.{self.{query,key,value}, output.{dense,LayerNorm}}
    encoder.layer.{i}.crossattention.*   (only for i >= text_layers)
    encoder.layer.{i}.intermediate.dense, encoder.layer.{i}.output.{dense,LayerNorm}

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on CPU and GPU), except when a
layer is asked to keep its attention probabilities (Grad-CAM), which needs the explicit softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

from albef.config import ModelConfig


class Mode(StrEnum):
    """Which layers a text-encoder call runs."""

    TEXT = "text"  # embeddings + the text-only layers
    FUSION = "fusion"  # the fusion layers, from given text hidden states
    MULTIMODAL = "multimodal"  # everything


def hf_bert_config(cfg: ModelConfig) -> BertConfig:
    t = cfg.text
    return BertConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.heads,
        intermediate_size=t.intermediate,
        hidden_act="gelu",  # exact erf GELU, as the official code
        hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.dropout,
        max_position_embeddings=t.max_positions,
        type_vocab_size=t.type_vocab,
        layer_norm_eps=t.layer_norm_eps,
        initializer_range=t.initializer_range,
        pad_token_id=t.pad_token_id,
    )


class _Projections(nn.Module):
    """Query from the text stream; key and value from the text (self) or the image tokens (cross)."""

    def __init__(self, hidden: int, kv_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class AttentionBlock(nn.Module):
    """Multi-head attention + BERT's post-LN residual output (``self`` and ``output`` submodules)."""

    def __init__(self, bert_cfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = _Projections(bert_cfg.hidden_size, kv_width, bert_cfg.num_attention_heads)
        self.output = BertSelfOutput(bert_cfg)
        self.dropout_p = bert_cfg.attention_probs_dropout_prob
        # Grad-CAM support: when True, the next forward keeps probabilities and their gradient.
        self.save_attention = False
        self.attention_probs: torch.Tensor | None = None
        self.attention_grads: torch.Tensor | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.self.heads, self.self.head_dim).transpose(1, 2)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``source`` tokens, split into heads: (B, heads, N, head_dim) each."""
        return self._split(self.self.key(source)), self._split(self.self.value(source))

    def forward(
        self,
        hidden: torch.Tensor,
        kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | GroupedKV | None = None,
        additive_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``kv``: the tokens to attend to (None: ``hidden`` itself), or their precomputed (keys, values),
        or a :class:`GroupedKV` when consecutive rows of ``hidden`` share an image."""
        q = self._split(self.self.query(hidden))
        if isinstance(kv, GroupedKV):
            if self.save_attention or additive_mask is not None:
                raise ValueError("grouped keys/values serve unmasked inference only")
            return self.output(kv.attend(q), hidden)
        k, v = kv if isinstance(kv, tuple) else self.project_kv(hidden if kv is None else kv)
        dropout = self.dropout_p if self.training else 0.0
        if self.save_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if additive_mask is not None:
                scores = scores + additive_mask
            probs = scores.softmax(dim=-1)
            self.attention_probs = probs
            if probs.requires_grad:
                probs.register_hook(self._keep_grad)
            context = F.dropout(probs, dropout, self.training) @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout)
        b, _, n, _ = context.shape
        context = context.transpose(1, 2).reshape(b, n, -1)
        return self.output(context, hidden)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.attention_grads = grad


class FusionLayer(nn.Module):
    """Self-attention, then (fusion layers only) cross-attention to the image, then the feed-forward."""

    def __init__(self, bert_cfg: BertConfig, encoder_width: int, has_cross_attention: bool):
        super().__init__()
        self.attention = AttentionBlock(bert_cfg, bert_cfg.hidden_size)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = AttentionBlock(bert_cfg, encoder_width)
        self.intermediate = BertIntermediate(bert_cfg)
        self.output = BertOutput(bert_cfg)

    def forward(
        self,
        hidden: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
        first_only: bool = False,
        self_attended: bool = False,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``first_only``: compute the output at position 0 only (all positions still serve as keys and
        values of the self-attention), for heads that read nothing but the [CLS] state.
        ``self_attended``: ``hidden`` already went through this layer's self-attention (which does not
        depend on the image, so retrieval scoring computes it once per text, not once per pair).
        ``cross_mask``: additive mask over the cross-attended tokens (the VQA answer decoder attends to padded
        question states); image tokens are all attended and need none."""
        if self_attended:
            hidden = hidden[:, :1] if first_only else hidden
        elif first_only:
            hidden = self.attention(hidden[:, :1], kv=hidden, additive_mask=text_mask)
        else:
            hidden = self.attention(hidden, additive_mask=text_mask)
        if self.has_cross_attention:
            if image is None:
                raise ValueError("a fusion layer needs image embeddings (image_embeds=...)")
            # Every image token is attended, so the cross-attention needs no mask (question states do).
            hidden = self.crossattention(hidden, kv=image, additive_mask=cross_mask)
        return self.output(self.intermediate(hidden), hidden)


@dataclass
class GroupedKV:
    """Keys and values of ``G`` images for query rows grouped by image: rows ``0..counts[0]`` attend to
    image 0, the next ``counts[1]`` rows to image 1, and so on.

    Cross-attention treats every query token on its own, so the texts of one image are attended as one long
    query sequence against that image's keys and values: no copy of the keys and values per text.
    """

    keys: torch.Tensor  # (G, heads, T, d)
    values: torch.Tensor
    counts: list[int]

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` (B, heads, L, d) -> context (B, L, heads * d)."""
        b, heads, length, d = q.shape
        parts, start = [], 0
        for g, n in enumerate(self.counts):
            rows = q[start : start + n].transpose(0, 1).reshape(1, heads, n * length, d)
            out = F.scaled_dot_product_attention(rows, self.keys[g : g + 1], self.values[g : g + 1])
            parts.append(out.reshape(heads, n, length, d).permute(1, 2, 0, 3))
            start += n
        return torch.cat(parts).reshape(b, length, heads * d)


@dataclass
class ProjectedImage:
    """Every fusion layer's cross-attention keys and values of a stack of images, computed once.

    Scoring many texts against one image (retrieval re-ranking) then skips the image-side projections,
    which dominate the fusion cost when images have many more tokens than texts (577 vs 30 at 384 px).
    """

    # per fusion layer: (keys, values), (N, heads, T, d)
    layers: list[tuple[torch.Tensor, torch.Tensor] | GroupedKV]

    def select(self, index: torch.Tensor) -> ProjectedImage:
        """The rows ``index`` (one per text to fuse)."""
        return ProjectedImage([(k[index], v[index]) for k, v in self.layers])

    def grouped(self, index: torch.Tensor) -> ProjectedImage:
        """Like :meth:`select` for a non-decreasing ``index`` (texts sorted by image), without copying each
        image's keys and values once per text (see :class:`GroupedKV`)."""
        # ``index`` may live on the CPU (itm_scores plans there): the group sizes are then read without
        # waiting for the GPU, and only the image rows move to the keys' device.
        images, counts = torch.unique_consecutive(index, return_counts=True)
        counts_list = counts.tolist()
        rows = images.to(self.layers[0][0].device, non_blocking=True)
        return ProjectedImage([GroupedKV(k[rows], v[rows], counts_list) for k, v in self.layers])  # type: ignore[misc]


class FusionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, bert_cfg: BertConfig):
        super().__init__()
        self.fusion_start = cfg.text.text_layers
        self.layer = nn.ModuleList(
            FusionLayer(bert_cfg, cfg.vision.width, has_cross_attention=i >= self.fusion_start)
            for i in range(cfg.text.num_layers)
        )
        self.grad_checkpointing = False

    def forward(
        self,
        hidden: torch.Tensor,
        text_mask: torch.Tensor | None,
        image: torch.Tensor | list[torch.Tensor] | ProjectedImage | None,
        start: int,
        end: int,
        first_only: bool = False,
        self_attended: bool = False,
        cross_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``first_only``: the last layer computes position 0 only (output (B, 1, hidden)).
        ``self_attended``: ``hidden`` already went through layer ``start``'s self-attention.
        ``cross_mask``: additive mask over the cross-attended tokens (see :meth:`FusionLayer.forward`)."""
        for i in range(start, end):
            layer_image = image
            if isinstance(image, ProjectedImage):
                layer_image = image.layers[i - self.fusion_start] if i >= self.fusion_start else None
            elif isinstance(image, (list, tuple)):  # several images (NLVR2): alternate between them
                layer_image = image[(i - self.fusion_start) % len(image)]
            layer = self.layer[i]
            last_first = first_only and i == end - 1
            done = self_attended and i == start
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(
                    layer, hidden, text_mask, layer_image, last_first, done, cross_mask, use_reentrant=False
                )
            else:
                hidden = layer(hidden, text_mask, layer_image, last_first, done, cross_mask)
        return hidden


def text_additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype, value: float) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive mask: 0 for tokens, ``value`` (official -10000) for padding."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * value


class TextEncoder(nn.Module):
    """The official ``BertModel`` (no pooler) with the three modes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        bert_cfg = hf_bert_config(cfg)
        self.embeddings = BertEmbeddings(bert_cfg)
        self.encoder = FusionEncoder(cfg, bert_cfg)
        self.apply(partial_init(cfg.text.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | list[torch.Tensor] | ProjectedImage | None = None,
        mode: Mode | str = Mode.MULTIMODAL,
        text_embeds: torch.Tensor | None = None,
        first_only: bool = False,
        self_attended: bool = False,
    ) -> torch.Tensor:
        """Return the last hidden states (B, L, hidden); with ``first_only`` only the [CLS] state (B, 1,
        hidden), skipping the last layer's work at every other position (ITM scoring reads nothing else).
        ``self_attended`` (fusion mode): ``text_embeds`` come from :meth:`fusion_self_attention`.

        ``mode='text'`` runs the embeddings and text layers on ``input_ids``; ``mode='fusion'`` runs the
        fusion layers on ``text_embeds`` (output of a text pass) with ``image_embeds``; ``mode='multimodal'``
        runs everything on ``input_ids`` with ``image_embeds``.
        """
        mode = Mode(mode)
        n_layers = self.cfg.text.num_layers
        if mode is Mode.FUSION:
            if text_embeds is None:
                raise ValueError("mode='fusion' needs text_embeds (the output of a mode='text' pass)")
            hidden = text_embeds
        else:
            if input_ids is None:
                raise ValueError(f"mode='{mode.value}' needs input_ids")
            hidden = self.embeddings(input_ids=input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = text_additive_mask(attention_mask, hidden.dtype, self.cfg.quirks.text_mask_value)
        start = self.encoder.fusion_start if mode is Mode.FUSION else 0
        end = self.encoder.fusion_start if mode is Mode.TEXT else n_layers
        if mode is not Mode.TEXT and image_embeds is None:
            raise ValueError(f"mode='{mode.value}' needs image_embeds for the fusion layers")
        if self_attended and mode is not Mode.FUSION:
            raise ValueError("self_attended applies to mode='fusion' only")
        return self.encoder(hidden, mask, image_embeds, start, end, first_only, self_attended)

    @torch.no_grad()
    def fusion_self_attention(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The first fusion layer's self-attention of text states: image-independent, so computed once per
        text when one text is fused with many images; continue with ``forward(..., self_attended=True)``."""
        mask = text_additive_mask(attention_mask, text_embeds.dtype, self.cfg.quirks.text_mask_value)
        return self.encoder.layer[self.encoder.fusion_start].attention(text_embeds, additive_mask=mask)

    @torch.no_grad()
    def project_image(self, image_embeds: torch.Tensor) -> ProjectedImage:
        """Cross-attention keys and values of ``image_embeds`` for every fusion layer (inference)."""
        start = self.encoder.fusion_start
        return ProjectedImage(
            [layer.crossattention.project_kv(image_embeds) for layer in self.encoder.layer[start:]]
        )


class MLMPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, with a separate (tied) bias."""

    def __init__(self, bert_cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(bert_cfg)
        self.decoder = nn.Linear(bert_cfg.hidden_size, bert_cfg.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(bert_cfg.vocab_size))
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class MLMHeadContainer(nn.Module):
    """Holds ``predictions`` so keys read ``cls.predictions.*`` as in the official checkpoints."""

    def __init__(self, bert_cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MLMPredictionHead(bert_cfg, word_embeddings)


class TextEncoderForMLM(nn.Module):
    """The official ``BertForMaskedLM``: ``bert`` (the encoder) + ``cls`` (the tied MLM head)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = TextEncoder(cfg)
        self.cls = MLMHeadContainer(hf_bert_config(cfg), self.bert.embeddings.word_embeddings)
        self.cls.predictions.transform.apply(partial_init(cfg.text.initializer_range))
        nn.init.zeros_(self.cls.predictions.bias)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.bert(*args, **kwargs)

    def mlm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, image_embeds, mode=Mode.MULTIMODAL)
        return self.cls.predictions(hidden)


def partial_init(std: float):
    """BERT's initialisation (normal(0, std) weights, zero biases, LayerNorm 1/0), as ``module.apply`` fn."""

    def init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    return init
