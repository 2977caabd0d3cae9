"""The evaluation stages' settings (params.yaml's ``evaluate``, ``evaluate_vqa``, ``evaluate_ve``,
``evaluate_nlvr`` and ``evaluate_grounding``) and their readers, which the stages, the params checks, serving
and registration share; an exported VQA model's answer list. Torch-free (the device checks import
:mod:`albef.device` when a reader runs), so that registering a model, checking params and building a
pyfunc's settings load no model code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from albef.config import AT_LEAST_ONE, NON_NEGATIVE, ConfigError, build_dataclass, check_ranges, section
from albef.tasks import TASKS, check_task

ANSWER_LIST_FILE = "answer_list.json"  # copied next to the exported VQA weights, for prediction


@dataclass
class EvaluateConfig:
    """``params.evaluate``: the retrieval test protocol."""

    data_dir: str = "data/processed"
    test_file: str = "retrieval_test.json"
    tokenizer: str | None = None  # default: the tokenizer saved with the model, else <data_dir>/tokenizer
    # the official uses 256 on COCO/Flickr30K; candidates per query re-ranked by ITM
    k_test: int = field(default=16, metadata=AT_LEAST_ONE)
    max_tokens: int = field(default=30, metadata=AT_LEAST_ONE)
    image_batch: int = field(default=64, metadata=AT_LEAST_ONE)
    pair_batch: int = field(default=256, metadata=AT_LEAST_ONE)
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (albef.device)
    precision: str = "auto"
    examples: int = field(default=4, metadata=NON_NEGATIVE)  # example queries drawn in examples.png
    top: int = field(default=10, metadata=AT_LEAST_ONE)  # results kept per query in rankings.json


@dataclass
class VQAEvalConfig:
    """``params.evaluate_vqa``."""

    data_dir: str = "data/processed"
    test_file: str = "vqa_test.json"
    answer_list: str = ANSWER_LIST_FILE
    test_answers: str | None = "vqa_test_answers.json"  # {question_id: [human answers]}; null: no accuracy
    tokenizer: str | None = None  # default: the model's tokenizer, else <data_dir>/tokenizer
    k_test: int = 128  # candidates re-ranked per question (official 128)
    batch_size: int = 32
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (albef.device)
    precision: str = "auto"
    max_words: int = 50  # question words kept at test time (official 50)
    # the question-only baseline (albef.eval.text_baseline) trains on these questions; null: no baseline
    train_file: str | None = "vqa_train.json"


@dataclass
class ClassifierEvalConfig:
    """``params.evaluate_ve`` / ``params.evaluate_nlvr``."""

    data_dir: str = "data/processed"
    test_file: str | None = None  # default: ve_test.json / nlvr_test.json
    tokenizer: str | None = None  # default: the model's tokenizer, else <data_dir>/tokenizer
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (albef.device)
    precision: str = "auto"
    max_tokens: int = 40
    max_words: int = 30  # sentence words kept (official 30)
    missing_images: str = "error"  # error | skip (counted in the metrics)
    # the sentence-only baseline (albef.eval.text_baseline) trains on this file; default ve_train.json /
    # nlvr_train.json, null: no baseline
    train_file: str | None = None


@dataclass
class GroundingEvalConfig:
    """``params.evaluate_grounding``: weakly supervised grounding on RefCOCO+-style files."""

    data_dir: str = "data/processed"
    test_files: list[str] = field(default_factory=lambda: ["refcoco+_val.json", "refcoco+_test.json"])
    assets: str = "refcoco+"  # instances.json, refs(unc).p, dets.json; relative to data_dir
    tokenizer: str | None = None  # default: the model's tokenizer folder, else <data_dir>/tokenizer
    layer: int | None = None  # text-encoder layer (official --block_num 8); null: the third fusion layer
    area_power: float = 0.5  # box score = sum inside / area ** area_power (official 0.5)
    iou_threshold: float = 0.5
    max_words: int = 30  # pre_caption, as the official dataset
    max_tokens: int | None = None  # null: the model's positions (the official grounding eval never truncates)
    batch_size: int = field(default=32, metadata=AT_LEAST_ONE)
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N (albef.device)
    bad_box: str = "skip"  # an expression without a usable ground-truth box: skip (counted) | error
    examples: int = 4  # expressions drawn with a heat map per word (examples/*.png)
    # no precision setting: Grad-CAM differentiates in full precision

    def __post_init__(self) -> None:
        if self.bad_box not in ("skip", "error"):
            raise ConfigError(f"evaluate_grounding.bad_box: expected skip or error, got {self.bad_box!r}")
        if isinstance(self.test_files, str):
            self.test_files = [self.test_files]
        if not 0 < self.iou_threshold <= 1:
            raise ConfigError(f"evaluate_grounding.iou_threshold: expected (0, 1], got {self.iou_threshold}")
        check_ranges(self, "evaluate_grounding")


#: evaluated classification task -> its params.yaml section
CLASSIFIER_EVAL_SECTIONS = {
    name: task.eval_section
    for name, task in TASKS.items()
    if task.eval_settings == f"{__name__}:classifier_eval_settings"
}


def _read(config: type, params: dict[str, Any], name: str, values: dict[str, Any] | None = None):
    """``params[name]`` (or ``values``) as ``config``, its device and precision checked, naming the keys."""
    from albef.device import check_device, check_precision

    cfg = build_dataclass(config, section(params, name) if values is None else values, name)
    check_device(cfg.device, f"{name}.device")
    if hasattr(cfg, "precision"):
        check_precision(cfg.precision, f"{name}.precision")
    return cfg


def retrieval_eval_settings(
    params: dict[str, Any], task: str = "retrieval", name: str = "evaluate"
) -> EvaluateConfig:
    """``params[name]`` as the retrieval evaluation reads it."""
    check_task(task, ("retrieval",))
    return _read(EvaluateConfig, params, name)


def vqa_eval_settings(params: dict[str, Any], task: str = "vqa", name: str = "evaluate_vqa") -> VQAEvalConfig:
    """``params[name]`` as the VQA evaluation reads it."""
    check_task(task, ("vqa",))
    return _read(VQAEvalConfig, params, name)


def classifier_eval_settings(
    params: dict[str, Any], task: str, name: str | None = None
) -> ClassifierEvalConfig:
    """``params[name]`` (default :data:`CLASSIFIER_EVAL_SECTIONS`) as the SNLI-VE / NLVR2 evaluation reads it;
    the test and baseline files default to ``<task>_test.json`` and ``<task>_train.json``."""
    check_task(task, list(CLASSIFIER_EVAL_SECTIONS), "classification task")
    name = name or CLASSIFIER_EVAL_SECTIONS[task]
    values = section(params, name)
    values.setdefault("test_file", f"{task}_test.json")
    values.setdefault("train_file", f"{task}_train.json")
    return _read(ClassifierEvalConfig, params, name, values)


def grounding_eval_settings(
    params: dict[str, Any], task: str = "grounding", name: str = "evaluate_grounding"
) -> GroundingEvalConfig:
    """``params[name]`` as the grounding evaluation reads it."""
    check_task(task, ("grounding",))
    return _read(GroundingEvalConfig, params, name)
