from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizerFast

from albef.config import tiny_config
from albef.tokenizer import ALBEFTokenizer

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "right", "the", "big", "small", "##s"]


@pytest.fixture
def tokenizer(tmp_path) -> ALBEFTokenizer:
    vocab = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    return ALBEFTokenizer.from_pretrained(tmp_path / "tok")


def test_single_sentences_have_no_sep_by_default(tokenizer):
    batch = tokenizer(["a red circle", "a blue square left of the big circle"], max_length=30)
    ids = batch.input_ids.tolist()
    assert ids[0][:4] == [1, 5, 6, 8] and 2 not in ids[0]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1] + [0] * (len(ids[0]) - 4)
    assert batch.input_ids.shape == (2, 9)  # padded to the longest: [CLS] + 8 words


def test_switch_adds_sep(tmp_path, tokenizer):
    with_sep = ALBEFTokenizer(tokenizer.tokenizer, single_sentence_sep=True)
    assert with_sep(["a red circle"], max_length=30).input_ids.tolist() == [[1, 5, 6, 8, 2]]


def test_truncation_keeps_max_length_tokens_like_the_official_tokenizer(tokenizer):
    text = " ".join(["red"] * 40)
    batch = tokenizer([text], max_length=25)
    # official: [CLS] + 24 word pieces, no [SEP]
    assert batch.input_ids.shape == (1, 25)
    assert batch.input_ids[0, 0] == 1 and (batch.input_ids[0, 1:] == 6).all()
    padded = tokenizer(["a"], max_length=30, padding="max_length")
    assert padded.input_ids.shape == (1, 30) and padded.attention_mask.sum() == 2


def test_compatibility_with_the_model_config(tokenizer):
    cfg = tiny_config()  # pad 0, cls 1, sep 2, mask 3, vocab 100
    tokenizer.check_compatible(cfg.text)
    cfg.text.mask_token_id = 4
    with pytest.raises(ValueError, match="text.mask_token_id is 4 but the tokenizer's is 3"):
        tokenizer.check_compatible(cfg.text)
    cfg.text.vocab_size = 10
    with pytest.raises(ValueError, match="tokenizer has 17 tokens but text.vocab_size is 10"):
        tokenizer.check_compatible(cfg.text)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer"):
        ALBEFTokenizer.from_pretrained(tmp_path / "none")


def test_tokens_feed_the_model(tokenizer):
    from albef.models import ALBEFPretrain

    model = ALBEFPretrain(tiny_config())
    batch = tokenizer(["a red circle left of a blue square", "the big square"], max_length=25)
    out = model(torch.randn(2, 3, 32, 32), batch.input_ids, batch.attention_mask)
    assert torch.isfinite(out.loss)
