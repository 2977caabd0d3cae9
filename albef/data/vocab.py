"""The offline default tokenizer: a WordPiece vocabulary trained on the training captions.

When ``bert-base-uncased`` is available (a local folder, or the hub) use it; on a machine without either,
albef trains a BERT-style uncased WordPiece vocabulary on the cleaned training texts with the
``tokenizers`` library and saves it as a standard Hugging Face tokenizer folder. Special tokens come first:
``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4 (the ``small`` and ``tiny`` presets' ids).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, min_frequency: int = 1
) -> Path:
    """Train on ``texts`` (deterministic: texts are sorted and de-duplicated first) and save to ``out_dir``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    corpus = sorted(set(texts))
    if not corpus:
        raise ValueError("cannot train a vocabulary on no text")
    trainer = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    trainer.train_from_iterator(
        corpus, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = trainer.save_model(tmp)[0]
        tokenizer = BertTokenizerFast(vocab=vocab_file, do_lower_case=True)
        tokenizer.save_pretrained(str(out))
    return out
