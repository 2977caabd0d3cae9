"""Weakly supervised visual grounding with Grad-CAM (the official ``Grounding.py``, ALBEF_itm), and heat maps
per word (the official ``visualization.ipynb``).

Grad-CAM (ALBEF-SPEC §2.6): the image and the expression go through the whole multimodal encoder; the ITM
head's match logit is differentiated with respect to the cross-attention probabilities of one fusion layer
(official ``--block_num 8``: the third of BERT-base's six fusion layers). The image [CLS] column is dropped,
probabilities and gradients are multiplied by the text attention mask, gradients are clamped at 0, and
``attention x gradient`` is averaged over heads: one map per text position. The expression's map is the mean
of those over the text positions of the (padded) batch, exactly as the official code.

Box scoring (the official ``grounding_eval``): the map is upsampled bicubically to the original image size;
each proposal ``[x, y, w, h, ...]`` scores ``sum of the map inside it / (w * h) ** 0.5``; the best proposal is
correct when its IoU with the ground-truth box (inclusive pixel coordinates) is at least 0.5.

Where the official code is undefined we state a policy:

* a proposal with no pixel inside the image (or an empty one) is never chosen; a box reaching outside the
  image is cut to it, as the official slicing does at the right and bottom edges (the official would wrap
  around at negative starts);
* the best proposal is the first one with the highest score (the official keeps the previous expression's
  box when every score is <= 0);
* an image without any usable proposal counts as a miss (``no_proposal``), it stays in the denominator;
* an expression whose ground-truth box is missing, empty or outside its image is skipped and counted by
  reason (``bad_box: skip``, the default; preprocessing already drops those records) or is an error
  (``bad_box: error``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from albef.config import ConfigError, ModelConfig
from albef.data.grounding import REFS_FILE, GroundingAssets, load_refs
from albef.device import resolve_device
from albef.eval.settings import GroundingEvalConfig
from albef.models.xbert import AttentionBlock, Mode

log = logging.getLogger(__name__)

#: the official ``--block_num 8`` on BERT-base (fusion from layer 6): the third fusion layer
OFFICIAL_FUSION_INDEX = 2


# ------------------------------------------------------------------------------------------ Grad-CAM


def default_layer(cfg: ModelConfig) -> int:
    """The text-encoder layer the official code uses (the third fusion layer, 8 for BERT-base); in a model
    with fewer fusion layers, the last but one (the first when there is only one).

    Never the last layer when another exists: there only the [CLS] query reaches the ITM head, so every other
    word's map would be zero."""
    start, n = cfg.text.text_layers, cfg.text.num_layers
    return min(start + OFFICIAL_FUSION_INDEX, max(start, n - 2))


def check_layer(cfg: ModelConfig, layer: int | None, name: str = "layer") -> int:
    """``layer`` (an index into the text encoder's layers, as the official ``--block_num``) or the default;
    it must be a fusion layer (one with cross-attention)."""
    if layer is None:
        return default_layer(cfg)
    first, last = cfg.text.text_layers, cfg.text.num_layers - 1
    if not isinstance(layer, int) or not first <= layer <= last:
        raise ConfigError(
            f"{name}: {layer!r} is not a fusion layer of this model (text-encoder layers {first}..{last} have "
            f"cross-attention; the official --block_num 8 is the third fusion layer of BERT-base)"
        )
    return layer


@contextlib.contextmanager
def kept_cross_attention(model: torch.nn.Module, layer: int) -> Iterator[AttentionBlock]:
    """Layer ``layer``'s cross-attention keeping its probabilities (and their gradient) while inside."""
    block = model.text_backbone.encoder.layer[layer].crossattention
    block.save_attention = True
    try:
        yield block
    finally:
        block.save_attention = False
        block.attention_probs = block.attention_grads = None


@dataclass
class GradCAM:
    tokens: torch.Tensor  # (B, T, g, g): one map per text position (zero at padding)
    expression: torch.Tensor  # (B, g, g): mean of ``tokens`` over the T positions (the official map)
    itm_logits: torch.Tensor  # (B, 2): column 1 is the match logit that was differentiated
    layer: int


def gradcam_maps(
    probs: torch.Tensor, grads: torch.Tensor, attention_mask: torch.Tensor, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official Grad-CAM from cross-attention probabilities and their gradients (B, heads, T, 1 + g*g):
    (per-position maps (B, T, g, g), expression maps (B, g, g))."""
    b, heads, t, n = probs.shape
    if n != grid * grid + 1:
        raise ValueError(f"expected 1 + {grid}x{grid} image tokens, got {n}")
    if grads.shape != probs.shape:
        raise ValueError(f"gradients {tuple(grads.shape)} do not match probabilities {tuple(probs.shape)}")
    mask = attention_mask.view(b, 1, t, 1, 1).to(probs.dtype)
    cams = probs[..., 1:].reshape(b, heads, t, grid, grid) * mask
    positive = grads[..., 1:].clamp(min=0).reshape(b, heads, t, grid, grid) * mask
    tokens = (cams * positive).mean(dim=1)
    return tokens, tokens.mean(dim=1)


def gradcam_itm(
    model: torch.nn.Module,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int | None = None,
) -> GradCAM:
    """Grad-CAM of the ITM match logit on ``layer``'s cross-attention (official ``gradcam_mode='itm'``).

    The gradient is taken with ``torch.autograd.grad`` with respect to the attention probabilities only: the
    same values as the official ``loss.backward()``, without touching the parameters' ``.grad``. The model
    runs in eval mode (no dropout) and is put back in its previous mode.
    """
    layer = check_layer(model.cfg, layer)
    was_training = model.training
    model.eval()
    try:
        with kept_cross_attention(model, layer) as block, torch.enable_grad():
            with torch.no_grad():
                image_embeds = model.visual_encoder(images)
            # the probabilities must require a gradient even when every parameter is frozen
            image_embeds.requires_grad_(True)
            hidden = model.text_backbone(input_ids, attention_mask, image_embeds, mode=Mode.MULTIMODAL)
            logits = model.itm_head(hidden[:, 0, :])
            probs = block.attention_probs
            if probs is None:
                raise RuntimeError(f"layer {layer}'s cross-attention kept no attention probabilities")
            (grads,) = torch.autograd.grad(logits[:, 1].sum(), probs)
        with torch.no_grad():
            tokens, expression = gradcam_maps(
                probs.detach().float(), grads.float(), attention_mask, model.cfg.vision.grid_size
            )
    finally:
        model.train(was_training)
    return GradCAM(tokens, expression, logits.detach().float(), layer)


# ------------------------------------------------------------------------------------------ boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes in inclusive pixel coordinates (the official ``computeIoU``)."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (ix1 - ix0 + 1) * (iy1 - iy0 + 1) if ix0 < ix1 and iy0 < iy1 else 0.0
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter) / union if union > 0 else 0.0


def upsample_map(heat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (g, g) map bicubically resized to (height, width), as the official ``F.interpolate`` call."""
    return F.interpolate(heat[None, None].float(), size=(height, width), mode="bicubic")[0, 0]


def box_scores(
    heat: torch.Tensor, boxes: Sequence[Sequence[float]], area_power: float = 0.5
) -> list[float | None]:
    """Score of each ``[x, y, w, h, ...]`` box on a full-size map: the sum of the map over the pixels
    ``[int(y):int(y + h), int(x):int(x + w)]`` (the official slice, cut to the image) divided by
    ``(w * h) ** area_power`` (official 0.5; 0 gives the sum, 1 the mean per unit of box area). None for a
    box with no pixel inside the image."""
    height, width = heat.shape
    table = F.pad(heat.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # summed-area table, (H + 1, W + 1)
    out: list[float | None] = []
    for box in boxes:
        x, y, w, h = (float(v) for v in box[:4])
        x0, y0 = max(int(x), 0), max(int(y), 0)
        x1, y1 = min(int(x + w), width), min(int(y + h), height)
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            out.append(None)
            continue
        total = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
        out.append(float(total) / (w * h) ** area_power)
    return out


def best_box(scores: Sequence[float | None]) -> int | None:
    """Index of the first highest score (None when no box could be scored)."""
    best, index = -math.inf, None
    for i, s in enumerate(scores):
        if s is not None and s > best:
            best, index = s, i
    return index


# ------------------------------------------------------------------------------------------ evaluation


class GroundingEvalDataset(Dataset):
    """(image tensor, expression, ref_id) of ``grounding_eval`` files (``image``, ``text``, ``ref_id``)."""

    def __init__(self, files: Sequence[str | Path], images, transform, max_words: int = 30):
        from albef.data.formats import load_annotations
        from albef.data.text import pre_caption

        self.records = [r for f in files for r in load_annotations(f, "grounding_eval")]
        self.texts = [pre_caption(r["text"], max_words) for r in self.records]
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return self.transform(self.images.open(record["image"])), self.texts[index], record["ref_id"]


def score_expression(
    heat: torch.Tensor,
    truth: Sequence[float],
    width: int,
    height: int,
    proposals: Sequence[Sequence[float]],
    area_power: float = 0.5,
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Pick the best proposal on the expression map ``heat`` (g, g) and compare it with ``truth``."""
    full = upsample_map(heat, height, width)
    scores = box_scores(full, proposals, area_power)
    index = best_box(scores)
    if index is None:
        return {"pred_box": None, "iou": 0.0, "correct": False, "reason": "no_proposal"}
    pred = [float(v) for v in proposals[index][:4]]
    iou = box_iou(truth, pred)
    hits = [box_iou(truth, p[:4]) >= iou_threshold for p, s in zip(proposals, scores) if s is not None]
    return {
        "pred_box": pred,
        "pred_index": index,
        "pred_score": scores[index],
        "iou": round(iou, 4),
        "correct": iou >= iou_threshold,
        "reachable": any(hits),
        "chance": sum(hits) / len(hits),
    }


def evaluate_grounding(
    model: torch.nn.Module,
    dataset: GroundingEvalDataset,
    tokenizer,
    assets,
    cfg: GroundingEvalConfig,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one result per expression) of the grounding evaluation of ``dataset``.

    Under a process group each rank explains a contiguous share of the expressions and every rank returns
    every result, in dataset order; every rank must call it.
    """
    from tqdm import tqdm

    from albef.distributed import evaluation_share, gather_objects

    device = torch.device(device)
    layer = check_layer(model.cfg, cfg.layer, "evaluate_grounding.layer")
    max_tokens = cfg.max_tokens or model.cfg.text.max_positions
    start = time.perf_counter()
    mine = evaluation_share(len(dataset), "expressions")
    loader = DataLoader(
        Subset(dataset, mine), batch_size=cfg.batch_size, num_workers=cfg.num_workers, shuffle=False
    )
    results: list[dict[str, Any]] = []
    index = mine.start  # the expression's index in the whole dataset
    for images, texts, ref_ids in tqdm(loader, desc="grounding", disable=not progress, leave=False):
        tokens = tokenizer(list(texts), max_length=max_tokens).to(device)
        cam = gradcam_itm(model, images.to(device), tokens.input_ids, tokens.attention_mask, layer)
        for row, ref_id in enumerate(ref_ids.tolist()):
            results.append(_result(index, ref_id, texts[row], cam, row, assets, cfg))
            index += 1
    results = [r for share in gather_objects(results) for r in share]
    metrics = grounding_metrics(results, cfg.iou_threshold)
    metrics.update(
        layer=layer,
        area_power=cfg.area_power,
        eval_seconds=round(time.perf_counter() - start, 2),
    )
    return metrics, results


def _result(
    index: int, ref_id: int, text: str, cam: GradCAM, row: int, assets, cfg: GroundingEvalConfig
) -> dict:
    out: dict[str, Any] = {
        "index": index,
        "ref_id": ref_id,
        "split": assets.split.get(ref_id, ""),
        "text": text,
        "itm_logit": round(float(cam.itm_logits[row, 1]), 4),
    }
    problem = assets.box_problem(ref_id)
    if problem is not None:
        if cfg.bad_box == "error":
            raise ValueError(
                f"grounding evaluation: {problem} (bad_box: skip counts such expressions instead)"
            )
        reason = "ref_without_box" if "has no box" in problem else "bad_box"
        return {**out, "skipped": reason, "detail": problem}
    truth, width, height = assets.boxes[ref_id]
    image_id = assets.image_of.get(ref_id)
    proposals = assets.proposals.get(str(image_id), [])
    out["gt_box"] = [float(v) for v in truth]
    out.update(
        score_expression(
            cam.expression[row].cpu(), truth, width, height, proposals, cfg.area_power, cfg.iou_threshold
        )
    )
    return out


#: the official metric names of the RefCOCO+ splits (``grounding_eval``: val_d, testA_d, testB_d)
SPLIT_ORDER = ("val", "testA", "testB")


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def grounding_metrics(results: list[dict[str, Any]], iou_threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy (%) per split under the official names (``val_d``, ``testA_d``, ``testB_d``; other splits as
    ``<split>_d``), with counts, the proposal upper bound (% of expressions some proposal reaches), the
    expected accuracy of a random proposal, and skipped expressions by reason."""
    scored = [r for r in results if "skipped" not in r]
    splits = sorted({r["split"] for r in scored}, key=_split_key)

    def summary(rows: list[dict]) -> dict[str, Any]:
        n = len(rows)
        pct = (lambda v: round(100 * v / n, 3)) if n else (lambda v: 0.0)
        return {
            "accuracy": pct(sum(r["correct"] for r in rows)),
            "correct": sum(r["correct"] for r in rows),
            "expressions": n,
            "upper_bound": pct(sum(bool(r.get("reachable")) for r in rows)),
            "random_proposal": pct(sum(r.get("chance", 0.0) for r in rows)),
            "no_proposal": sum(r.get("reason") == "no_proposal" for r in rows),
        }

    per_split = {s: summary([r for r in scored if r["split"] == s]) for s in splits}
    metrics: dict[str, Any] = {f"{s or 'unknown'}_d": per_split[s]["accuracy"] for s in splits}
    metrics.update(
        accuracy=summary(scored)["accuracy"],
        expressions=len(scored),
        splits={s or "unknown": v for s, v in per_split.items()},
        skipped=dict(Counter(r["skipped"] for r in results if "skipped" in r)),
        iou_threshold=iou_threshold,
    )
    return metrics


# ------------------------------------------------------------------------------------------ pictures


def overlay(image: Image.Image, heat: torch.Tensor, blur: bool = True) -> torch.Tensor:
    """The notebook's ``getAttMap``: ``heat`` normalised to [0, 1], resized bicubically to the image,
    Gaussian-blurred (sigma 2% of the longest side) and renormalised, drawn with the jet colour map over the
    image with weight ``heat ** 0.7``. Returns an (H, W, 3) float image in [0, 1]."""
    import matplotlib
    import numpy as np
    from torchvision.transforms.functional import gaussian_blur

    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    height, width = rgb.shape[:2]

    def normalise(m: torch.Tensor) -> torch.Tensor:
        m = m - m.min()
        return m / m.max() if m.max() > 0 else m

    m = normalise(upsample_map(normalise(heat.float()), height, width))
    if blur:
        sigma = 0.02 * max(height, width)
        kernel = 2 * math.ceil(3 * sigma) + 1
        m = normalise(gaussian_blur(m[None, None], [kernel, kernel], [sigma, sigma])[0, 0])
    colours = torch.from_numpy(matplotlib.colormaps["jet"](m.numpy())[..., :3]).float()
    weight = (m**0.7)[..., None]
    return ((1 - weight) * rgb + weight * colours).clamp(0, 1)


def plot_word_maps(
    image: Image.Image,
    words: Sequence[str],
    word_maps: torch.Tensor,
    expression_map: torch.Tensor | None,
    path: str | Path,
    title: str = "",
    boxes: dict[str, Sequence[float] | None] | None = None,
    columns: int = 5,
) -> Path:
    """A PNG grid: the image (with ``boxes``: ``truth`` green, ``pred`` red), the expression's map, then one
    heat map per word piece (``word_maps`` (len(words), g, g))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from albef.io import atomic_write

    panels = 1 + (expression_map is not None) + len(words)
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    flat = list(axes.flat)
    flat[0].imshow(image)
    flat[0].set_title("image", fontsize=8)
    for name, colour in (("truth", "lime"), ("pred", "red")):
        box = (boxes or {}).get(name)
        if box is not None:
            x, y, w, h = box[:4]
            flat[0].add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
    k = 1
    if expression_map is not None:
        flat[k].imshow(overlay(image, expression_map).numpy())
        flat[k].set_title("expression (mean)", fontsize=8)
        k += 1
    for word, heat in zip(words, word_maps, strict=True):
        flat[k].imshow(overlay(image, heat).numpy())
        flat[k].set_title(word if heat.max() > 0 else f"{word} (zero map)", fontsize=9)
        k += 1
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def explain_image(
    model: torch.nn.Module,
    tokenizer,
    image: Image.Image,
    text: str,
    path: str | Path,
    layer: int | None = None,
    title: str | None = None,
    boxes: dict[str, Sequence[float] | None] | None = None,
    max_words: int = 30,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Grad-CAM maps of ``text`` on ``image``, one per word piece, drawn into the PNG ``path`` (``size``:
    draw the image resized to (width, height), e.g. the original size its boxes refer to)."""
    from albef.data.text import pre_caption
    from albef.data.transforms import eval_transform

    device = next(model.parameters()).device
    caption = pre_caption(text, max_words)
    tokens = tokenizer([caption], max_length=model.cfg.text.max_positions).to(device)
    pixels = eval_transform(model.cfg.vision.image_size)(image)[None].to(device)
    cam = gradcam_itm(model, pixels, tokens.input_ids, tokens.attention_mask, layer)
    ids = [i for i in tokens.input_ids[0].tolist() if i != tokenizer.pad_token_id]
    words = tokenizer.tokenizer.convert_ids_to_tokens(ids[1:])  # the word pieces after [CLS]
    shown = image.convert("RGB") if size is None else image.convert("RGB").resize(size, Image.BICUBIC)
    match = torch.softmax(cam.itm_logits[0], dim=0)[1].item()
    plot_word_maps(
        shown,
        words,
        cam.tokens[0, 1 : 1 + len(words)].cpu(),
        cam.expression[0].cpu(),
        path,
        title=title or f"{caption!r}  (ITM match p={match:.2f}, layer {cam.layer})",
        boxes=boxes,
    )
    return {
        "out": str(path),
        "text": caption,
        "words": words,
        "itm_match": round(match, 4),
        "layer": cam.layer,
    }


def explain(
    image: str | Path,
    text: str,
    model_dir: str | Path,
    out: str | Path,
    layer: int | None = None,
    tokenizer: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """``albef explain``: a PNG of the Grad-CAM heat map of every word of ``text`` on ``image``, computed on
    ``device`` (``--device``: auto, cpu, cuda or cuda:N)."""
    from albef.checkpoint import load_pretrained
    from albef.data.images import open_rgb
    from albef.tokenizer import load_tokenizer, model_tokenizer_dir

    placed = resolve_device(device, "--device")
    model = load_pretrained(model_dir).to(placed)
    layer = check_layer(model.cfg, layer, "--layer")
    tok = load_tokenizer(model_tokenizer_dir(model_dir, tokenizer), model.cfg)
    picture = open_rgb(Path(image))
    return explain_image(model, tok, picture, text, out, layer)


def stack_pngs(pngs: Sequence[str | Path], path: str | Path) -> Path:
    """The PNGs one under the other on a white sheet (narrower ones centred)."""
    from albef.io import atomic_write

    images = [Image.open(p).convert("RGB") for p in pngs]
    width = max(im.width for im in images)
    sheet = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    top = 0
    for im in images:
        sheet.paste(im, ((width - im.width) // 2, top))
        top += im.height
    path = Path(path)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="png"))
    return path


def pick_examples(results: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` scored expressions spread evenly over the results (deterministic)."""
    scored = [r for r in results if "skipped" not in r]
    if n <= 0 or not scored:
        return []
    step = max(1, len(scored) // n)
    return scored[::step][:n]


@dataclass
class EvalAssets(GroundingAssets):
    """The RefCOCO+ assets plus the image of each ref (its proposals are keyed by image id)."""

    image_of: dict[int, int] = field(default_factory=dict)  # ref_id -> image id


def load_assets(folder: str | Path) -> EvalAssets:
    folder = Path(folder)
    base = GroundingAssets.load(folder)
    image_of = {r["ref_id"]: r.get("image_id") for r in load_refs(folder / REFS_FILE)}
    return EvalAssets(base.boxes, base.split, base.proposals, image_of)


__all__ = [
    "GradCAM",
    "best_box",
    "box_iou",
    "box_scores",
    "evaluate_grounding",
    "explain",
    "gradcam_itm",
    "gradcam_maps",
    "grounding_metrics",
]
