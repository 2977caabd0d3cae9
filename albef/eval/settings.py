"""The evaluation stages' settings that serving and registration read too (params.yaml's ``evaluate_vqa``,
``evaluate_ve`` and ``evaluate_nlvr``; an exported VQA model's answer list): torch-free, so that registering a
model, checking params and building a pyfunc's settings load no model code."""

from __future__ import annotations

from dataclasses import dataclass

ANSWER_LIST_FILE = "answer_list.json"  # copied next to the exported VQA weights, for prediction


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
