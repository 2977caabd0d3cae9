"""The training stages as plain functions of a ``params.yaml``, and the one body every task's training runs in
(:func:`run_training`; the evaluations are :mod:`albef.eval.stages`).

``pretrain``            ITC + ITM + MLM with momentum distillation (``params.pretrain``)
``finetune retrieval``  ITC + ITM with same-image positives from a pretrained model (``params.finetune_retrieval``)
``finetune grounding``  the same retrieval model and losses on RefCOCO+ train expressions paired with their whole
                        image, no boxes: weakly supervised grounding (``params.finetune_grounding``)

The CLI, ``dvc.yaml`` and Prefect call these. Each works the same in one process and under ``torchrun`` or
SLURM (every rank computes, rank 0 writes). Training sections are flat: the :class:`TrainConfig` keys
(``epochs``, ``lr``, ...) next to the stage's own keys (:class:`TrainStageConfig`), so
``dvc exp run -S pretrain.epochs=2`` reaches the training loop directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from albef.checkpoint import build_model, load_for_task, save_pretrained
from albef.config import (
    AT_LEAST_ONE,
    ConfigError,
    LossSwitches,
    ModelConfig,
    build_dataclass,
    section,
)
from albef.device import check_device, resolve_precision
from albef.distributed import stage_process
from albef.io import can_draw, replacing_folder, write_json
from albef.model_files import CONFIG_FILE, WEIGHTS_FILE
from albef.tasks import TASKS, check_task
from albef.tokenizer import load_tokenizer
from albef.train.engine import FitResult, TrainConfig, Trainer, file_digest, fingerprint

log = logging.getLogger(__name__)
# DataLoader workers tokenize in forked processes; the Rust tokenizer's own threads must not be inherited.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class TrainStageConfig:
    """What a training stage reads and writes, next to its :class:`TrainConfig`."""

    data_dir: str = "data/processed"  # preprocessed data (shards or an image folder, annotations, tokenizer)
    train_file: str = "pretrain.json"
    val_file: str | None = None  # a retrieval split for validation after epochs (null: none)
    init: str | None = None  # initial weights: an albef model folder (any task) or an official .pth
    init_bert: str | None = None  # when init is null: a BERT folder/hub name for the text encoder
    init_deit: str | None = None  # ... and a DeiT checkpoint/timm name for the image encoder
    tokenizer: str | None = None  # default: <data_dir>/tokenizer
    out: str = "models/pretrain"  # exported weights (safetensors + config + tokenizer)
    run_dir: str = "runs/pretrain"  # checkpoints and logs; kept between runs so interrupted runs resume
    metrics: str | None = None  # a JSON for DVC
    plots: str | None = None  # a folder for loss/validation curves (CSV for DVC plots, PNG)
    max_tokens: int = field(default=30, metadata=AT_LEAST_ONE)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True  # the official flips; captions with "left"/"right" then lie half the time
    augment: bool = True  # RandomAugment(2, 7)
    k_test: int = field(default=16, metadata=AT_LEAST_ONE)  # ITM re-ranking depth in validation
    eval_batch_size: int = field(default=64, metadata=AT_LEAST_ONE)

    def transform(self, name: str, image_size: int):
        """The training transform ``name`` with this stage's augmentation (``crop_scale`` where it crops)."""
        from albef.data.transforms import build_transform

        crop = {"scale": self.crop_scale} if name in _CROPPING else {}
        return build_transform(name, image_size, hflip=self.hflip, augment=self.augment, **crop)


_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"losses"}  # the switches are flat keys of their own
_STAGE_KEYS = {f.name for f in fields(TrainStageConfig)}
# the loss switches of a section read with split_train_section(values, name) alone (the flows check overrides so)
_SECTION_LOSS_KEYS = {task.train_section: task.loss_keys for task in TASKS.values()}


def split_train_section(
    values: dict[str, Any], name: str, loss_keys: tuple[str, ...] | None = None
) -> tuple[TrainStageConfig, TrainConfig]:
    """One flat ``params.yaml`` section -> (stage settings, training settings); unknown keys are named.

    ``loss_keys``: the loss switches the section may set (its task's ``loss_keys``; default: by section name,
    none for an unknown one). They become ``TrainConfig.losses``, validated, errors naming ``<name>.<key>``."""
    values = dict(values)
    if loss_keys is None:
        loss_keys = _SECTION_LOSS_KEYS.get(name, ())
    losses = LossSwitches.pop_from(values, loss_keys, name)
    unknown = sorted(set(values) - _TRAIN_KEYS - _STAGE_KEYS)
    if unknown:
        expected = sorted(_TRAIN_KEYS | _STAGE_KEYS | set(loss_keys))
        raise ConfigError(f"{name}: unknown key(s) {unknown}; expected some of {expected}")
    stage_values = {k: v for k, v in values.items() if k in _STAGE_KEYS}
    if "crop_scale" in stage_values:
        scale = stage_values["crop_scale"]
        if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ConfigError(
                f"{name}.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {scale}"
            )
    train_values = {k: v for k, v in values.items() if k in _TRAIN_KEYS}
    train = build_dataclass(TrainConfig, {**train_values, "losses": losses}, name)
    check_device(train.device, f"{name}.device")
    return build_dataclass(TrainStageConfig, stage_values, name), train


# ---------------------------------------------------------------------------------------------- batches


class Collate:
    """Stack images and tokenize captions (padding to the longest, ``max_tokens`` at most) per batch."""

    def __init__(self, tokenizer, max_tokens: int, with_idx: bool):
        self.tokenizer, self.max_tokens, self.with_idx = tokenizer, max_tokens, with_idx

    def __call__(self, samples: list[tuple]) -> dict[str, torch.Tensor]:
        images = torch.stack([s[0] for s in samples])
        tokens = self.tokenizer([s[1] for s in samples], max_length=self.max_tokens)
        batch = {"images": images, "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}
        if self.with_idx:
            batch["idx"] = torch.tensor([s[2] for s in samples], dtype=torch.long)
        return batch


def pretrain_forward(model, batch, alpha, choices):
    return model(batch["images"], batch["input_ids"], batch["attention_mask"], alpha=alpha, choices=choices)


def retrieval_forward(model, batch, alpha, choices):
    inputs = (batch[k] for k in ("images", "input_ids", "attention_mask", "idx"))
    return model(*inputs, alpha=alpha, choices=choices)


_TASKS = {
    # task: (dataset class name, transform, forward, uses image ids)
    "pretrain": ("PretrainDataset", "pretrain", pretrain_forward, False),
    "retrieval": ("RetrievalTrainDataset", "train", retrieval_forward, True),
    # the official Grounding.py: the retrieval model and training on (image, expression) pairs
    "grounding": ("GroundingTrainDataset", "grounding_train", retrieval_forward, True),
}
#: transforms that crop at random (crop_scale applies); the grounding one resizes the whole image
_CROPPING = ("pretrain", "train")


# ---------------------------------------------------------------------------------------------- helpers


def initial_model(stage: TrainStageConfig, task: str, params: dict[str, Any]):
    """The model a training stage starts from, and a digest of where its weights came from."""
    base = ModelConfig.from_dict(params["model"], prefix="model") if "model" in params else None
    if stage.init:
        model, report = load_for_task(stage.init, task, base)
        if report is not None:
            log.info("initialised %s model from %s: %s", task, stage.init, report.summary())
        source = Path(stage.init)
        weights = source / WEIGHTS_FILE if source.is_dir() else source
        return model, {"init": str(source), "digest": file_digest(weights)}
    if base is None:
        raise ConfigError("params.yaml has no 'model' section and the stage has no init: weights")
    model = build_model(task, base)
    if stage.init_bert or stage.init_deit:
        from albef.pretrained import init_from_pretrained

        init_from_pretrained(model, stage.init_bert, stage.init_deit)
    return model, {"init_bert": stage.init_bert, "init_deit": stage.init_deit}


def data_digest(stage: TrainStageConfig, tokenizer_dir: Path) -> dict[str, str]:
    data = Path(stage.data_dir)
    out = {"train_file": file_digest(data / stage.train_file)}
    manifest = data / "manifest.json"
    if manifest.is_file():
        out["manifest"] = file_digest(manifest)
    for name in ("tokenizer.json", "vocab.txt"):
        if (tokenizer_dir / name).is_file():
            out[name] = file_digest(tokenizer_dir / name)
    return out


def export_model(model, out: str | Path, tokenizer, best_dir: Path | None, summary: dict) -> Path:
    """Write the downstream model (safetensors + config + tokenizer + training summary) into ``out``, all or
    nothing (:func:`~albef.io.replacing_folder`)."""
    with replacing_folder(out) as partial:
        if best_dir is not None and (best_dir / WEIGHTS_FILE).is_file():
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copy2(best_dir / name, partial / name)
        else:
            save_pretrained(model, partial)
        tokenizer.save(partial / "tokenizer")
        write_json(partial / "training.json", summary)
    return Path(out)


def write_curves(run_dir: Path, plots_dir: str | Path | None, title: str) -> None:
    """Copy the loss and validation logs to the DVC plots folder and draw them as a PNG."""
    if not plots_dir:
        return
    plots = Path(plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    curves = {}
    for name in ("history", "validation"):
        src = run_dir / f"{name}.csv"
        if src.is_file():
            target = plots / ("train.csv" if name == "history" else "validation.csv")
            shutil.copyfile(src, target)
            curves[name] = target
    if "history" in curves and can_draw(plots / "curves.png"):
        _plot_curves(curves, plots / "curves.png", title)


def _plot_curves(curves: dict[str, Path], path: Path, title: str) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curves["history"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    steps = [float(r["step"]) for r in rows]
    losses = [k for k in rows[0] if k.startswith("loss")]
    panels = 2 + ("validation" in curves)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    for ax, name in zip(axes, ("training losses", "learning rate", "validation (%)"), strict=False):
        ax.set_xlabel("step")
        ax.set_title(name)
    for k in losses:
        axes[0].plot(steps, [float(r[k]) for r in rows], label=k)
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [float(r["lr"]) for r in rows], label="lr")
    if "alpha" in rows[0]:
        twin = axes[1].twinx()
        twin.plot(steps, [float(r["alpha"]) for r in rows], color="tab:orange", label="alpha")
        twin.set_ylabel("alpha")
    if "validation" in curves:
        with open(curves["validation"], newline="") as fh:
            vrows = list(csv.DictReader(fh))
        for k in ("txt_r1", "img_r1", "r_mean", "accuracy"):
            if vrows and k in vrows[0]:
                axes[2].plot([float(r["step"]) for r in vrows], [float(r[k]) for r in vrows], "o-", label=k)
        axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class TrainingData:
    """What one task trains on, built by its stage once the model and tokenizer exist (:func:`run_training`)."""

    dataset: Any
    collate: Callable[[list], dict[str, torch.Tensor]]
    forward: Callable  # the Trainer's forward: (model, batch, alpha, choices) -> the model's output
    validate: Callable[[Any], dict[str, float]] | None = None
    unit: str = "samples"  # what a dataset item is, in the error for a dataset smaller than one global batch
    settings: dict[str, Any] = field(default_factory=dict)  # the task's own settings: fingerprinted, exported
    info: dict[str, Any] = field(default_factory=dict)  # facts about the data, added to the metrics
    extra_files: dict[str, Path] = field(default_factory=dict)  # exported beside the weights: name -> source


def run_training(
    params: dict[str, Any],
    name: str,
    task: str,
    stage: TrainStageConfig,
    train: TrainConfig,
    build_data: Callable[..., TrainingData],
    progress: bool = True,
    on_log=None,
) -> dict[str, Any]:
    """The one body of every training stage: the ``task`` model from ``stage.init`` (or the encoders), its
    tokenizer, the task's data (``build_data(model, tokenizer, world, device)``), the resumable Trainer, then
    (rank 0) the export, the metrics JSON and the curves. Returns the metrics written for DVC."""
    # (the precision is resolved here and not only in the Trainer: one this device lacks fails before any work)
    with stage_process(train.device, train.precision, name) as (world, device, _):
        torch.manual_seed(train.seed)  # the same initial weights on every rank (DDP checks it)
        model, init_info = initial_model(stage, TASKS[task].model, params)
        if TASKS[task].loss_keys:  # (text assignment has a single loss and no switches)
            model.use_losses(train.losses)
        if hasattr(model, "image_queue"):  # the ITC queues advance by the gathered batch
            model.cfg.check_global_batch(train.batch_size * world.world_size, prefix=f"{name}: model")
        tokenizer_dir = Path(stage.tokenizer or Path(stage.data_dir) / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir, model.cfg)
        data = build_data(model, tokenizer, world, device)
        if len(data.dataset) < train.batch_size * world.world_size:
            raise ConfigError(
                f"{name}: {Path(stage.data_dir) / stage.train_file} has {len(data.dataset)} {data.unit}, fewer "
                f"than one global batch ({train.batch_size} x {world.world_size} processes)"
            )
        run_fp = fingerprint(
            task,
            train.fingerprint_fields(),
            {k: v for k, v in asdict(stage).items() if k not in ("out", "metrics", "plots", "run_dir")},
            *([data.settings] if data.settings else []),
            model.cfg.to_dict(),
            init_info,
            data_digest(stage, tokenizer_dir),
            world.world_size,
        )
        trainer = Trainer(
            model,
            data.dataset,
            data.collate,
            data.forward,
            train,
            stage.run_dir,
            world,
            device,
            run_fp,
            validate=data.validate,
            on_log=on_log,
            progress=progress,
            name=name,
        )
        result = trainer.fit()
        metrics = {**train_metrics(result, trainer), **data.info}
        if world.is_main:
            best_dir = Path(stage.run_dir) / "best" if train.select_metric and result.best else None
            summary = {
                "stage": name,
                "task": task,
                "fingerprint": run_fp,
                "settings": {"train": asdict(train), "stage": asdict(stage), **data.settings},
                "metrics": metrics,
                "selected": result.best,
            }
            out = export_model(model, stage.out, tokenizer, best_dir, summary)
            for file_name, source in data.extra_files.items():
                shutil.copyfile(source, out / file_name)
            if stage.metrics:
                write_json(stage.metrics, metrics)
            write_curves(Path(stage.run_dir), stage.plots, f"{name} ({task})")
            log.info("%s: exported %s; %s", name, stage.out, json.dumps(metrics, sort_keys=True))
        return metrics


def contrastive_train_settings(
    params: dict[str, Any], task: str, name: str
) -> tuple[TrainStageConfig, TrainConfig]:
    """``params[name]`` read as :func:`train_stage` reads it for ``task`` (pretrain, retrieval, grounding)."""
    check_task(task, list(_TASKS))
    return split_train_section(section(params, name), name, TASKS[task].loss_keys)


def train_stage(
    params: dict[str, Any], name: str, task: str, progress: bool = True, on_log=None
) -> dict[str, Any]:
    """Train ``task`` (pretrain, retrieval, grounding) with the settings of section ``name``; returns the
    metrics written for DVC."""
    stage, train = contrastive_train_settings(params, task, name)
    dataset_cls, transform_name, forward, with_idx = _TASKS[task]

    def build_data(model, tokenizer, world, device) -> TrainingData:
        from albef.data import datasets as ds
        from albef.data.transforms import eval_transform

        images = ds.image_source(stage.data_dir)
        size = model.cfg.vision.image_size
        transform = stage.transform(transform_name, size)
        dataset = getattr(ds, dataset_cls)(Path(stage.data_dir) / stage.train_file, images, transform)
        validate = None
        if stage.val_file:
            val_set = ds.RetrievalEvalDataset(
                Path(stage.data_dir) / stage.val_file, images, eval_transform(size)
            )
            validate = _retrieval_validator(val_set, tokenizer, stage, device, train.precision)
        return TrainingData(dataset, Collate(tokenizer, stage.max_tokens, with_idx), forward, validate)

    return run_training(params, name, task, stage, train, build_data, progress, on_log)


def train_metrics(result: FitResult, trainer: Trainer) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "steps": result.step,
        # epochs trained, fractional when max_steps stopped the run inside an epoch
        "epochs": round(result.step / trainer.steps_per_epoch, 3),
        "train_seconds": round(result.seconds, 2),
        "samples_per_s": round(result.samples_per_second, 2),
        **{k: round(v, 5) for k, v in result.last_log.items() if k.startswith("loss") or k == "temp"},
    }
    if result.validations:
        metrics["val"] = {k: round(v, 3) for k, v in result.validations[-1].items()}
    if result.best is not None and trainer.cfg.select_metric:
        metrics["selected"] = {k: round(float(v), 3) for k, v in result.best.items()}
    return metrics


def _retrieval_validator(val_set, tokenizer, stage: TrainStageConfig, device, precision: str):
    from albef.eval.retrieval import evaluate_retrieval

    amp = resolve_precision(precision, device)

    def validate(model) -> dict[str, float]:
        result = evaluate_retrieval(
            model,
            val_set,
            tokenizer,
            k_test=stage.k_test,
            max_tokens=stage.max_tokens,
            device=device,
            image_batch=stage.eval_batch_size,
            amp_dtype=amp,
        )
        itc = {f"itc_{k}": v for k, v in result.itc_metrics.items() if k in ("txt_r1", "img_r1", "r_mean")}
        return {**result.metrics, **itc}

    return validate


def pretrain_stage(params: dict[str, Any], progress: bool = True, on_log=None) -> dict[str, Any]:
    return train_stage(params, "pretrain", "pretrain", progress, on_log)


def finetune_stage(params: dict[str, Any], task: str, progress: bool = True, on_log=None) -> dict[str, Any]:
    check_task(task, [name for name in _TASKS if name != "pretrain"], "finetuning task")
    return train_stage(params, f"finetune_{task}", task, progress, on_log)


__all__ = [
    "Collate",
    "TrainStageConfig",
    "TrainingData",
    "export_model",
    "finetune_stage",
    "pretrain_stage",
    "run_training",
    "split_train_section",
    "train_stage",
]
