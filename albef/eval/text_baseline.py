"""Text-only baselines: what the question (VQA) or the sentence (SNLI-VE hypothesis, NLVR2 statement) alone
gives away, measured on the same test split as the model, so that what the model learns from the image shows
beside it.

The classifier is a bag of word n-grams (unigrams and bigrams present in the text, the ``max_features`` most
frequent in the training texts) under an L2-regularised multinomial logistic regression (a linear layer and
a softmax, no hidden layer), trained on the training split's texts and labels only: no image, no pretrained
weight, no test record. The regularisation is chosen on a held-out fifth of the training texts, so a text
without signal gives the class prior rather than fitted noise. VQA trains on the official soft answer targets
(an answer's share of the human answers, only answers in the evaluation's answer list) and is scored with the
evaluation's own VQA accuracy. Training is full-batch L-BFGS from zeros on a convex objective: no seed, no
batch order, the same result every run (on one thread for problems of the embedded benchmark's size, which
take a few seconds on a CPU). Its cost grows with records x classes: a real-size VQA training split (hundreds
of thousands of questions, 3,128 answers) has not been timed and may take many minutes on a CPU; the
evaluations' ``train_file: null`` turns the baseline off.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: what the model is, in the metrics
DESCRIPTION = "unigram+bigram bag of words, L2-regularised multinomial logistic regression (L-BFGS)"


@dataclass(frozen=True)
class TextBaselineSettings:
    ngrams: int = 2  # word n-grams up to this length
    max_features: int = 20_000  # most frequent n-grams of the training texts (document frequency)
    # inverse L2 strength: sum of the cross-entropies + |W|^2 / (2 c), as sklearn's C; None: the value of
    # c_grid with the best accuracy on a held-out part of the training texts (every holdout-th one)
    c: float | None = None
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    holdout: int = 5
    max_iter: int = 100  # L-BFGS iterations (sklearn's default)
    chunk_size: int = 8192  # records per forward (memory: chunk x classes logits)


def ngrams(text: str, n: int = 2) -> list[str]:
    """The distinct word n-grams (1 to ``n`` words) of a cleaned text, in order of first appearance."""
    words = text.split()
    grams = [" ".join(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)]
    return list(dict.fromkeys(grams))


class TextClassifier:
    """A trained bag-of-n-grams linear classifier; :meth:`predict` gives class ids."""

    def __init__(self, vocab: dict[str, int], weight: torch.Tensor, bias: torch.Tensor, settings, c: float):
        self.vocab, self.weight, self.bias, self.settings, self.c = vocab, weight, bias, settings, c

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        ids, offsets = encode(texts, self.vocab, self.settings.ngrams)
        return F.embedding_bag(ids, self.weight, offsets, mode="sum") + self.bias

    def predict(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        with _threads(1 if len(texts) * self.bias.numel() <= ONE_THREAD_LOGITS else None):
            return self.logits(texts).argmax(dim=1).tolist()

    def description(self) -> dict[str, Any]:
        """What the metrics tell of the classifier: its n-grams, regularisation, model and settings."""
        return {
            "features": len(self.vocab),
            "c": self.c,
            "model": DESCRIPTION,
            "settings": asdict(self.settings),
        }


def build_vocab(texts: Sequence[str], n: int, max_features: int) -> dict[str, int]:
    """The ``max_features`` n-grams found in most texts (ties by the n-gram), numbered from 0."""
    counts = Counter(g for text in texts for g in ngrams(text, n))
    kept = sorted(counts, key=lambda g: (-counts[g], g))[:max_features]
    return {g: i for i, g in enumerate(kept)}


def encode(texts: Sequence[str], vocab: dict[str, int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``embedding_bag`` inputs: the known n-gram ids of every text, flat, and each text's offset."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        ids.extend(vocab[g] for g in ngrams(text, n) if g in vocab)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


@contextmanager
def _threads(n: int | None):
    """Intra-op threads ``n`` inside (None: unchanged)."""
    threads = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: problems up to this many logits (records x classes) run on one thread: faster than waking a pool for tiny
#: ops, and the same result however many threads the process has (each torchrun worker has one)
ONE_THREAD_LOGITS = 4_000_000


def fit_text_classifier(
    texts: Sequence[str],
    labels: Sequence[int | dict[int, float]],
    num_classes: int,
    settings: TextBaselineSettings | None = None,
) -> TextClassifier:
    """Train on ``texts`` (already cleaned as the model's input is) and ``labels``: a class id per text, or
    soft targets ``{class id: weight}`` (cross-entropy weighted by them, as the VQA answer loss)."""
    settings = settings or TextBaselineSettings()
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ValueError("no training texts")
    targets = [{int(y): 1.0} if not isinstance(y, dict) else y for y in labels]
    with _threads(1 if len(texts) * num_classes <= ONE_THREAD_LOGITS else None):
        c = settings.c if settings.c is not None else _select_c(texts, targets, num_classes, settings)
        return _fit(texts, targets, num_classes, settings, c)


def _select_c(texts, targets, num_classes: int, settings: TextBaselineSettings) -> float:
    """The regularisation of ``settings.c_grid`` whose classifier, trained on the other texts, predicts the
    held-out ones best (target weight of the predicted class; ties: the stronger regularisation)."""
    held = [i for i in range(len(texts)) if i % settings.holdout == settings.holdout - 1]
    rest = [i for i in range(len(texts)) if i % settings.holdout != settings.holdout - 1]
    if len(held) < 2 or len(rest) < 2:
        return 1.0
    best, best_score = 1.0, -1.0
    for c in sorted(settings.c_grid):
        clf = _fit([texts[i] for i in rest], [targets[i] for i in rest], num_classes, settings, c)
        predicted = clf.predict([texts[i] for i in held])
        score = sum(targets[i].get(p, 0.0) for i, p in zip(held, predicted, strict=True))
        if score > best_score + 1e-9:
            best, best_score = c, score
    return best


def _fit(texts, targets, num_classes: int, settings: TextBaselineSettings, c: float) -> TextClassifier:
    """Minimise the mean (soft-target) cross-entropy + |W|^2 / (2 c n) over the weights W (n-grams x classes)
    and the biases (not penalised), from zeros, with full-batch L-BFGS (the module docstring says why)."""
    vocab = build_vocab(texts, settings.ngrams, settings.max_features)
    n = len(texts)
    chunks = []
    for start in range(0, n, settings.chunk_size):
        part = range(start, min(start + settings.chunk_size, n))
        ids, offsets = encode([texts[i] for i in part], vocab, settings.ngrams)
        y = torch.zeros(len(part), num_classes)
        rows, cols, weights = zip(*((r, k, w) for r, i in enumerate(part) for k, w in targets[i].items()))
        y[list(rows), list(cols)] = torch.tensor(weights)  # a record's classes are distinct keys
        chunks.append((ids, offsets, y))
    weight = torch.zeros(max(len(vocab), 1), num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=settings.max_iter,
        history_size=10,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = 0.0
        for ids, offsets, y in chunks:  # gradients add up over the chunks
            logits = F.embedding_bag(ids, weight, offsets, mode="sum") + bias
            loss = -(y * F.log_softmax(logits, dim=1)).sum() / n
            loss.backward()
            total += loss.item()
        penalty = weight.pow(2).sum() / (2 * c * n)
        penalty.backward()
        return torch.tensor(total + penalty.item())

    optimizer.step(closure)
    return TextClassifier(vocab, weight.detach(), bias.detach(), settings, c)


def text_only_classification(
    train_texts: Sequence[str],
    train_labels: Sequence[int],
    test_texts: Sequence[str],
    test_labels: Sequence[int],
    num_classes: int,
    settings: TextBaselineSettings | None = None,
) -> dict[str, Any]:
    """Accuracy (%) of the text-only classifier on the test texts, with what it was trained on."""
    clf = fit_text_classifier(train_texts, train_labels, num_classes, settings)
    predictions = clf.predict(test_texts)
    correct = sum(int(p == y) for p, y in zip(predictions, test_labels, strict=True))
    train_correct = sum(int(p == y) for p, y in zip(clf.predict(train_texts), train_labels, strict=True))
    return {
        "accuracy": round(100 * correct / len(test_labels), 3) if test_labels else float("nan"),
        "train_accuracy": round(100 * train_correct / len(train_labels), 3),
        "train_records": len(train_texts),
        "test_records": len(test_texts),
        **clf.description(),
    }


def question_only_vqa(
    train_questions: Sequence[str],
    train_answers: Sequence[tuple[Sequence[str], Sequence[float]]],
    test_questions: Sequence[str],
    test_ids: Sequence[int],
    answer_list: Sequence[str],
    human_answers: dict[str, list[str]],
    settings: TextBaselineSettings | None = None,
) -> dict[str, Any]:
    """VQA accuracy (%) of answering each test question from its text alone: the classifier picks one answer
    of ``answer_list``; training questions none of whose answers is in the list are left out (counted).
    ``train_answers``: per question, its distinct answers and their official weights."""
    from albef.eval.vqa import score_predictions

    index = {a: i for i, a in enumerate(answer_list)}
    texts, targets = [], []
    for question, (answers, weights) in zip(train_questions, train_answers, strict=True):
        target: dict[int, float] = {}
        for a, w in zip(answers, weights, strict=True):
            if a in index:
                target[index[a]] = target.get(index[a], 0.0) + float(w)
        if target:
            texts.append(question)
            targets.append(target)
    if not texts:
        raise ValueError("no training question has an answer in the answer list")
    clf = fit_text_classifier(texts, targets, len(answer_list), settings)
    predictions = [
        {"question_id": qid, "answer": answer_list[p]}
        for qid, p in zip(test_ids, clf.predict(test_questions), strict=True)
    ]
    scored = score_predictions(predictions, human_answers)
    return {
        "accuracy": scored["accuracy"],
        "scored_questions": scored["scored_questions"],
        "train_records": len(texts),
        "train_without_listed_answer": len(train_questions) - len(texts),
        **clf.description(),
    }


__all__ = [
    "TextBaselineSettings",
    "TextClassifier",
    "fit_text_classifier",
    "ngrams",
    "question_only_vqa",
    "text_only_classification",
]
