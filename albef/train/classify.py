"""The SNLI-VE and NLVR2 training stages, evaluated by :func:`albef.eval.stages.evaluate_classifier_stage`.

``finetune_classifier_stage(params, "ve")``       SNLI-VE finetuning (``params.finetune_ve``), official ``VE.py``
``finetune_classifier_stage(params, "nlvr")``     NLVR2 finetuning (``params.finetune_nlvr``), official ``NLVR.py``
``finetune_classifier_stage(params, "nlvr_ta")``  NLVR2 text-assignment pretraining on pretraining image-caption
                                                  pairs (``params.pretrain_nlvr``), official ``Pretrain_nlvr.py``

The sections have the keys of every training section (:mod:`albef.train.stages`) plus ``max_words`` (sentence
words kept, official 30) and, for VE and NLVR2, ``missing_images`` (``error`` | ``skip``, see
:mod:`albef.data.classify`). Defaults not given in the section are the official configs' (``configs/VE.yaml``,
``NLVR.yaml``, ``NLVR_pretrain.yaml``): lr 2e-5, VE 5 epochs of 32 without the alpha warm-up, NLVR2 10 epochs
of 16 with it, TA one epoch. As the official scripts, VE and NLVR2 validate on the dev split after every epoch
and export the weights with the best dev accuracy (``val_file: null`` turns this off and exports the last
weights).

``init``: VE takes any albef model folder or official checkpoint (a pretraining export gets a fresh
``cls_head``); NLVR2 takes the TA export (or a pretraining one: the fusion layers are duplicated either way)
and, as the official ``NLVR.py``, keeps its freshly initialised momentum teacher unless
``model.quirks.nlvr_teacher_copy_before_load`` is false.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from albef.config import ConfigError, section
from albef.device import resolve_precision
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
# Defaults of each training section (official configs), next to the shared ones of classifier_train_settings;
# anything in params.yaml wins.
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    task: {
        "train_file": f"{task}_train.json",
        "val_file": f"{task}_dev.json",
        "epochs": epochs,
        "batch_size": batch_size,
        "alpha_ramp_epochs": ramp,  # VE.yaml warm_up: False, NLVR.yaml warm_up: True
        "crop_scale": (0.5, 1.0),
        "max_tokens": 40,
    }
    for task, epochs, batch_size, ramp in (("ve", 5, 32, 0.0), ("nlvr", 10, 16, 1.0))
}
# text assignment: one epoch of the pretraining captions, with the pretraining transform
_TRAIN_DEFAULTS["nlvr_ta"] = {
    "train_file": "pretrain.json",
    "epochs": 1,
    "batch_size": 32,
    "crop_scale": (0.2, 1.0),
    "max_tokens": 30,
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
        per_class = metrics["per_class"].items()
        return {
            "accuracy": metrics["accuracy"],
            **{f"acc_{k}": v["accuracy"] for k, v in per_class if v["accuracy"] is not None},
        }

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
    shared = {"out": f"models/{task}", "run_dir": f"runs/{task}", "lr": 2e-5}
    for key, value in {**shared, **_TRAIN_DEFAULTS[task]}.items():
        values.setdefault(key, value)
    if task != "nlvr_ta" and values.get("val_file"):
        values.setdefault("select_metric", "accuracy")
    stage, train = split_train_section(values, name, TASKS[task].loss_keys)
    if task == "nlvr_ta" and stage.val_file:
        raise ConfigError(f"{name}.val_file: text-assignment pretraining has no validation (as the official)")
    if task == "nlvr_ta" and train.batch_size < 3:
        raise ConfigError(f"{name}.batch_size: text assignment needs at least 3 images per batch")
    return stage, train, max_words, missing_images


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
        from albef.data.transforms import eval_transform

        images = ds.image_source(stage.data_dir)
        size = model.cfg.vision.image_size
        data = Path(stage.data_dir)
        settings = {"max_words": max_words, "missing_images": missing_images}
        if task == "nlvr_ta":
            # kept for the official checkpoint keys, unused by the TA forward: frozen, so DDP does not wait for
            # their gradients (AdamW leaves a parameter without gradient unchanged either way)
            model.text_proj.requires_grad_(False)
            model.temp.requires_grad_(False)
            return TrainingData(
                ds.PretrainDataset(
                    data / stage.train_file, images, stage.transform("pretrain", size), max_words=max_words
                ),
                Collate(tokenizer, stage.max_tokens, with_idx=False),
                text_assignment_forward,
                unit="records",
                settings=settings,
            )

        def records(file: str, transform) -> ClassificationDataset:
            return ClassificationDataset(
                data / file, task, images, transform, max_words=max_words, missing_images=missing_images
            )

        dataset = records(stage.train_file, stage.transform("train", size))
        info = {"train_records": len(dataset), "skipped_missing_images": len(dataset.skipped)}
        collate = ClassificationCollate(tokenizer, stage.max_tokens)
        validate = None
        if stage.val_file:
            val_set = records(stage.val_file, eval_transform(size))
            info["val_records"] = len(val_set)
            info["val_skipped_missing_images"] = len(val_set.skipped)
            validate = _accuracy_validator(val_set, collate, stage.eval_batch_size, device, train.precision)
        return TrainingData(
            dataset, collate, classifier_forward, validate, unit="records", settings=settings, info=info
        )

    return run_training(params, name, task, stage, train, build_data, progress, on_log)


__all__ = [
    "TRAIN_SECTIONS",
    "classifier_forward",
    "finetune_classifier_stage",
    "text_assignment_forward",
]
