"""The offline default tokenizer: a WordPiece vocabulary built from the training captions.

When ``bert-base-uncased`` is available (a local folder, or the hub) use it; on a machine without either,
albef builds a BERT-style uncased WordPiece vocabulary from the cleaned training texts and saves it as a
standard Hugging Face tokenizer folder. Text is normalised and split exactly as BERT does (the
``tokenizers`` BERT normaliser and pre-tokeniser). The vocabulary is the special tokens, every character
as a word start and as a ``##`` continuation (so any word can still be spelled), then whole words by
descending frequency (ties alphabetical) up to ``vocab_size``. Unlike the ``tokenizers`` WordPiece trainer,
whose merges break ties in hash order and differ from run to run, this is the same on every run.
Special tokens come first: ``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4 (the ids of the
``small`` and ``tiny`` presets).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_counts(texts: Iterable[str]) -> Counter:
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    pre_tokenizer = BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def train_wordpiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, min_frequency: int = 1
) -> Path:
    """Build the vocabulary from ``texts`` and save a tokenizer folder to ``out_dir``."""
    from transformers import BertTokenizerFast

    counts = word_counts(texts)
    if not counts:
        raise ValueError("cannot build a vocabulary from no text")
    chars = sorted({c for word in counts for c in word})
    pieces = chars + [f"##{c}" for c in chars]
    budget = vocab_size - len(SPECIAL_TOKENS) - len(pieces)
    if budget < 0:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the special tokens and the {len(chars)} characters of the "
            f"corpus alone need {len(SPECIAL_TOKENS) + len(pieces)}"
        )
    taken = set(pieces)
    words = sorted(
        (w for w, n in counts.items() if n >= min_frequency and w not in taken), key=lambda w: (-counts[w], w)
    )
    vocab = SPECIAL_TOKENS + pieces + words[:budget]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True).save_pretrained(str(out))
    return out
