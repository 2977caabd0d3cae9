"""Shared fixtures. Tests never touch the network: offline switches are set before anything imports."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

from albef.config import ModelConfig, tiny_config  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


def make_batch(cfg: ModelConfig, batch: int = 4, length: int = 8, seed: int = 0):
    """Random normalised images and token ids ([CLS] first, padding at the end of some rows)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(5, cfg.text.vocab_size, (batch, length), generator=g)
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        n = length - (row % 3)
        ids[row, n:] = cfg.text.pad_token_id
        mask[row, n:] = 0
    return images, ids, mask
