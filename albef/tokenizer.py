"""A standard fast BERT tokenizer with ALBEF's single-sentence rule as a switch.

The official code tokenizes a single sentence as ``[CLS] tokens`` with no trailing ``[SEP]``
(ALBEF-SPEC §1.2, issues #75/#91). With ``single_sentence_sep=False`` (the official behaviour) we encode with
the stock tokenizer at ``max_length + 1`` and drop the final ``[SEP]``, so a sequence holds exactly as many
word pieces as the official one (``max_length - 1`` after ``[CLS]``). Unlike the official retrieval
training call, truncation is always on (issue #6: untruncated long captions ran GPUs out of memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from albef.config import ModelConfig, TextConfig

# torch loads on first encoding: preprocessing (which only trains and saves vocabularies) needs none
if TYPE_CHECKING:
    import torch

_SPECIAL_IDS = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 for tokens

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


class ALBEFTokenizer:
    def __init__(self, tokenizer, single_sentence_sep: bool = False):
        self.tokenizer = tokenizer
        self.single_sentence_sep = single_sentence_sep
        for name in _SPECIAL_IDS:
            if getattr(tokenizer, name) is None:
                raise ValueError(
                    f"tokenizer has no {name.removesuffix('_id')} token; ALBEF needs [PAD], [CLS], [SEP], [MASK]"
                )
        self.pad_token_id: int = tokenizer.pad_token_id
        self.cls_token_id: int = tokenizer.cls_token_id
        self.sep_token_id: int = tokenizer.sep_token_id
        self.mask_token_id: int = tokenizer.mask_token_id

    @classmethod
    def from_pretrained(cls, source: str | Path, single_sentence_sep: bool = False) -> ALBEFTokenizer:
        """Load a Hugging Face tokenizer folder (``bert-base-uncased`` or a trained WordPiece) or hub name."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(source), use_fast=True)
        except Exception as exc:
            raise FileNotFoundError(
                f"could not load a tokenizer from {source!r} ({exc}); pass a local tokenizer folder "
                "(e.g. a downloaded bert-base-uncased) when the hub is unreachable"
            ) from exc
        return cls(tok, single_sentence_sep)

    # ids ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_compatible(self, text_cfg: TextConfig) -> None:
        """The model's vocabulary and special ids must be the tokenizer's."""
        problems = []
        if self.vocab_size > text_cfg.vocab_size:
            problems.append(
                f"tokenizer has {self.vocab_size} tokens but text.vocab_size is {text_cfg.vocab_size}"
            )
        for name in _SPECIAL_IDS:
            if getattr(self, name) != getattr(text_cfg, name):
                problems.append(
                    f"text.{name} is {getattr(text_cfg, name)} but the tokenizer's is {getattr(self, name)}"
                )
        if problems:
            raise ValueError("tokenizer and model config disagree: " + "; ".join(problems))

    # encoding -------------------------------------------------------------------------------------
    def __call__(
        self,
        texts: list[str],
        max_length: int,
        padding: Literal["longest", "max_length"] = "longest",
    ) -> TokenBatch:
        """Tokenize single sentences into ``[CLS] tokens`` (+ ``[SEP]`` when the switch is on), truncated to
        ``max_length`` tokens in all and padded to the longest sequence or to ``max_length``."""
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        extra = 0 if self.single_sentence_sep else 1
        encoded = self.tokenizer(
            list(texts),
            add_special_tokens=True,
            truncation=True,
            max_length=max_length + extra,
            padding=False,
        )["input_ids"]
        import torch

        if not self.single_sentence_sep:
            sep = self.sep_token_id
            encoded = [ids[:-1] if ids and ids[-1] == sep else ids for ids in encoded]
        width = max_length if padding == "max_length" else max((len(ids) for ids in encoded), default=1)
        input_ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return TokenBatch(input_ids, attention_mask)

    def decode(self, ids: torch.Tensor | list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)  # a tensor too (to_py_obj)

    def save(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def model_tokenizer_dir(
    model_dir: str | Path, tokenizer_dir: str | Path | None = None, data_dir: str | Path | None = None
) -> Path:
    """Where a saved model's tokenizer is: ``tokenizer_dir`` when given, else the one exported with the model
    (``<model_dir>/tokenizer``), else the preprocessed data's (``<data_dir>/tokenizer``)."""
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    own = Path(model_dir) / "tokenizer"
    return own if own.exists() or data_dir is None else Path(data_dir) / "tokenizer"


def load_tokenizer(path: str | Path, cfg: ModelConfig) -> ALBEFTokenizer:
    """The tokenizer folder ``path`` for a model of config ``cfg`` (its single-sentence rule), checked against the
    model's vocabulary and special ids; a missing folder is a FileNotFoundError saying how to make one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (run the preprocess stage, or set tokenizer:)")
    tok = ALBEFTokenizer.from_pretrained(path, single_sentence_sep=cfg.quirks.single_sentence_sep)
    tok.check_compatible(cfg.text)
    return tok
