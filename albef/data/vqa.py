"""VQA data: the official annotation files (``vqa_train.json``, ``vqa_test.json``, ``answer_list.json``) as
datasets, the official answer weights, and batching with answers flattened across questions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from albef.data.datasets import AnnotationDataset, ImageSource, Transform
from albef.data.formats import AnnotationError
from albef.data.text import pre_question


def answer_weights(record: dict[str, Any]) -> tuple[list[str], list[float]]:
    """Distinct answers of a record and their official weights: a VQA question's answer gets
    (votes / number of answers); a Visual Genome answer (``dataset: vg``, one answer) gets 0.5."""
    answer = record.get("answer")
    if answer is None:
        raise AnnotationError(f"question {record.get('question_id')}: a training record needs 'answer'")
    if record.get("dataset", "vqa") == "vg":
        return [answer if isinstance(answer, str) else answer[0]], [0.5]
    answers = [answer] if isinstance(answer, str) else list(answer)
    counts = Counter(answers)  # dict order = first appearance, as the official loop
    return list(counts), [n / len(answers) for n in counts.values()]


def read_answer_list(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"answer list not found: {path}")
    answers = json.loads(path.read_text())
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers) or not answers:
        raise AnnotationError(f"{path}: expected a non-empty JSON list of answer strings")
    return answers


class VQATrainDataset(AnnotationDataset):
    """(image, question, answers, weights) per question (``pre_question`` cleaning, ``max_words`` words)."""

    schema = "vqa"

    def __init__(self, ann_file: str | Path, images: ImageSource, transform: Transform, max_words: int = 30):
        super().__init__(ann_file, images, transform, max_words)
        self.answers = [answer_weights(r) for r in self.records]

    def __getitem__(self, index: int):
        record = self.records[index]
        answers, weights = self.answers[index]
        image = self.transform(self.images.open(record["image"]))
        return image, pre_question(record["question"], self.max_words), answers, weights

    def unknown_answers(self, answer_list: list[str]) -> dict[str, int]:
        """How many training answers (distinct per question) the answer list cannot produce."""
        known = set(answer_list)
        total = sum(len(a) for a, _ in self.answers)
        unknown = Counter(a for answers, _ in self.answers for a in answers if a not in known)
        questions = sum(1 for answers, _ in self.answers if not any(a in known for a in answers))
        return {
            "answers": total,
            "unknown_answers": sum(unknown.values()),
            "distinct_unknown_answers": len(unknown),
            "questions_without_known_answer": questions,
        }


class VQATestDataset(AnnotationDataset):
    """(image, question, question_id) per question (``max_words`` 50 at test time, as the official)."""

    schema = "vqa"

    def __init__(self, ann_file: str | Path, images: ImageSource, transform: Transform, max_words: int = 50):
        super().__init__(ann_file, images, transform, max_words)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = self.transform(self.images.open(record["image"]))
        return image, pre_question(record["question"], self.max_words), int(record["question_id"])


def tokenize_answers(tokenizer, answers: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] wordpieces [SEP]`` per answer (the official ``answer + '[SEP]'``), padded to the longest."""
    encoded = tokenizer.tokenizer(
        list(answers), add_special_tokens=True, truncation=True, max_length=max_length, padding=False
    )["input_ids"]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class VQACollate:
    """Stack images, tokenize questions (``max_tokens``) and the flattened answers; ``k`` answers per
    question and their ``weights`` (the official ``vqa_collate_fn``)."""

    def __init__(self, tokenizer, max_tokens: int = 25, max_answer_tokens: int = 32):
        self.tokenizer, self.max_tokens, self.max_answer_tokens = tokenizer, max_tokens, max_answer_tokens

    def __call__(self, samples: list[tuple]) -> dict[str, torch.Tensor]:
        images = torch.stack([s[0] for s in samples])
        q = self.tokenizer([s[1] for s in samples], max_length=self.max_tokens)
        answers = [a for s in samples for a in s[2]]
        a_ids, a_mask = tokenize_answers(self.tokenizer, answers, self.max_answer_tokens)
        return {
            "images": images,
            "question_ids": q.input_ids,
            "question_mask": q.attention_mask,
            "answer_ids": a_ids,
            "answer_mask": a_mask,
            "k": torch.tensor([len(s[2]) for s in samples], dtype=torch.long),
            "weights": torch.tensor([w for s in samples for w in s[3]], dtype=torch.float32),
        }
