"""The SNLI-VE and NLVR2 stages as plain functions of a ``params.yaml`` (the CLI, ``dvc.yaml`` and Prefect call
these), the way :mod:`albef.train.vqa` does VQA.

``finetune_classifier_stage(params, "ve")``       SNLI-VE finetuning (``params.finetune_ve``), official ``VE.py``
``finetune_classifier_stage(params, "nlvr")``     NLVR2 finetuning (``params.finetune_nlvr``), official ``NLVR.py``
``finetune_classifier_stage(params, "nlvr_ta")``  NLVR2 text-assignment pretraining on pretraining image-caption
                                                  pairs (``params.pretrain_nlvr``), official ``Pretrain_nlvr.py``
``evaluate_classifier_stage(params, "ve"|"nlvr", model_dir, out_dir)``  accuracy on a test split
                                                  (``params.evaluate_ve`` / ``params.evaluate_nlvr``)

Training sections are flat like the other training sections (:class:`~albef.train.engine.TrainConfig` and
:class:`~albef.train.stages.TrainStageConfig` keys) plus ``max_words`` (sentence words kept, official 30) and,
for VE and NLVR2, ``missing_images`` (``error`` | ``skip``, see :mod:`albef.data.classify`). Defaults not given
in the section are the official configs' (``configs/VE.yaml``, ``NLVR.yaml``, ``NLVR_pretrain.yaml``): lr 2e-5,
VE 5 epochs of 32 without the alpha warm-up, NLVR2 10 epochs of 16 with it, TA one epoch. As the official
scripts, VE and NLVR2 validate on the dev split after every epoch and export the weights with the best dev
accuracy (``val_file: null`` turns this off and exports the last weights).

``init``: VE takes any albef model folder or official checkpoint (a pretraining export gets a fresh
``cls_head``); NLVR2 takes the TA export (or a pretraining one: the fusion layers are duplicated either way)
and, as the official ``NLVR.py``, keeps its freshly initialised momentum teacher unless
``model.quirks.nlvr_teacher_copy_before_load`` is false.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from albef.checkpoint import load_task_model
from albef.config import ConfigError, build_dataclass, section
from albef.device import check_device, check_precision, resolve_precision
from albef.distributed import stage_process
from albef.eval.settings import ClassifierEvalConfig
from albef.io import write_json, write_metrics
from albef.tasks import TASKS, check_task
from albef.train.stages import (
    Collate,
    TrainingData,
    run_training,
    split_train_section,
)

log = logging.getLogger(__name__)

#: training task -> its params.yaml section
TRAIN_SECTIONS = {
    name: task.train_section
    for name, task in TASKS.items()
    if task.train_entry == f"{__name__}:finetune_classifier_stage"
}
#: evaluated task -> its params.yaml section
EVAL_SECTIONS = {
    name: task.eval_section
    for name, task in TASKS.items()
    if task.eval_entry == f"{__name__}:evaluate_classifier_stage"
}

# Defaults of each training section (official configs); anything in params.yaml wins.
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "ve": {
        "train_file": "ve_train.json",
        "val_file": "ve_dev.json",
        "out": "models/ve",
        "run_dir": "runs/ve",
        "epochs": 5,
        "batch_size": 32,
        "lr": 2e-5,
        "alpha_ramp_epochs": 0.0,  # VE.yaml warm_up: False
        "crop_scale": (0.5, 1.0),
        "max_tokens": 40,
    },
    "nlvr": {
        "train_file": "nlvr_train.json",
        "val_file": "nlvr_dev.json",
        "out": "models/nlvr",
        "run_dir": "runs/nlvr",
        "epochs": 10,
        "batch_size": 16,
        "lr": 2e-5,
        "alpha_ramp_epochs": 1.0,  # NLVR.yaml warm_up: True
        "crop_scale": (0.5, 1.0),
        "max_tokens": 40,
    },
    "nlvr_ta": {
        "train_file": "pretrain.json",
        "out": "models/nlvr_ta",
        "run_dir": "runs/nlvr_ta",
        "epochs": 1,
        "batch_size": 32,
        "lr": 2e-5,
        "crop_scale": (0.2, 1.0),  # the pretraining transform
        "max_tokens": 30,
    },
}


# ---------------------------------------------------------------------------------------------- forwards


def classifier_forward(model, batch, alpha, choices):
    """The Trainer's forward for VE and NLVR2 (no random choices: the distillation target is the teacher)."""
    return model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["targets"], alpha=alpha)


def text_assignment_forward(model, batch, alpha, choices):
    """The Trainer's forward for TA pretraining; the image assignment is drawn as the official code draws it
    (torch's global generator, whose state the Trainer's checkpoints keep)."""
    return model(batch["images"], batch["input_ids"], batch["attention_mask"])


# ---------------------------------------------------------------------------------------------- helpers


def _accuracy_validator(val_set, collate, batch_size: int, device, precision: str):
    from albef.data.classify import LABEL_NAMES
    from albef.eval.classify import accuracy_metrics, classify

    amp = resolve_precision(precision, device)
    names = LABEL_NAMES[val_set.task]

    def validate(model) -> dict[str, float]:
        result = classify(model, val_set, collate, batch_size=batch_size, device=device, amp_dtype=amp)
        metrics = accuracy_metrics(val_set.labels, result.predictions, names)
        out = {"accuracy": metrics["accuracy"]}
        out.update(
            {f"acc_{k}": v["accuracy"] for k, v in metrics["per_class"].items() if v["accuracy"] is not None}
        )
        return out

    return validate


# ---------------------------------------------------------------------------------------------- stages


def classifier_train_settings(params: dict[str, Any], task: str, name: str | None = None):
    """``params[name]`` (default :data:`TRAIN_SECTIONS`) read as :func:`finetune_classifier_stage` reads it:
    (stage config, train config, word limit, missing-image policy). Bad values fail with the key named."""
    check_task(task, list(TRAIN_SECTIONS), "classification task")
    name = name or TRAIN_SECTIONS[task]
    values = section(params, name)
    max_words = int(values.pop("max_words", 30))
    missing_images = values.pop("missing_images", "error") if task != "nlvr_ta" else None
    for key, value in _TRAIN_DEFAULTS[task].items():
        values.setdefault(key, value)
    if task != "nlvr_ta" and values.get("val_file"):
        values.setdefault("select_metric", "accuracy")
    stage, train = split_train_section(values, name, TASKS[task].loss_keys)
    if task == "nlvr_ta" and stage.val_file:
        raise ConfigError(f"{name}.val_file: text-assignment pretraining has no validation (as the official)")
    if task == "nlvr_ta" and train.batch_size < 3:
        raise ConfigError(f"{name}.batch_size: text assignment needs at least 3 images per batch")
    return stage, train, max_words, missing_images


def classifier_eval_settings(
    params: dict[str, Any], task: str, name: str | None = None
) -> ClassifierEvalConfig:
    check_task(task, list(EVAL_SECTIONS), "classification task")
    name = name or EVAL_SECTIONS[task]
    values = section(params, name)
    values.setdefault("test_file", f"{task}_test.json")
    values.setdefault("train_file", f"{task}_train.json")
    cfg = build_dataclass(ClassifierEvalConfig, values, name)
    check_device(cfg.device, f"{name}.device")
    check_precision(cfg.precision, f"{name}.precision")
    return cfg


def finetune_classifier_stage(
    params: dict[str, Any], task: str, progress: bool = True, on_log=None, name: str | None = None
) -> dict[str, Any]:
    """Train ``task`` (``ve``, ``nlvr`` or ``nlvr_ta``) with the settings of ``params[name]`` (default
    :data:`TRAIN_SECTIONS`); returns the metrics written for DVC."""
    stage, train, max_words, missing_images = classifier_train_settings(params, task, name)
    name = name or TRAIN_SECTIONS[task]

    def build_data(model, tokenizer, world, device) -> TrainingData:
        from albef.data import datasets as ds
        from albef.data.classify import ClassificationCollate, ClassificationDataset
        from albef.data.transforms import build_transform, eval_transform

        images = ds.image_source(stage.data_dir)
        size = model.cfg.vision.image_size
        train_file = Path(stage.data_dir) / stage.train_file
        settings = {"max_words": max_words, "missing_images": missing_images}
        if task == "nlvr_ta":
            transform = build_transform(
                "pretrain", size, scale=stage.crop_scale, hflip=stage.hflip, augment=stage.augment
            )
            # kept for the official checkpoint keys, unused by the TA forward: frozen, so DDP does not wait for
            # their gradients (AdamW leaves a parameter without gradient unchanged either way)
            model.text_proj.requires_grad_(False)
            model.temp.requires_grad_(False)
            return TrainingData(
                ds.PretrainDataset(train_file, images, transform, max_words=max_words),
                Collate(tokenizer, stage.max_tokens, with_idx=False),
                text_assignment_forward,
                unit="records",
                settings=settings,
            )
        transform = build_transform(
            "train", size, scale=stage.crop_scale, hflip=stage.hflip, augment=stage.augment
        )
        dataset = ClassificationDataset(
            train_file, task, images, transform, max_words=max_words, missing_images=missing_images
        )
        info = {"train_records": len(dataset), "skipped_missing_images": len(dataset.skipped)}
        collate = ClassificationCollate(tokenizer, stage.max_tokens)
        validate = None
        if stage.val_file:
            val_set = ClassificationDataset(
                Path(stage.data_dir) / stage.val_file,
                task,
                images,
                eval_transform(size),
                max_words=max_words,
                missing_images=missing_images,
            )
            info["val_records"] = len(val_set)
            info["val_skipped_missing_images"] = len(val_set.skipped)
            validate = _accuracy_validator(val_set, collate, stage.eval_batch_size, device, train.precision)
        return TrainingData(
            dataset, collate, classifier_forward, validate, unit="records", settings=settings, info=info
        )

    return run_training(params, name, task, stage, train, build_data, progress, on_log)


#: the metrics key of each task's text-only baseline
TEXT_ONLY_KEYS = {"ve": "hypothesis_only_accuracy", "nlvr": "sentence_only_accuracy"}


def _sentence_only(cfg: ClassifierEvalConfig, task: str, name: str, test_set) -> dict[str, Any]:
    """The accuracy of a classifier that reads the sentence alone (the SNLI-VE hypothesis, the NLVR2
    statement), trained on ``cfg.train_file`` and scored on the records the model is scored on
    (:mod:`albef.eval.text_baseline`), under :data:`TEXT_ONLY_KEYS`; nothing when there is no training file."""
    from albef.data.classify import LABEL_NAMES
    from albef.data.formats import load_annotations
    from albef.data.text import pre_caption
    from albef.eval.text_baseline import text_only_classification

    if not cfg.train_file:
        return {}
    train_path = Path(cfg.data_dir) / cfg.train_file
    if not train_path.is_file():
        log.warning("%s: no sentence-only baseline: %s not found", name, train_path)
        return {}
    names = LABEL_NAMES[task]
    train = load_annotations(train_path, task)
    result = text_only_classification(
        [pre_caption(r["sentence"], cfg.max_words) for r in train],
        [names.index(r["label"]) for r in train],
        [test_set.sentence(i) for i in range(len(test_set))],
        test_set.labels,
        len(names),
    )
    key = TEXT_ONLY_KEYS[task]
    return {
        key: result["accuracy"],
        key.removesuffix("_accuracy"): {
            "train_file": cfg.train_file,
            "train_records": result["train_records"],
            "train_accuracy": result["train_accuracy"],
            "features": result["features"],
            "c": result["c"],
        },
    }


def evaluate_classifier_stage(
    params: dict[str, Any],
    task: str,
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Classify ``params[name].test_file`` with the ``task`` model (``ve`` or ``nlvr``) in ``model_dir``:
    ``metrics.json`` (accuracy, per-class accuracy, confusion matrix, majority-class baseline, the
    sentence-only baseline trained on ``train_file`` (:data:`TEXT_ONLY_KEYS`), skipped records) and ``predictions.json`` (per record: its index in the file, sentence, image(s), label,
    prediction and class probabilities) in ``out_dir``."""
    from albef.data import datasets as ds
    from albef.data.classify import LABEL_NAMES, ClassificationCollate, ClassificationDataset
    from albef.data.transforms import eval_transform
    from albef.eval.classify import accuracy_metrics, classify

    cfg = classifier_eval_settings(params, task, name)
    name = name or EVAL_SECTIONS[task]
    with stage_process(cfg.device, cfg.precision, name) as (world, device, amp_dtype):
        model, tokenizer = load_task_model(model_dir, task, cfg.tokenizer, cfg.data_dir)
        test_path = Path(cfg.data_dir) / cfg.test_file
        dataset = ClassificationDataset(
            test_path,
            task,
            ds.image_source(cfg.data_dir),
            eval_transform(model.cfg.vision.image_size),
            max_words=cfg.max_words,
            missing_images=cfg.missing_images,
        )
        result = classify(
            model,
            dataset,
            ClassificationCollate(tokenizer, cfg.max_tokens),
            batch_size=cfg.batch_size,
            device=device,
            num_workers=cfg.num_workers,
            amp_dtype=amp_dtype,
            progress=progress and world.is_main,
        )
        names = LABEL_NAMES[task]
        predictions = result.predictions
        metrics: dict[str, Any] = accuracy_metrics(dataset.labels, predictions, names)
        metrics.update(_sentence_only(cfg, task, name, dataset))
        metrics["skipped_missing_images"] = len(dataset.skipped)
        metrics["test_file"] = cfg.test_file
        metrics["model_task"] = task
        metrics["eval_seconds"] = round(result.seconds, 2)
        if world.is_main:
            probs = torch.softmax(result.logits, dim=1).tolist()
            image_key = "image" if task == "ve" else "images"
            rows = [
                {
                    "index": dataset.indices[i],
                    image_key: record[image_key],
                    "sentence": record["sentence"],
                    "label": record["label"],
                    "prediction": names[predictions[i]],
                    "correct": names[predictions[i]] == record["label"],
                    "probabilities": {n: round(p, 5) for n, p in zip(names, probs[i], strict=True)},
                }
                for i, record in enumerate(dataset.records)
            ]
            out = write_metrics(out_dir, metrics, metrics_path)
            (out / "predictions.json").write_text(json.dumps(rows, indent=0) + "\n")
            if dataset.skipped:
                write_json(out / "skipped.json", {"records": dataset.skipped})
            log.info(
                "%s %s: accuracy %.2f%% on %d records (%s)",
                name,
                model_dir,
                metrics["accuracy"],
                metrics["records"],
                ", ".join(f"{k} {v['accuracy']}" for k, v in metrics["per_class"].items()),
            )
        return metrics


__all__ = [
    "EVAL_SECTIONS",
    "TEXT_ONLY_KEYS",
    "TRAIN_SECTIONS",
    "ClassifierEvalConfig",
    "classifier_forward",
    "evaluate_classifier_stage",
    "finetune_classifier_stage",
    "text_assignment_forward",
]
