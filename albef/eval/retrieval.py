"""Image-text retrieval scoring with the official protocol, computed once per pair.

Official protocol (``Retrieval.py`` ``evaluation``): cosine ITC similarity for all (image, text) pairs; for
every image its top-``k_test`` texts and for every text its top-``k_test`` images are re-scored by the ITM
head's match logit; every other entry is -100. The official code runs one fusion pass per query (k pairs at a
time) and scores a pair twice when it sits in both candidate lists. Here the union of both candidate sets is
scored once, in large batches of pairs, and scattered into both score matrices: the same numbers, fewer
fusion forwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from albef.data.datasets import RetrievalEvalDataset
from albef.device import autocast
from albef.distributed import evaluation_share, gather_rows
from albef.io import atomic_write
from albef.models.base import ContrastiveModel
from albef.models.retrieval import itm_scores, text_features
from albef.tokenizer import ALBEFTokenizer

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
    score_i2t, score_t2i = scatter_scores(sims.shape, top_i2t, top_t2i, pairs, scores)
    return sims, score_i2t, score_t2i


def scatter_scores(
    shape: tuple[int, int] | torch.Size,
    top_i2t: torch.Tensor,
    top_t2i: torch.Tensor,
    pairs: torch.Tensor,
    scores: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each unique pair's score in the image->text and text->image matrices where it is a candidate."""
    n_img, n_txt = shape
    pairs = pairs.to(scores.device)
    lookup = torch.full((n_img * n_txt,), UNSCORED, dtype=scores.dtype, device=scores.device)
    lookup[pairs[:, 0] * n_txt + pairs[:, 1]] = scores
    lookup = lookup.view(n_img, n_txt)
    top_i2t, top_t2i = top_i2t.to(scores.device), top_t2i.to(scores.device)
    score_i2t = torch.full_like(lookup, UNSCORED)
    score_i2t.scatter_(1, top_i2t, lookup.gather(1, top_i2t))
    score_t2i = torch.full((n_txt, n_img), UNSCORED, dtype=scores.dtype, device=scores.device)
    score_t2i.scatter_(1, top_t2i, lookup.t().gather(1, top_t2i))
    return score_i2t, score_t2i


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
    score_i2t = torch.full((n_img, n_txt), UNSCORED, device=sims.device)  # on the GPU, as the official
    for i in range(n_img):
        top = sims[i].topk(min(k_test, n_txt)).indices
        logits = model.itm_logits(text_embeds[top], text_mask[top], image_embeds[i].repeat(len(top), 1, 1))
        score_i2t[i, top] = logits[:, 1].float()
    score_t2i = torch.full((n_txt, n_img), UNSCORED, device=sims.device)
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
    out = {}
    for name, scores, truth in (("txt", score_i2t, img2txt), ("img", score_t2i, txt2img)):
        # each entry's place (0-based, ties in index order) in its row; a query's rank: its best ground truth's
        position = np.argsort(np.argsort(-np.asarray(scores), axis=1, kind="stable"), axis=1)
        ranks = np.array([np.min(position[q, truth[q]]) for q in range(len(position))])
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


# ---------------------------------------------------------------------------- a whole evaluation


@dataclass
class RetrievalResult:
    """One evaluation of a split: ITM re-ranked metrics (the official protocol) and ITC-only metrics."""

    metrics: dict[str, float]
    itc_metrics: dict[str, float]
    sims: torch.Tensor  # (I, T) ITC cosine similarities
    score_i2t: torch.Tensor  # (I, T): ITM score for each image's top-k texts, UNSCORED elsewhere
    score_t2i: torch.Tensor  # (T, I)
    pairs_scored: int
    seconds: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_retrieval(
    model: ContrastiveModel,
    dataset: RetrievalEvalDataset,
    tokenizer: ALBEFTokenizer,
    *,
    k_test: int = 16,
    max_tokens: int = 30,
    device: torch.device | str = "cpu",
    image_batch: int = 64,
    text_batch: int = 256,
    pair_batch: int = 256,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> RetrievalResult:
    """The official retrieval evaluation of ``model`` on ``dataset``, split across the ranks of the process
    group when there is one (every rank returns the same result).

    Each rank encodes its share of the texts and images; the features are gathered; the union of the top-k
    candidate pairs of both directions is split across ranks in image order (so each image's keys and
    values are projected once) and scored by ITM in batches; the scores are gathered and scattered into
    both matrices. Rankings equal those of the official per-query loop (:func:`score_matrices_per_query`).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    times: dict[str, float] = {}
    start = time.perf_counter()

    tokens = tokenizer(dataset.texts, max_length=max_tokens)
    mine = evaluation_share(len(dataset.texts), "texts")
    t_embeds = t_feats = torch.empty(0, device=device)  # a rank with no texts (more ranks than texts)
    if len(mine):
        with autocast(device, amp_dtype):
            t_embeds, t_feats = text_features(
                model,
                tokens.input_ids[mine.start : mine.stop].to(device),
                tokens.attention_mask[mine.start : mine.stop].to(device),
                text_batch,
            )
    text_embeds, text_feats = gather_rows(t_embeds), gather_rows(t_feats.float())
    text_mask = tokens.attention_mask.to(device)

    mine = evaluation_share(len(dataset), "images")
    loader = DataLoader(
        Subset(dataset, list(mine)), batch_size=image_batch, num_workers=num_workers, shuffle=False
    )
    i_embeds, i_feats = [], []
    for images, _ in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        with autocast(device, amp_dtype):
            e, f = model.encode_image(images.to(device, non_blocking=True))
        i_embeds.append(e)
        i_feats.append(f.float())
    empty = torch.empty(0, device=device)
    image_embeds = gather_rows(torch.cat(i_embeds) if i_embeds else empty)
    image_feats = gather_rows(torch.cat(i_feats) if i_feats else empty)
    _synchronize(device)  # GPU work is queued: the clock reads after it is done
    times["features"] = time.perf_counter() - start

    start_itm = time.perf_counter()
    sims = image_feats @ text_feats.t()
    top_i2t, top_t2i, pairs = candidate_pairs(sims, k_test)
    # pairs are in image-major order: contiguous shares keep each image's pairs together
    mine = evaluation_share(len(pairs), "candidate pairs")
    my_pairs = pairs[mine.start : mine.stop]
    # at most 16 calls (progress steps): each call runs the first fusion self-attention of all texts again
    chunk = max(pair_batch * 16, -(-len(my_pairs) // 16), 1)
    parts = []
    for lo in tqdm(range(0, len(my_pairs), chunk), desc="ITM re-rank", disable=not progress, leave=False):
        with autocast(device, amp_dtype):
            parts.append(
                itm_scores(model, image_embeds, text_embeds, text_mask, my_pairs[lo : lo + chunk], pair_batch)
            )
    scores = gather_rows(torch.cat(parts) if parts else torch.empty(0, device=device))
    score_i2t, score_t2i = scatter_scores(sims.shape, top_i2t, top_t2i, pairs, scores)
    _synchronize(device)
    times["itm"] = time.perf_counter() - start_itm
    times["total"] = time.perf_counter() - start
    model.train(was_training)

    sims_np = sims.float().cpu().numpy()
    return RetrievalResult(
        metrics=recall_metrics(
            score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), dataset.img2txt, dataset.txt2img
        ),
        itc_metrics=recall_metrics(sims_np, sims_np.T, dataset.img2txt, dataset.txt2img),
        sims=sims.cpu(),
        score_i2t=score_i2t.cpu(),
        score_t2i=score_t2i.cpu(),
        pairs_scored=len(pairs),
        seconds=times,
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rankings(result: RetrievalResult, dataset: RetrievalEvalDataset, top: int = 10) -> dict:
    """Per-query rankings: each image query's top texts and each text query's top images, with scores and
    the rank (0-based) of the best ground truth; ITM-ranked, as the metrics."""
    i2t_order = torch.argsort(-result.score_i2t, dim=1, stable=True)
    t2i_order = torch.argsort(-result.score_t2i, dim=1, stable=True)
    image_queries = []
    for i, record in enumerate(dataset.records):
        order = i2t_order[i].tolist()
        position = {t: r for r, t in enumerate(order)}
        image_queries.append(
            {
                "image": record["image"],
                "ground_truth": dataset.img2txt[i],
                "rank": min(position[t] for t in dataset.img2txt[i]),
                "top": [[t, round(float(result.score_i2t[i, t]), 4)] for t in order[:top]],
            }
        )
    text_queries = []
    for t, text in enumerate(dataset.texts):
        order = t2i_order[t].tolist()
        text_queries.append(
            {
                "text": text,
                "ground_truth": dataset.txt2img[t],
                "rank": order.index(dataset.txt2img[t]),
                "top": [[i, round(float(result.score_t2i[t, i]), 4)] for i in order[:top]],
            }
        )
    return {"texts": dataset.texts, "image_to_text": image_queries, "text_to_image": text_queries}


def plot_examples(
    ranked: dict, dataset: RetrievalEvalDataset, path: str | Path, queries: int = 4, shown: int = 4
) -> Path:
    """A PNG of example queries: text queries with their top images (green frame: the true image) and
    image queries with their top captions (green: a true caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(queries, len(ranked["text_to_image"]), len(ranked["image_to_text"]))
    step_t = max(1, len(ranked["text_to_image"]) // max(n, 1))
    step_i = max(1, len(ranked["image_to_text"]) // max(n, 1))
    fig, axes = plt.subplots(2 * n, shown + 1, figsize=(2.2 * (shown + 1), 2.4 * 2 * n), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for q in range(n):
        tq = ranked["text_to_image"][q * step_t]
        row = axes[2 * q]
        row[0].text(0, 0.5, _wrap("text query:\n" + tq["text"]), fontsize=8, va="center", wrap=True)
        for c, (img, score) in enumerate(tq["top"][:shown]):
            ax = row[c + 1]
            ax.imshow(dataset.images.open(dataset.records[img]["image"]))
            ok = img == tq["ground_truth"]
            plt.setp(list(ax.spines.values()), visible=True, color="green" if ok else "red", linewidth=3)
            ax.set(xticks=[], yticks=[])
            ax.axis("on")
            ax.set_title(f"#{c + 1} {score:.2f}", fontsize=7)
        iq = ranked["image_to_text"][q * step_i]
        row = axes[2 * q + 1]
        row[0].imshow(dataset.images.open(iq["image"]))
        row[0].set_title("image query", fontsize=7)
        lines = []
        for c, (txt, score) in enumerate(iq["top"][:shown]):
            mark = "+" if txt in iq["ground_truth"] else "-"
            lines.append(f"{mark} #{c + 1} ({score:.2f}) {ranked['texts'][txt]}")
        row[1].text(0, 0.5, _wrap("\n".join(lines), 70), fontsize=7, va="center", family="monospace")
    fig.suptitle("retrieval examples (green / +: ground truth)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())
