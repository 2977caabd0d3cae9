"""Unimodal warm start for the embedded default: a small "DeiT" and a small "BERT" trained on the synthetic
benchmark, written in the formats ``pretrain.init_deit`` and ``pretrain.init_bert`` read.

ALBEF never starts from random encoders: the official pretraining loads an ImageNet-supervised DeiT and an
MLM-pretrained BERT. Without them, ITC on a from-scratch ViT and a from-scratch BERT sits at ln(batch): each
encoder's [CLS] feature is nearly constant across inputs, so neither gives the other a gradient to follow
(``benchmarks/alignment_probe.py`` shows the deadlock and that one trained encoder breaks it). This stage
reproduces the recipe at toy scale, on the pretraining split only:

* image: the ViT with a linear head on [CLS], multi-label supervised on the scenes' attributes (colours,
  shapes, colour-shape and size-shape pairs, object count, which half each colour and shape lies in),
  the analogue of DeiT's ImageNet labels;
* text: a Hugging Face ``BertForMaskedLM`` with the model's text dimensions, MLM on the pretraining captions,
  the analogue of bert-base-uncased.

With real data and real weights this stage is not needed: point ``pretrain.init_deit`` / ``init_bert`` at
DeiT and bert-base-uncased instead (README, "Real pretrained weights").
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    ModelConfig,
    build_dataclass,
    check_ranges,
    in_range,
    section,
)
from albef.data.datasets import image_source
from albef.data.transforms import eval_transform
from albef.device import check_device, resolve_device
from albef.io import replacing_folder, write_json
from albef.models.components import MaskSpec, RandomChoices
from albef.models.vision import ImageEncoder
from albef.models.xbert import hf_bert_config
from albef.tokenizer import ALBEFTokenizer

log = logging.getLogger(__name__)

DEIT_FILE = "deit.pth"
BERT_DIR = "bert"


@dataclass(frozen=True)
class UnimodalConfig:
    data_dir: str = "data/processed"
    scenes: str = "data/synth/scenes.json"  # the generator's ground truth: the "ImageNet labels"
    scene_size: int | None = None  # pixels the scene coordinates refer to; None: data_card.json beside scenes
    image_split: str = "images/pretrain/"  # only pretraining images: never the evaluation splits
    text_file: str = "pretrain.json"
    out: str = "models/unimodal"
    metrics: str = "metrics/unimodal.json"
    vision_steps: int = field(default=500, metadata=NON_NEGATIVE)
    text_steps: int = field(default=500, metadata=NON_NEGATIVE)
    batch_size: int = field(default=64, metadata=AT_LEAST_ONE)
    vision_lr: float = field(default=1.0e-3, metadata=POSITIVE)
    text_lr: float = field(default=5.0e-4, metadata=POSITIVE)
    warmup_steps: int = field(default=50, metadata=NON_NEGATIVE)
    weight_decay: float = field(default=0.05, metadata=NON_NEGATIVE)
    mask_probability: float = field(default=0.15, metadata=in_range(0, 1, low_open=True))
    max_tokens: int = field(default=30, metadata=AT_LEAST_ONE)
    heldout_fraction: float = 0.1  # images / captions kept out of training to measure what was learnt
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (albef.device); the draws are the same on every device

    def __post_init__(self) -> None:
        check_ranges(self, "unimodal")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"unimodal.heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        check_device(self.device, "unimodal.device")


class SceneLabels:
    """Multi-hot attribute labels of a synthetic scene; the label vocabulary comes from the scenes."""

    def __init__(self, scenes: dict[str, dict], scene_size: int):
        objects = [o for s in scenes.values() for o in s["objects"]]
        if not objects:
            raise ValueError("scenes hold no objects: nothing to supervise the image encoder with")
        self.colors = sorted({o["color"] for o in objects})
        self.shapes = sorted({o["shape"] for o in objects})
        self.sizes = sorted({o["size"] for o in objects})
        self.max_objects = max(len(s["objects"]) for s in scenes.values())
        self.scene_size = scene_size

    def names(self) -> list[str]:
        c, s = self.colors, self.shapes
        return [
            *c,
            *s,
            *(f"{a} {b}" for a in c for b in s),
            *(f"{a} {b}" for a in self.sizes for b in s),
            *(f"{n} objects" for n in range(1, self.max_objects + 1)),
            *(f"{v} {side}" for v in (*c, *s) for side in ("left", "right", "top", "bottom")),
        ]

    def __call__(self, scene: dict) -> torch.Tensor:
        objs = scene["objects"]
        half = self.scene_size / 2

        def has(**want) -> bool:
            return any(all(o[k] == v for k, v in want.items()) for o in objs)

        def where(key: str, value: str) -> list[bool]:
            mine = [o for o in objs if o[key] == value]
            return [
                any(o["x"] < half for o in mine),
                any(o["x"] >= half for o in mine),
                any(o["y"] < half for o in mine),
                any(o["y"] >= half for o in mine),
            ]

        y = [has(color=c) for c in self.colors] + [has(shape=s) for s in self.shapes]
        y += [has(color=c, shape=s) for c in self.colors for s in self.shapes]
        y += [has(size=z, shape=s) for z in self.sizes for s in self.shapes]
        y += [len(objs) == n for n in range(1, self.max_objects + 1)]
        y += [b for c in self.colors for b in where("color", c)]
        y += [b for s in self.shapes for b in where("shape", s)]
        return torch.tensor(y, dtype=torch.float)


def _scene_size(scenes_path: Path) -> int:
    card = scenes_path.parent / "data_card.json"
    try:
        return int(json.loads(card.read_text())["image_size"])
    except (OSError, KeyError, ValueError) as exc:
        raise FileNotFoundError(
            f"unimodal.scene_size is not set and {card} does not give the scenes' image_size ({exc})"
        ) from exc


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(
    opt: torch.optim.Optimizer,
    steps: int,
    lr: float,
    cfg: UnimodalConfig,
    loss_on: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    train: torch.Tensor,
    gen: torch.Generator,
    desc: str,
    progress: bool,
) -> None:
    """``steps`` optimiser steps at ``lr`` under :func:`_lr_factor`'s schedule, each on ``cfg.batch_size``
    indices drawn from ``train`` with ``gen``; ``loss_on(indices)`` returns the loss first."""
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, cfg.warmup_steps)
        loss = loss_on(train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)])[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def _split(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    heldout = max(1, int(n * fraction))
    return order[heldout:], order[:heldout]


def train_image_encoder(
    cfg: UnimodalConfig, model_cfg: ModelConfig, progress: bool, device: torch.device | None = None
) -> tuple[ImageEncoder, dict]:
    """The ViT trained with a linear head on the scenes' attribute labels, on ``device`` (default: the CPU).

    Every random draw (split, batches) comes from a CPU generator and only the drawn indices move to the
    device, so a GPU run trains on the same batches as a CPU run."""
    device = device or torch.device("cpu")
    scenes_path = Path(cfg.scenes)
    if not scenes_path.is_file():
        raise FileNotFoundError(f"unimodal.scenes: {scenes_path} does not exist (run `albef data synth`)")
    scenes = {k: v for k, v in json.loads(scenes_path.read_text()).items() if k.startswith(cfg.image_split)}
    if not scenes:
        raise ValueError(f"{scenes_path} has no scene under {cfg.image_split!r}")
    labels = SceneLabels(scenes, cfg.scene_size or _scene_size(scenes_path))
    images = image_source(cfg.data_dir)
    transform = eval_transform(model_cfg.vision.image_size)
    keys = sorted(scenes)
    # A few thousand 48-px images fit in memory: decode once instead of every step.
    pixels = torch.stack([transform(images.open(k)) for k in keys]).to(device)
    targets = torch.stack([labels(scenes[k]) for k in keys]).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, heldout = _split(len(keys), cfg.heldout_fraction, gen)

    torch.manual_seed(cfg.seed)
    encoder = ImageEncoder(model_cfg.vision).to(device)  # initialised on the CPU: the same weights everywhere
    head = nn.Linear(model_cfg.vision.width, targets.shape[1]).to(device)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay)

    def loss_on(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(device)
        logits = head(encoder(pixels[index])[:, 0])
        return F.binary_cross_entropy_with_logits(logits, targets[index]), logits

    _fit(opt, cfg.vision_steps, cfg.vision_lr, cfg, loss_on, train, gen, "unimodal image", progress)
    encoder.eval()
    with torch.no_grad():
        train_loss, _ = loss_on(train)
        loss, logits = loss_on(heldout)
        truth = targets[heldout.to(device)]
        accuracy = ((logits > 0).float() == truth).float().mean().item()
        # Predicting every label's training frequency is the floor a useless encoder reaches.
        prior = targets[train.to(device)].mean(0).clamp(1e-4, 1 - 1e-4)
        floor = F.binary_cross_entropy(prior.expand_as(truth), truth).item()
    encoder.train()
    return encoder, {
        "image_labels": targets.shape[1],
        "image_train_bce": round(train_loss.item(), 5),
        "image_heldout_bce": round(loss.item(), 5),
        "image_heldout_bce_prior": round(floor, 5),
        "image_heldout_label_accuracy": round(accuracy, 5),
    }


def train_text_encoder(
    cfg: UnimodalConfig,
    model_cfg: ModelConfig,
    tokenizer: ALBEFTokenizer,
    progress: bool,
    device: torch.device | None = None,
) -> tuple[nn.Module, dict]:
    """A BERT trained with MLM on the captions, on ``device`` (default: the CPU); batches and masks are drawn on
    the CPU, as for the image encoder."""
    from transformers import BertForMaskedLM

    device = device or torch.device("cpu")

    path = Path(cfg.data_dir) / cfg.text_file
    if not path.is_file():
        raise FileNotFoundError(f"unimodal.text_file: {path} does not exist")
    captions = []
    for record in json.loads(path.read_text()):
        caption = record["caption"]
        captions.extend(caption if isinstance(caption, list) else [caption])
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError(f"{path} has no caption to train the text encoder on")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train, heldout = _split(len(captions), cfg.heldout_fraction, gen)
    spec = MaskSpec.of(model_cfg, cfg.mask_probability)
    choices = RandomChoices(gen)

    torch.manual_seed(cfg.seed + 1)
    bert = BertForMaskedLM(hf_bert_config(model_cfg)).to(device)
    opt = torch.optim.AdamW(bert.parameters(), lr=cfg.text_lr, weight_decay=0.01)

    def batch_loss(index: torch.Tensor) -> tuple[torch.Tensor, float]:
        tokens = tokenizer([captions[i] for i in index.tolist()], max_length=cfg.max_tokens)
        ids, labels = choices.mlm_mask(tokens.input_ids, spec)
        ids, labels, mask = ids.to(device), labels.to(device), tokens.attention_mask.to(device)
        out = bert(input_ids=ids, attention_mask=mask, labels=labels)
        picked = labels != -100
        correct = (out.logits.argmax(-1)[picked] == labels[picked]).float().mean().item()
        return out.loss, correct

    _fit(opt, cfg.text_steps, cfg.text_lr, cfg, batch_loss, train, gen, "unimodal text", progress)
    bert.eval()
    with torch.no_grad():
        loss, accuracy = batch_loss(heldout)
    return bert, {
        "text_heldout_mlm_loss": round(loss.item(), 5),
        "text_heldout_mlm_accuracy": round(accuracy, 5),
        "text_captions": len(captions),
    }


def unimodal_stage(params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Train both encoders and write ``out/deit.pth`` and ``out/bert/`` (all or nothing)."""
    cfg = build_dataclass(UnimodalConfig, section(params, "unimodal"), "unimodal")
    # one process: `albef unimodal` is not among the commands that run under torchrun
    device = resolve_device(cfg.device, "unimodal.device")
    model_cfg = ModelConfig.from_dict(section(params, "model"))
    tokenizer = ALBEFTokenizer.from_pretrained(Path(cfg.data_dir) / "tokenizer")
    tokenizer.check_compatible(model_cfg.text)
    encoder, image_metrics = train_image_encoder(cfg, model_cfg, progress, device)
    bert, text_metrics = train_text_encoder(cfg, model_cfg, tokenizer, progress, device)
    # written from the CPU, so the files load on any machine (pretrain.init_deit / init_bert)
    encoder.cpu()
    bert.cpu()

    metrics = {**image_metrics, **text_metrics}
    with replacing_folder(cfg.out) as partial:
        torch.save({"model": encoder.state_dict()}, partial / DEIT_FILE)
        bert.save_pretrained(partial / BERT_DIR)
        write_json(partial / "summary.json", {"config": asdict(cfg), "metrics": metrics})
    if cfg.metrics:
        write_json(cfg.metrics, metrics)
    log.info("unimodal encoders written to %s: %s", cfg.out, metrics)
    return metrics
