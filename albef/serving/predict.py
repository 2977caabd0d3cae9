"""Single predictions with a finetuned VQA, SNLI-VE or NLVR2 model.

A predictor loads an exported model folder once (weights, tokenizer, the evaluation transform; VQA also the
answer list exported with it) and answers batches of already decoded images and texts, with the same text
cleaning as the task's evaluation (``pre_question`` / ``pre_caption``). The ``albef predict`` commands call
:func:`predict`; the MLflow pyfunc models (:mod:`albef.serving.tasks`) keep one predictor each.
A predictor computes on the device :func:`albef.device.resolve_device` gives its ``device`` setting (``auto``:
this machine's GPU if it has one; the pyfuncs always use ``auto``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from albef.device import resolve_device
from albef.tasks import get_task


class BadInput(ValueError):
    """A request the model cannot answer (an empty text, an image that is not one); the message says which."""


def check_text(value: Any, what: str) -> str:
    """``value`` as a non-empty text; anything else is a ValueError naming ``what``."""
    if not isinstance(value, str):
        raise BadInput(f"{what}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise BadInput(f"{what} is empty")
    return value


def open_image(path: str | Path, what: str = "image"):
    """The RGB image at ``path``; a missing file is FileNotFoundError, an undecodable one ValueError, both
    naming ``what`` (the command-line option)."""
    from albef.data.images import ImageProblem, open_rgb

    try:
        return open_rgb(Path(path))
    except ImageProblem as exc:
        if exc.reason == "missing_file":
            raise FileNotFoundError(f"{what}: {path} not found (or not a file)") from exc
        raise BadInput(f"{what}: {path} is not a usable image ({exc})") from exc


class TaskPredictor:
    """The model of ``task`` (default: the class's) in ``model_dir``, its tokenizer and evaluation transform,
    in eval mode, on ``device``: a setting of :mod:`albef.device` (None: ``auto``) or a device already resolved."""

    task: str = ""

    def __init__(
        self, model_dir: str | Path, device: str | torch.device | None = None, task: str | None = None
    ):
        from albef.checkpoint import load_task_model
        from albef.data.transforms import eval_transform

        self.task = task or self.task
        self.model_dir = Path(model_dir)
        self.device = (
            device if isinstance(device, torch.device) else resolve_device(device or "auto", "device")
        )
        model, self.tokenizer = load_task_model(self.model_dir, self.task)
        self.model = model.to(self.device).eval()
        self.transform = eval_transform(model.cfg.vision.image_size)

    def pixels(self, images: list) -> torch.Tensor:
        return torch.stack([self.transform(img) for img in images]).to(self.device)

    @staticmethod
    def clean(texts: list[str], cleaner, max_words: int) -> list[str]:
        """The task's text cleaning; a text with no words left (only punctuation) is a ValueError naming it."""
        cleaned = [cleaner(t, max_words) for t in texts]
        empty = [i for i, t in enumerate(cleaned) if not t.strip()]
        if empty:
            raise BadInput(f"text {empty[0]} ({texts[empty[0]]!r}) has no words left after cleaning")
        return cleaned

    def tokens(self, texts: list[str], max_tokens: int):
        out = self.tokenizer(texts, max_length=min(max_tokens, self.model.cfg.text.max_positions))
        return out.input_ids.to(self.device), out.attention_mask.to(self.device)


class VQAPredictor(TaskPredictor):
    """The ``top`` answers of the answer list (and their re-ranked probabilities), ``k`` candidates re-ranked
    by the answer decoder as in evaluation."""

    task = "vqa"

    def __init__(
        self,
        model_dir: str | Path,
        answer_list: str | Path | None = None,
        k: int = 128,
        top: int = 5,
        max_words: int = 50,
        device: str | torch.device | None = None,
    ):
        from albef.data.vqa import read_answer_list, tokenize_answers
        from albef.eval.settings import ANSWER_LIST_FILE

        if k < 1 or top < 1:
            raise ValueError(f"k and top must be >= 1, got k={k}, top={top}")
        super().__init__(model_dir, device)
        self.answers = read_answer_list(answer_list or self.model_dir / ANSWER_LIST_FILE)
        self.k, self.top, self.max_words = k, top, max_words
        ids, mask = tokenize_answers(self.tokenizer, self.answers, self.model.cfg.text.max_positions)
        self.answer_ids, self.answer_mask = ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def __call__(self, images: list[tuple], questions: list[str]) -> list[list[tuple[str, float]]]:
        """``images``: per question, a tuple of its one image (as :class:`ClassifierPredictor` takes them)."""
        from albef.data.text import pre_question

        # test questions are not truncated to a token count by the official code; the position table bounds them
        cleaned = self.clean(questions, pre_question, self.max_words)
        ids, mask = self.tokens(cleaned, self.model.cfg.text.max_positions)
        pixels = self.pixels([image for (image,) in images])
        top_ids, probs = self.model.predict(pixels, ids, mask, self.answer_ids, self.answer_mask, k=self.k)
        return [
            [
                (self.answers[i], float(p))
                for i, p in zip(row_ids[: self.top], row_probs[: self.top], strict=True)
            ]
            for row_ids, row_probs in zip(top_ids.tolist(), probs.float().tolist(), strict=True)
        ]


class ClassifierPredictor(TaskPredictor):
    """Class probabilities from the fused [CLS] (the evaluation forward): per text, its label, that label's
    probability and every class's."""

    images_per_text = 1

    def __init__(
        self,
        model_dir: str | Path,
        max_tokens: int = 40,
        max_words: int = 30,
        device: str | torch.device | None = None,
    ):
        from albef.data.classify import LABEL_NAMES

        super().__init__(model_dir, device)
        self.labels = LABEL_NAMES[self.task]
        self.max_tokens, self.max_words = max_tokens, max_words

    @torch.no_grad()
    def __call__(self, images: list[tuple], texts: list[str]) -> list[dict[str, Any]]:
        """``images``: per text, a tuple of its ``images_per_text`` images (NLVR2: left, right)."""
        from albef.data.text import pre_caption

        cleaned = self.clean(texts, pre_caption, self.max_words)
        # NLVR2 takes all left images, then all right images (the official cat([image0, image1]))
        slots = [self.pixels([row[s] for row in images]) for s in range(self.images_per_text)]
        ids, mask = self.tokens(cleaned, self.max_tokens)
        probs = torch.softmax(self.model.logits(torch.cat(slots), ids, mask).float(), dim=1).cpu()
        out = []
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            out.append(
                {
                    "label": self.labels[best],
                    "probability": row[best],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
            )
        return out


class VEPredictor(ClassifierPredictor):
    """SNLI-VE: does the image entail, contradict or leave open the hypothesis?"""

    task = "ve"


class NLVRPredictor(ClassifierPredictor):
    """NLVR2: is the sentence true of the (left, right) image pair?"""

    task = "nlvr"
    images_per_text = 2


def predict(
    task: str,
    model_dir: str | Path,
    images: dict[str, str | Path],
    text: tuple[str, str],
    device: str = "auto",
    **settings: Any,
) -> Any:
    """The answer of ``task``'s predictor (VQA: the top answers and their re-ranked probabilities; SNLI-VE and
    NLVR2: the label and the class probabilities) to ``text`` (its option's name, the text) about ``images``
    (option -> file; NLVR2: left then right). ``settings`` go to the predictor (VQA: ``answer_list``, by
    default the one exported with the model, ``k``, ``top``)."""
    placed = resolve_device(device, "--device")
    check_text(text[1], text[0])
    pictures = tuple(open_image(path, option) for option, path in images.items())
    predictor = get_task(task).predictor_class()(model_dir, device=placed, **settings)
    return predictor([pictures], [text[1]])[0]
