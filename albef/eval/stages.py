"""The evaluation stages (retrieval, VQA, SNLI-VE / NLVR2, grounding) as plain functions of a ``params.yaml``
(the CLI, ``dvc.yaml`` and Prefect call them through the task registry, :mod:`albef.tasks`), all run by one
body, :func:`run_evaluation`, the same in one process and under ``torchrun`` or SLURM: every rank computes,
rank 0 writes ``metrics.json`` (and the DVC metrics file) and the task's report files, and logs one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from albef.checkpoint import CheckpointError, load_task_model
from albef.distributed import stage_process
from albef.eval.settings import (
    CLASSIFIER_EVAL_SECTIONS,
    ClassifierEvalConfig,
    VQAEvalConfig,
    classifier_eval_settings,
    grounding_eval_settings,
    retrieval_eval_settings,
    vqa_eval_settings,
)
from albef.io import can_draw, write_json, write_metrics
from albef.model_files import CONFIG_FILE, read_config

log = logging.getLogger(__name__)

#: the models a retrieval or grounding evaluation takes: those with an ITM head (zero-shot: the pretrained one)
ITM_MODELS = ("pretrain", "retrieval")


@dataclass
class EvalInputs:
    """What the stage body gives a task's evaluation: the model on its device, its tokenizer and the data's images."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    amp_dtype: torch.dtype | None
    images: Any  # the data folder's image source (albef.data.datasets.image_source)
    transform: Callable  # the model's evaluation transform
    progress: bool  # a progress bar (rank 0 only)


@dataclass
class Evaluation:
    """What a task's evaluation gives back: its metrics, the report files it writes besides ``metrics.json``
    (rank 0 only) and the figures of its log line."""

    metrics: dict[str, Any]
    write: Callable[[Path], None] = field(default=lambda out: None)
    summary: str = ""


def run_evaluation(
    cfg: Any,
    name: str,
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None,
    progress: bool,
    models: tuple[str, ...],
    evaluate: Callable[[EvalInputs], Evaluation],
) -> dict[str, Any]:
    """The one evaluation stage body: the process (``cfg.device``, ``cfg.precision``), the model in
    ``model_dir`` (one of ``models``, checked before any weight is read) with its tokenizer, ``evaluate``, and
    on rank 0 the metrics (with ``model_task``), the report files and the log line."""
    from albef.data.datasets import image_source
    from albef.data.transforms import eval_transform

    # (grounding has no precision: Grad-CAM differentiates in full precision)
    with stage_process(cfg.device, getattr(cfg, "precision", None), name) as (world, device, amp_dtype):
        model_task, _ = read_config(model_dir)
        if model_task not in models:
            wanted = " or ".join(repr(m) for m in models)
            raise CheckpointError(
                f"{model_dir} does not hold a {wanted} model: its {CONFIG_FILE} says task {model_task!r}"
            )
        model, tokenizer = load_task_model(model_dir, model_task, cfg.tokenizer, cfg.data_dir)
        model = model.to(device)
        inputs = EvalInputs(
            model,
            tokenizer,
            device,
            amp_dtype,
            image_source(cfg.data_dir),
            eval_transform(model.cfg.vision.image_size),
            progress and world.is_main,
        )
        result = evaluate(inputs)
        result.metrics["model_task"] = model_task
        if world.is_main:
            result.write(write_metrics(out_dir, result.metrics, metrics_path))
            log.info("%s %s: %s", name, model_dir, result.summary)
        return result.metrics


# ------------------------------------------------------------------------------------------ retrieval


def evaluate_retrieval_stage(
    params: dict[str, Any],
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    name: str = "evaluate",
    task: str = "retrieval",
) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` on ``params[name].test_file`` (``name``: the section, ``evaluate``):
    metrics (ITM re-ranked, with ITC-only for comparison), per-query rankings and a PNG of example queries in
    ``out_dir``."""
    from albef.data.datasets import RetrievalEvalDataset
    from albef.eval.retrieval import evaluate_retrieval, plot_examples, rankings

    cfg = retrieval_eval_settings(params, task, name)

    def evaluate(inputs: EvalInputs) -> Evaluation:
        dataset = RetrievalEvalDataset(Path(cfg.data_dir) / cfg.test_file, inputs.images, inputs.transform)
        result = evaluate_retrieval(
            inputs.model,
            dataset,
            inputs.tokenizer,
            k_test=cfg.k_test,
            max_tokens=cfg.max_tokens,
            device=inputs.device,
            image_batch=cfg.image_batch,
            pair_batch=cfg.pair_batch,
            num_workers=cfg.num_workers,
            amp_dtype=inputs.amp_dtype,
            progress=inputs.progress,
        )
        metrics: dict[str, Any] = {k: round(v, 3) for k, v in result.metrics.items()}
        metrics["itc"] = {k: round(v, 3) for k, v in result.itc_metrics.items()}
        metrics["chance_r1"] = {
            "txt": round(100 * 5 / max(len(dataset.texts), 1), 3),
            "img": round(100 / max(len(dataset), 1), 3),
        }
        metrics["images"], metrics["texts"] = len(dataset), len(dataset.texts)
        metrics["pairs_scored"] = result.pairs_scored
        metrics["eval_seconds"] = round(result.seconds["total"], 2)

        def write(out: Path) -> None:
            ranked = rankings(result, dataset, top=cfg.top)
            write_json(out / "rankings.json", ranked)
            if cfg.examples and can_draw(out / "examples.png"):
                plot_examples(ranked, dataset, out / "examples.png", queries=cfg.examples)

        itc = metrics["itc"]
        summary = (
            f"TR@1 {metrics['txt_r1']:.2f} IR@1 {metrics['img_r1']:.2f} r_mean {metrics['r_mean']:.2f} "
            f"(ITC only: TR@1 {itc['txt_r1']:.2f} IR@1 {itc['img_r1']:.2f}) in {metrics['eval_seconds']:.1f} s"
        )
        return Evaluation(metrics, write, summary)

    return run_evaluation(cfg, name, model_dir, out_dir, metrics_path, progress, ITM_MODELS, evaluate)


# ------------------------------------------------------------------------------------------ VQA


def _baseline_training(cfg: VQAEvalConfig | ClassifierEvalConfig, name: str, what: str, task: str):
    """The records of ``cfg.train_file`` a text-only baseline trains on; None: no baseline (no training
    file, or it is missing: warned)."""
    from albef.data.formats import load_annotations

    if not cfg.train_file:
        return None
    train_path = Path(cfg.data_dir) / cfg.train_file
    if not train_path.is_file():
        log.warning("%s: no %s baseline: %s not found", name, what, train_path)
        return None
    return load_annotations(train_path, task)


def question_only_baseline(
    cfg: VQAEvalConfig, name: str, test_records, answer_list: list[str], humans: dict[str, list[str]]
) -> dict[str, Any]:
    """``question_only_accuracy``: the VQA accuracy of a classifier that reads the question alone, trained on
    ``cfg.train_file`` (:mod:`albef.eval.text_baseline`); nothing when there is no training file."""
    from albef.data.text import pre_question
    from albef.data.vqa import answer_weights
    from albef.eval.text_baseline import question_only_vqa

    if (train := _baseline_training(cfg, name, "question-only", "vqa")) is None:
        return {}
    train = [r for r in train if r.get("answer") is not None]
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
    from albef.data.vqa import VQATestDataset, read_answer_list
    from albef.eval.vqa import answer_questions, score_predictions

    cfg = vqa_eval_settings(params, task, name)

    def evaluate(inputs: EvalInputs) -> Evaluation:
        answer_list = read_answer_list(Path(cfg.data_dir) / cfg.answer_list)
        dataset = VQATestDataset(
            Path(cfg.data_dir) / cfg.test_file, inputs.images, inputs.transform, max_words=cfg.max_words
        )
        result = answer_questions(
            inputs.model,
            dataset,
            inputs.tokenizer,
            answer_list,
            k_test=cfg.k_test,
            batch_size=cfg.batch_size,
            device=inputs.device,
            num_workers=cfg.num_workers,
            amp_dtype=inputs.amp_dtype,
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
            metrics.update(question_only_baseline(cfg, name, dataset.records, answer_list, humans))
        metrics["eval_seconds"] = round(result.seconds, 2)

        def write(out: Path) -> None:
            (out / "vqa_result.json").write_text(json.dumps(result.predictions) + "\n")
            write_json(out / "top_answers.json", {str(q): v for q, v in result.top.items()})

        return Evaluation(metrics, write, json.dumps(metrics, sort_keys=True))

    return run_evaluation(cfg, name, model_dir, out_dir, metrics_path, progress, ("vqa",), evaluate)


# ------------------------------------------------------------------------------------------ SNLI-VE, NLVR2

#: the metrics key of each task's text-only baseline
TEXT_ONLY_KEYS = {"ve": "hypothesis_only_accuracy", "nlvr": "sentence_only_accuracy"}


def sentence_only_baseline(cfg: ClassifierEvalConfig, task: str, name: str, test_set) -> dict[str, Any]:
    """The accuracy of a classifier that reads the sentence alone (the SNLI-VE hypothesis, the NLVR2
    statement), trained on ``cfg.train_file`` and scored on the records the model is scored on
    (:mod:`albef.eval.text_baseline`), under :data:`TEXT_ONLY_KEYS`; nothing when there is no training file."""
    from albef.data.classify import LABEL_NAMES
    from albef.data.text import pre_caption
    from albef.eval.text_baseline import text_only_classification

    if (train := _baseline_training(cfg, name, "sentence-only", task)) is None:
        return {}
    names = LABEL_NAMES[task]
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
    sentence-only baseline trained on ``train_file`` (:data:`TEXT_ONLY_KEYS`), skipped records) and
    ``predictions.json`` (per record: its index in the file, sentence, image(s), label, prediction and class
    probabilities) in ``out_dir``."""
    from albef.data.classify import LABEL_NAMES, ClassificationCollate, ClassificationDataset
    from albef.eval.classify import accuracy_metrics, classify

    cfg = classifier_eval_settings(params, task, name)
    name = name or CLASSIFIER_EVAL_SECTIONS[task]
    names = LABEL_NAMES[task]

    def evaluate(inputs: EvalInputs) -> Evaluation:
        dataset = ClassificationDataset(
            Path(cfg.data_dir) / cfg.test_file,
            task,
            inputs.images,
            inputs.transform,
            max_words=cfg.max_words,
            missing_images=cfg.missing_images,
        )
        result = classify(
            inputs.model,
            dataset,
            ClassificationCollate(inputs.tokenizer, cfg.max_tokens),
            batch_size=cfg.batch_size,
            device=inputs.device,
            num_workers=cfg.num_workers,
            amp_dtype=inputs.amp_dtype,
            progress=inputs.progress,
        )
        predictions = result.predictions
        metrics: dict[str, Any] = accuracy_metrics(dataset.labels, predictions, names)
        metrics.update(sentence_only_baseline(cfg, task, name, dataset))
        metrics["skipped_missing_images"] = len(dataset.skipped)
        metrics["test_file"] = cfg.test_file
        metrics["eval_seconds"] = round(result.seconds, 2)

        def write(out: Path) -> None:
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
            (out / "predictions.json").write_text(json.dumps(rows, indent=0) + "\n")
            if dataset.skipped:
                write_json(out / "skipped.json", {"records": dataset.skipped})

        per_class = ", ".join(f"{k} {v['accuracy']}" for k, v in metrics["per_class"].items())
        summary = f"accuracy {metrics['accuracy']:.2f}% on {metrics['records']} records ({per_class})"
        return Evaluation(metrics, write, summary)

    return run_evaluation(cfg, name, model_dir, out_dir, metrics_path, progress, (task,), evaluate)


# ------------------------------------------------------------------------------------------ grounding


def evaluate_grounding_stage(
    params: dict[str, Any],
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    name: str = "evaluate_grounding",
    task: str = "grounding",
) -> dict[str, Any]:
    """Evaluate weakly supervised grounding of the model in ``model_dir`` (any model with an ITM head:
    pretrain, retrieval) on ``params[name].test_files`` (``name``: the section, ``evaluate_grounding``):
    ``metrics.json``, ``results.json`` (one entry per expression) and ``examples/*.png`` (heat maps per word,
    stacked in ``examples.png``) in ``out_dir``. Under torchrun the ranks share the expressions."""
    from albef.eval.grounding import (
        GroundingEvalDataset,
        evaluate_grounding,
        explain_image,
        load_assets,
        pick_examples,
        stack_pngs,
    )

    cfg = grounding_eval_settings(params, task, name)

    def evaluate(inputs: EvalInputs) -> Evaluation:
        data = Path(cfg.data_dir)
        assets = load_assets(data / cfg.assets)
        dataset = GroundingEvalDataset(
            [data / f for f in cfg.test_files], inputs.images, inputs.transform, cfg.max_words
        )
        metrics, results = evaluate_grounding(
            inputs.model, dataset, inputs.tokenizer, assets, cfg, inputs.device, inputs.progress
        )

        def write(out: Path) -> None:
            write_json(out / "results.json", {"results": results})
            drawn: list[Path] = []
            examples = pick_examples(results, cfg.examples) if can_draw(out / "examples") else []
            for n, r in enumerate(examples):
                record = dataset.records[r["index"]]
                verdict = "correct" if r["correct"] else "wrong"
                path = out / "examples" / f"{n:02d}_ref{r['ref_id']}.png"
                explain_image(
                    inputs.model,
                    inputs.tokenizer,
                    inputs.images.open(record["image"]),
                    record["text"],
                    path,
                    metrics["layer"],
                    title=f"ref {r['ref_id']} ({r['split']}): {r['text']!r}  IoU {r['iou']:.2f} {verdict}",
                    boxes={"truth": r["gt_box"], "pred": r["pred_box"]},
                    max_words=cfg.max_words,
                    size=(assets.boxes[r["ref_id"]][1], assets.boxes[r["ref_id"]][2]),
                )
                drawn.append(path)
            if drawn:  # one sheet at a fixed path: a DVC plot, a Prefect artifact, an MLflow image
                stack_pngs(drawn, out / "examples.png")

        accuracies = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith("_d"))
        summary = (
            f"{accuracies} over {metrics['expressions']} expressions "
            f"({sum(metrics['skipped'].values())} skipped) in {metrics['eval_seconds']:.1f} s"
        )
        return Evaluation(metrics, write, summary)

    return run_evaluation(cfg, name, model_dir, out_dir, metrics_path, progress, ITM_MODELS, evaluate)
