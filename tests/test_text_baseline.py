"""The text-only baselines (albef.eval.text_baseline): they read what the text gives away, nothing more, the
same way every time."""

from __future__ import annotations

import random

import pytest
import torch

from albef.eval.text_baseline import (
    TextBaselineSettings,
    fit_text_classifier,
    ngrams,
    question_only_vqa,
    text_only_classification,
)

FILLER = [
    "the",
    "a",
    "red",
    "blue",
    "small",
    "large",
    "circle",
    "square",
    "picture",
    "left",
    "right",
    "of",
    "near",
    "is",
    "there",
]
CUES = ("never", "maybe", "always")  # one word per class


def _texts(rng: random.Random, n: int, cue_of=None) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(3)
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        if cue_of is not None:
            words.insert(rng.randrange(len(words) + 1), cue_of[label])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_ngrams_are_the_distinct_unigrams_and_bigrams_in_order():
    assert ngrams("is the red is the") == ["is", "the", "red", "is the", "the red", "red is"]
    assert ngrams("") == []


def test_a_text_that_determines_the_class_is_read_perfectly():
    rng = random.Random(0)
    train_texts, train_labels = _texts(rng, 90, CUES)
    test_texts, test_labels = _texts(rng, 60, CUES)
    result = text_only_classification(train_texts, train_labels, test_texts, test_labels, 3)
    assert result["accuracy"] == 100.0 and result["train_accuracy"] == 100.0
    assert result["train_records"] == 90 and result["test_records"] == 60 and result["features"] > 0


def test_a_text_without_signal_gives_about_the_majority_class():
    rng = random.Random(1)

    def draw(n):  # labels independent of the text, 60 / 30 / 10 %
        texts, _ = _texts(rng, n)
        return texts, rng.choices(range(3), weights=(6, 3, 1), k=n)

    train_texts, train_labels = draw(400)
    test_texts, test_labels = draw(400)
    majority = 100 * test_labels.count(0) / len(test_labels)
    result = text_only_classification(train_texts, train_labels, test_texts, test_labels, 3)
    assert abs(result["accuracy"] - majority) <= 6.0, (result["accuracy"], majority)


def test_training_is_deterministic():
    rng = random.Random(2)
    texts, labels = _texts(rng, 120, CUES)
    texts[::3] = [t.replace("never", "maybe") for t in texts[::3]]  # some noise, so weights are not trivial
    settings = TextBaselineSettings(chunk_size=50)  # gradients summed over several chunks, c chosen
    one = fit_text_classifier(texts, labels, 3, settings)
    two = fit_text_classifier(texts, labels, 3, settings)
    assert one.vocab == two.vocab
    assert torch.equal(one.weight, two.weight) and torch.equal(one.bias, two.bias)
    assert one.predict(texts) == two.predict(texts)
    whole = fit_text_classifier(texts, labels, 3)  # one chunk: the same optimum, up to rounding
    assert torch.allclose(one.weight, whole.weight, atol=1e-3)


def test_question_only_vqa_answers_from_the_question_and_scores_with_vqa_accuracy():
    colors = {"sky": "blue", "grass": "green", "sun": "yellow", "apple": "red"}
    answer_list = ["blue", "green", "yellow", "red", "no"]
    train_q, train_a = [], []
    for i in range(40):
        thing = list(colors)[i % 4]
        train_q.append(f"what color is the {thing}")
        # the official soft targets; "purple" is not in the answer list and is left out
        train_a.append(([colors[thing], "purple"], [0.8, 0.2]))
    train_q.append("what is this")
    train_a.append((["purple"], [1.0]))  # no answer in the list: not trained on
    test_q = [f"what color is the {t}" for t in colors]
    humans = {str(i): [c] * 10 for i, c in enumerate(colors.values())}
    humans["3"] = ["red"] * 2 + ["green"] * 8  # two humans of ten said red: 2/3 credit
    result = question_only_vqa(train_q, train_a, test_q, list(range(4)), answer_list, humans)
    assert result["accuracy"] == pytest.approx(100 * (3 + 2 / 3) / 4, abs=1e-3)
    assert result["scored_questions"] == 4
    assert result["train_records"] == 40 and result["train_without_listed_answer"] == 1


def test_the_evaluations_skip_the_baseline_without_a_training_file(tmp_path, caplog):
    from albef.eval.settings import classifier_eval_settings, vqa_eval_settings
    from albef.eval.stages import question_only_baseline, sentence_only_baseline

    cfg = vqa_eval_settings({"evaluate_vqa": {"data_dir": str(tmp_path)}})
    assert cfg.train_file == "vqa_train.json"  # the file finetune_vqa trains on, by default
    assert question_only_baseline(cfg, "evaluate_vqa", [], ["yes"], {}) == {}
    assert "vqa_train.json not found" in caplog.text
    cfg = classifier_eval_settings({"evaluate_ve": {"data_dir": str(tmp_path), "train_file": None}}, "ve")
    assert sentence_only_baseline(cfg, "ve", "evaluate_ve", None) == {}
    assert classifier_eval_settings({"evaluate_nlvr": {}}, "nlvr").train_file == "nlvr_train.json"
