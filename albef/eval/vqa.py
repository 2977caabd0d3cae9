"""VQA evaluation: answer every test question from the answer list (official two-stage ranking) and score
with the VQA accuracy ``min(#humans who gave the answer / 3, 1)``.

Answers are compared after the evaluation server's normalisation (:mod:`albef.eval.vqa_answers`:
punctuation, number words, articles, contractions), applied to the prediction and to every human answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from albef.data.vqa import tokenize_answers
from albef.device import autocast
from albef.distributed import evaluation_share, gather_objects
from albef.eval.vqa_answers import normalize_answer


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """``min(#humans who gave the predicted answer / 3, 1)``."""
    pred = normalize_answer(prediction)
    votes = sum(normalize_answer(a) == pred for a in human_answers)
    return min(votes / 3.0, 1.0)


@dataclass
class VQAResult:
    predictions: list[dict[str, Any]]  # [{"question_id": int, "answer": str}], the official result format
    top: dict[int, list[tuple[str, float]]] = field(default_factory=dict)  # per question: (answer, prob)
    seconds: float = 0.0


@torch.no_grad()
def answer_questions(
    model,
    dataset,
    tokenizer,
    answer_list: list[str],
    k_test: int = 128,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    keep_top: int = 5,
) -> VQAResult:
    """The official ``train=False`` pass over a :class:`~albef.data.vqa.VQATestDataset`.

    Under a process group each rank answers a contiguous share of the questions and every rank returns all
    the answers, in dataset order (the official script writes per-rank files that rank 0 merges); every rank
    must call it.
    """
    start = time.perf_counter()
    device = torch.device(device)
    model.eval().to(device)
    a_ids, a_mask = tokenize_answers(tokenizer, answer_list, model.cfg.text.max_positions)
    a_ids, a_mask = a_ids.to(device), a_mask.to(device)

    def collate(samples):
        images = torch.stack([s[0] for s in samples])
        # test questions are not truncated by the official code; the position table bounds them here
        q = tokenizer([s[1] for s in samples], max_length=model.cfg.text.max_positions)
        return images, q.input_ids, q.attention_mask, [s[2] for s in samples]

    mine = Subset(dataset, evaluation_share(len(dataset), "questions"))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    result = VQAResult(predictions=[])
    for images, q_ids, q_mask, qids in loader:
        with autocast(device, amp_dtype):
            ids, probs = model.predict(
                images.to(device), q_ids.to(device), q_mask.to(device), a_ids, a_mask, k=k_test
            )
        for qid, row_ids, row_probs in zip(qids, ids.tolist(), probs.float().tolist(), strict=True):
            result.predictions.append({"question_id": qid, "answer": answer_list[row_ids[0]]})
            result.top[qid] = [(answer_list[i], round(p, 5)) for i, p in zip(row_ids, row_probs)][:keep_top]
    shares = gather_objects((result.predictions, result.top))
    result.predictions = [p for predictions, _ in shares for p in predictions]
    result.top = {qid: top for _, tops in shares for qid, top in tops.items()}
    result.seconds = time.perf_counter() - start
    return result


def score_predictions(
    predictions: list[dict[str, Any]], human_answers: dict[str, list[str]]
) -> dict[str, Any]:
    """VQA accuracy (%) over the questions that have human answers; counts what could not be scored."""
    scores = [
        vqa_accuracy(p["answer"], answers)
        for p in predictions
        if (answers := human_answers.get(str(p["question_id"]))) is not None
    ]
    return {
        "accuracy": round(100.0 * sum(scores) / len(scores), 3) if scores else float("nan"),
        "scored_questions": len(scores),
        "unscored_questions": len(predictions) - len(scores),
    }
