"""The VQA training stage, ``finetune_vqa_stage``: weighted answer generation with momentum distillation.

``params.finetune_vqa`` has the keys of every training section (:mod:`albef.train.stages`) plus
``answer_list`` (file in ``data_dir``) and ``max_answer_tokens``. As the official, there is no validation
during training; the evaluation is :func:`albef.eval.stages.evaluate_vqa_stage`, single predictions
(``albef predict vqa``) are :func:`albef.serving.predict.predict` (task ``"vqa"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from albef.config import ConfigError, section
from albef.eval.settings import ANSWER_LIST_FILE
from albef.tasks import TASKS, check_task
from albef.train.stages import (
    TrainingData,
    run_training,
    split_train_section,
)

log = logging.getLogger(__name__)


def vqa_forward(model, batch, alpha, choices):
    """The Trainer's forward for VQA (no random choices are drawn)."""
    keys = ("images", "question_ids", "question_mask", "answer_ids", "answer_mask", "k", "weights")
    return model(*(batch[k] for k in keys), alpha=alpha)


def vqa_train_settings(params: dict[str, Any], name: str = "finetune_vqa", task: str = "vqa"):
    """``params[name]`` read as :func:`finetune_vqa_stage` reads it: (stage config, train config, answer list
    file name, answer token limit). Bad values fail with the key named (the flows check overrides with it)."""
    check_task(task, ("vqa",))
    values = section(params, name)
    answer_list_name = values.pop("answer_list", ANSWER_LIST_FILE)
    max_answer_tokens = int(values.pop("max_answer_tokens", 32))
    values.setdefault("train_file", "vqa_train.json")
    values.setdefault("out", "models/vqa")
    values.setdefault("run_dir", "runs/vqa")
    values.setdefault("max_tokens", 25)  # official question length for training
    values.setdefault("crop_scale", (0.5, 1.0))
    stage, train = split_train_section(values, name, TASKS["vqa"].loss_keys)
    if stage.val_file:
        raise ConfigError(f"{name}.val_file: VQA trains without validation (evaluate with evaluate_vqa)")
    return stage, train, answer_list_name, max_answer_tokens


def finetune_vqa_stage(
    params: dict[str, Any],
    progress: bool = True,
    on_log=None,
    name: str = "finetune_vqa",
    task: str = "vqa",
) -> dict[str, Any]:
    """Finetune a VQA model with the settings of ``params[name]``; returns the metrics written for DVC.

    ``init`` is an albef model folder of any task (a pretraining export gets its answer decoder from the
    fusion layers) or an official checkpoint. Training answers the answer list cannot produce are counted
    and reported (they are still trained on, as the official)."""
    stage, train, answer_list_name, max_answer_tokens = vqa_train_settings(params, name, task)

    def build_data(model, tokenizer, world, device) -> TrainingData:
        from albef.data import datasets as ds
        from albef.data.vqa import VQACollate, VQATrainDataset, read_answer_list

        transform = stage.transform("train", model.cfg.vision.image_size)
        dataset = VQATrainDataset(
            Path(stage.data_dir) / stage.train_file, ds.image_source(stage.data_dir), transform
        )
        answer_list_path = Path(stage.data_dir) / answer_list_name
        unknown = dataset.unknown_answers(read_answer_list(answer_list_path))
        if unknown["unknown_answers"]:
            log.warning(
                "%s: %d of %d training answers (%d distinct) are not in %s; %d questions have no answer in it",
                name,
                unknown["unknown_answers"],
                unknown["answers"],
                unknown["distinct_unknown_answers"],
                answer_list_path,
                unknown["questions_without_known_answer"],
            )
        return TrainingData(
            dataset,
            VQACollate(tokenizer, stage.max_tokens, max_answer_tokens),
            vqa_forward,
            unit="questions",
            settings={"answer_list": answer_list_name, "max_answer_tokens": max_answer_tokens},
            info={"train_answers": unknown},
            extra_files={ANSWER_LIST_FILE: answer_list_path},  # the answers the exported model ranks
        )

    return run_training(params, name, "vqa", stage, train, build_data, progress, on_log)
