from __future__ import annotations

from albef.data.vocab import train_wordpiece
from albef.tokenizer import ALBEFTokenizer

TEXTS = [
    f"a {c} {s} left of a {c2} {s2}"
    for c in ("red", "blue", "green")
    for s in ("circle", "square")
    for c2 in ("yellow", "purple")
    for s2 in ("star", "triangle")
]


def test_trained_vocabulary_is_deterministic_and_loads(tmp_path):
    a = train_wordpiece(TEXTS, tmp_path / "a", vocab_size=120)
    b = train_wordpiece(list(reversed(TEXTS)), tmp_path / "b", vocab_size=120)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = ALBEFTokenizer.from_pretrained(a)
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    batch = tok(["a red circle left of a yellow star"], max_length=30)
    ids = batch.input_ids[0].tolist()
    assert ids[0] == 2 and 1 not in ids  # [CLS] first, no [UNK] for words seen in training
    assert tok.decode(ids) == "a red circle left of a yellow star"


def test_words_outside_the_budget_are_spelled_not_unknown(tmp_path):
    tok = ALBEFTokenizer.from_pretrained(
        train_wordpiece(TEXTS, tmp_path / "v", vocab_size=200, min_frequency=10**6)
    )
    ids = tok(["a red triangle"], max_length=30).input_ids[0].tolist()
    assert 1 not in ids and len(ids) == 1 + len("aredtriangle")  # spelled by characters
    assert tok.decode(ids) == "a red triangle"
