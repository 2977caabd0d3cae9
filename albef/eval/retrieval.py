"""Image-text retrieval scoring with the official protocol, computed once per pair.

Official protocol (``Retrieval.py`` ``evaluation``): cosine ITC similarity for all (image, text) pairs; for
every image its top-``k_test`` texts and for every text its top-``k_test`` images are re-scored by the ITM
head's match logit; every other entry is -100. The official code runs one fusion pass per query (k pairs at a
time) and scores a pair twice when it sits in both candidate lists. Here the union of both candidate sets is
scored once, in large batches of pairs, and scattered into both score matrices: the same numbers, fewer
fusion forwards.
"""

from __future__ import annotations

import numpy as np
import torch

from albef.models.base import ContrastiveModel
from albef.models.retrieval import itm_scores

UNSCORED = -100.0  # the official fill value for pairs outside the top-k lists


@torch.no_grad()
def candidate_pairs(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k texts per image (I, k), top-k images per text (T, k), unique (image, text) pairs (P, 2))."""
    n_img, n_txt = sims.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    top_i2t = sims.topk(k_i2t, dim=1).indices
    top_t2i = sims.t().topk(k_t2i, dim=1).indices
    flat_i2t = torch.arange(n_img, device=sims.device)[:, None] * n_txt + top_i2t
    flat_t2i = top_t2i * n_txt + torch.arange(n_txt, device=sims.device)[:, None]
    flat = torch.unique(torch.cat([flat_i2t.reshape(-1), flat_t2i.reshape(-1)]))
    return top_i2t, top_t2i, torch.stack([flat // n_txt, flat % n_txt], dim=1)


@torch.no_grad()
def score_matrices(
    model: ContrastiveModel,
    image_embeds: torch.Tensor,
    image_feats: torch.Tensor,
    text_embeds: torch.Tensor,
    text_feats: torch.Tensor,
    text_mask: torch.Tensor,
    k_test: int,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ITC similarities (I, T), image->text scores (I, T), text->image scores (T, I)) as the official code."""
    sims = image_feats @ text_feats.t()
    top_i2t, top_t2i, pairs = candidate_pairs(sims, k_test)
    scores = itm_scores(model, image_embeds, text_embeds, text_mask, pairs, batch_size)
    n_img, n_txt = sims.shape
    lookup = torch.full((n_img * n_txt,), UNSCORED, dtype=scores.dtype, device=scores.device)
    lookup[pairs[:, 0] * n_txt + pairs[:, 1]] = scores
    lookup = lookup.view(n_img, n_txt)
    score_i2t = torch.full_like(lookup, UNSCORED)
    score_i2t.scatter_(1, top_i2t, lookup.gather(1, top_i2t))
    score_t2i = torch.full((n_txt, n_img), UNSCORED, dtype=scores.dtype, device=scores.device)
    score_t2i.scatter_(1, top_t2i, lookup.t().gather(1, top_t2i))
    return sims, score_i2t, score_t2i


@torch.no_grad()
def score_matrices_per_query(
    model: ContrastiveModel,
    image_embeds: torch.Tensor,
    image_feats: torch.Tensor,
    text_embeds: torch.Tensor,
    text_feats: torch.Tensor,
    text_mask: torch.Tensor,
    k_test: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official algorithm as written: one fusion pass of k pairs per query. For tests and benchmarks."""
    sims = image_feats @ text_feats.t()
    n_img, n_txt = sims.shape
    score_i2t = torch.full((n_img, n_txt), UNSCORED)
    for i in range(n_img):
        top = sims[i].topk(min(k_test, n_txt)).indices
        logits = model.itm_logits(text_embeds[top], text_mask[top], image_embeds[i].repeat(len(top), 1, 1))
        score_i2t[i, top] = logits[:, 1].float()
    score_t2i = torch.full((n_txt, n_img), UNSCORED)
    for t in range(n_txt):
        top = sims[:, t].topk(min(k_test, n_img)).indices
        logits = model.itm_logits(
            text_embeds[t].repeat(len(top), 1, 1), text_mask[t].repeat(len(top), 1), image_embeds[top]
        )
        score_t2i[t, top] = logits[:, 1].float()
    return sims, score_i2t, score_t2i


def recall_metrics(
    score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: dict[int, list[int]], txt2img: dict[int, int]
) -> dict[str, float]:
    """TR@1/5/10 (rank of the best-ranked ground-truth caption), IR@1/5/10, their means and ``r_mean``,
    in percent, as the official ``itm_eval``."""
    score_i2t, score_t2i = np.asarray(score_i2t), np.asarray(score_t2i)
    order = np.argsort(-score_i2t, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
    tr_ranks = np.array([position[i, img2txt[i]].min() for i in range(len(score_i2t))])
    order = np.argsort(-score_t2i, axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(order.shape[1])[None, :].repeat(order.shape[0], 0), axis=1)
    ir_ranks = np.array([position[t, txt2img[t]] for t in range(len(score_t2i))])
    out = {}
    for name, ranks in (("txt", tr_ranks), ("img", ir_ranks)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
