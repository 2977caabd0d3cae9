"""The official ALBEF text cleaning (``dataset/utils.py``: ``pre_caption`` and ``pre_question``)."""

from __future__ import annotations

import re

_DELETE = str.maketrans("", "", ",.'!?\"()*#:;~")
_TO_SPACE = str.maketrans({"-": " ", "/": " "})


def pre_caption(text: str, max_words: int = 30) -> str:
    """Lowercase, drop ``,.'!?"()*#:;~``, turn ``-`` and ``/`` into spaces, ``<person>`` into ``person``,
    collapse whitespace runs, strip, and keep the first ``max_words`` words (captions, NLVR2 sentences,
    SNLI-VE hypotheses, referring expressions)."""
    text = text.lower().translate(_DELETE).translate(_TO_SPACE).replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_question(text: str, max_words: int = 30) -> str:
    """The VQA variant: lowercase, drop the same punctuation, ``-``/``/`` to spaces, strip trailing spaces,
    keep the first ``max_words`` words (no whitespace collapsing, as the official code)."""
    text = text.lower().translate(_DELETE).translate(_TO_SPACE).rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text
