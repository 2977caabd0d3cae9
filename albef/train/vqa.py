"""The VQA stages as plain functions of a ``params.yaml`` (the CLI, ``dvc.yaml`` and Prefect call these).

``finetune_vqa_stage``   weighted answer generation with momentum distillation (``params.finetune_vqa``)
``evaluate_vqa_stage``   answer the test questions from the answer list, VQA accuracy (``params.evaluate_vqa``)

Single predictions (``albef predict vqa``) are :func:`albef.serving.predict.predict_vqa`.

``params.finetune_vqa`` is flat like the other training sections (:class:`~albef.train.engine.TrainConfig` and
:class:`~albef.train.stages.TrainStageConfig` keys) plus ``answer_list`` (file in ``data_dir``) and
``max_answer_tokens``. As the official, there is no validation during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from albef.checkpoint import load_task_model
from albef.config import ConfigError, build_dataclass, section
from albef.device import check_device, check_precision
from albef.distributed import stage_process
from albef.eval.settings import ANSWER_LIST_FILE, VQAEvalConfig
from albef.io import write_json, write_metrics
from albef.tasks import TASKS, check_task
from albef.train.stages import (
    TrainingData,
    run_training,
    split_train_section,
)

log = logging.getLogger(__name__)


def vqa_forward(model, batch, alpha, choices):
    """The Trainer's forward for VQA (no random choices are drawn)."""
    return model(
        batch["images"],
        batch["question_ids"],
        batch["question_mask"],
        batch["answer_ids"],
        batch["answer_mask"],
        batch["k"],
        batch["weights"],
        alpha=alpha,
    )


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


def vqa_eval_settings(params: dict[str, Any], name: str = "evaluate_vqa", task: str = "vqa") -> VQAEvalConfig:
    check_task(task, ("vqa",))
    cfg = build_dataclass(VQAEvalConfig, section(params, name), name)
    check_device(cfg.device, f"{name}.device")
    check_precision(cfg.precision, f"{name}.precision")
    return cfg


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
        from albef.data.transforms import build_transform
        from albef.data.vqa import VQACollate, VQATrainDataset, read_answer_list

        transform = build_transform(
            "train",
            model.cfg.vision.image_size,
            scale=stage.crop_scale,
            hflip=stage.hflip,
            augment=stage.augment,
        )
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


def _question_only(
    cfg: VQAEvalConfig, name: str, test_records, answer_list: list[str], humans: dict[str, list[str]]
) -> dict[str, Any]:
    """``question_only_accuracy``: the VQA accuracy of a classifier that reads the question alone, trained on
    ``cfg.train_file`` (:mod:`albef.eval.text_baseline`); nothing when there is no training file."""
    from albef.data.formats import load_annotations
    from albef.data.text import pre_question
    from albef.data.vqa import answer_weights
    from albef.eval.text_baseline import question_only_vqa

    if not cfg.train_file:
        return {}
    train_path = Path(cfg.data_dir) / cfg.train_file
    if not train_path.is_file():
        log.warning("%s: no question-only baseline: %s not found", name, train_path)
        return {}
    train = [r for r in load_annotations(train_path, "vqa") if r.get("answer") is not None]
    result = question_only_vqa(
        [pre_question(r["question"], cfg.max_words) for r in train],
        [answer_weights(r) for r in train],
        [pre_question(r["question"], cfg.max_words) for r in test_records],
        [int(r["question_id"]) for r in test_records],
        answer_list,
        humans,
    )
    return {
        "question_only_accuracy": result["accuracy"],
        "question_only": {
            "train_file": cfg.train_file,
            "train_questions": result["train_records"],
            "features": result["features"],
            "c": result["c"],
        },
    }


def evaluate_vqa_stage(
    params: dict[str, Any],
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    name: str = "evaluate_vqa",
    task: str = "vqa",
) -> dict[str, Any]:
    """Answer ``params[name].test_file`` with the model in ``model_dir``: ``vqa_result.json`` (the official
    ``[{"question_id", "answer"}]``), ``top_answers.json`` and ``metrics.json`` (VQA accuracy when human
    answers are given, beside ``question_only_accuracy``: the question-only baseline trained on
    ``train_file``) in ``out_dir``."""
    from albef.data import datasets as ds
    from albef.data.transforms import eval_transform
    from albef.data.vqa import VQATestDataset, read_answer_list
    from albef.eval.vqa import answer_questions, score_predictions

    cfg = vqa_eval_settings(params, name, task)
    with stage_process(cfg.device, cfg.precision, name) as (world, device, amp_dtype):
        model, tokenizer = load_task_model(model_dir, "vqa", cfg.tokenizer, cfg.data_dir)
        answer_list = read_answer_list(Path(cfg.data_dir) / cfg.answer_list)
        dataset = VQATestDataset(
            Path(cfg.data_dir) / cfg.test_file,
            ds.image_source(cfg.data_dir),
            eval_transform(model.cfg.vision.image_size),
            max_words=cfg.max_words,
        )
        result = answer_questions(
            model,
            dataset,
            tokenizer,
            answer_list,
            k_test=cfg.k_test,
            batch_size=cfg.batch_size,
            device=device,
            num_workers=cfg.num_workers,
            amp_dtype=amp_dtype,
        )
        metrics: dict[str, Any] = {"questions": len(dataset), "answer_list": len(answer_list)}
        if cfg.test_answers:
            humans = json.loads((Path(cfg.data_dir) / cfg.test_answers).read_text())
            metrics.update(score_predictions(result.predictions, humans))
            known = set(answer_list)
            oracle = [
                max((min(sum(h == a for h in hs) / 3, 1.0) for a in set(hs) if a in known), default=0.0)
                for hs in humans.values()
            ]
            metrics["answer_list_oracle_accuracy"] = round(100 * sum(oracle) / max(len(oracle), 1), 3)
            metrics.update(_question_only(cfg, name, dataset.records, answer_list, humans))
        metrics["eval_seconds"] = round(result.seconds, 2)
        if world.is_main:
            out = write_metrics(out_dir, metrics, metrics_path)
            (out / "vqa_result.json").write_text(json.dumps(result.predictions) + "\n")
            write_json(out / "top_answers.json", {str(q): v for q, v in result.top.items()})
            log.info("%s %s: %s", name, model_dir, json.dumps(metrics, sort_keys=True))
        return metrics
