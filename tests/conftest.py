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


# ----------------------------------------------------------------------------- a tiny training pipeline

TINY_MODEL = {
    # the tiny preset with the special-token ids and vocabulary of the tokenizer built from the synthetic texts
    "preset": "tiny",
    "text": {"vocab_size": 1000, "cls_token_id": 2, "sep_token_id": 3, "mask_token_id": 4},
    "queue_size": 16,
}


def tiny_train_params(root, **overrides) -> dict:
    """params.yaml sections for pretrain -> finetune -> evaluate on the tiny data under ``root``."""
    import copy

    data = str(root / "data" / "processed")
    common = {
        "data_dir": data,
        "batch_size": 4,
        "epochs": 2,
        "lr": 1e-3,
        "warmup_stair": 2,
        "num_workers": 0,
        "log_every": 1,
        "hflip": False,
        "max_tokens": 16,
        "k_test": 4,
        "eval_batch_size": 8,
    }
    params = {
        "model": copy.deepcopy(TINY_MODEL),
        "pretrain": {
            **common,
            "train_file": "pretrain.json",
            "val_file": "retrieval_val.json",
            "out": str(root / "models" / "pretrain"),
            "run_dir": str(root / "runs" / "pretrain"),
            "metrics": str(root / "metrics" / "pretrain.json"),
            "plots": str(root / "plots" / "pretrain"),
        },
        "finetune_retrieval": {
            **common,
            "train_file": "retrieval_train.json",
            "val_file": "retrieval_val.json",
            "init": str(root / "models" / "pretrain"),
            "out": str(root / "models" / "retrieval"),
            "run_dir": str(root / "runs" / "finetune_retrieval"),
            "metrics": str(root / "metrics" / "finetune_retrieval.json"),
            "plots": str(root / "plots" / "finetune_retrieval"),
            "crop_scale": [0.5, 1.0],
            "select_metric": "r_mean",
        },
        "evaluate": {"data_dir": data, "k_test": 4, "max_tokens": 16, "num_workers": 0, "examples": 2},
    }
    for key, value in overrides.items():
        name, _, field_name = key.partition(".")
        params[name][field_name] = value
        if value is None and name == "model":
            del params[name][field_name]
    return params


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny synthetic benchmark, preprocessed into shards with its tokenizer: ``<root>/data/processed``."""
    from albef.data.stages import preprocess_stage, synth_stage

    root = tmp_path_factory.mktemp("tiny_data")
    params = {
        "synth": {
            "out": str(root / "data" / "synth"),
            "seed": 1,
            "image_size": 48,
            "pretrain_images": 24,
            "retrieval_train_images": 8,
            "retrieval_val_images": 4,
            "retrieval_test_images": 6,
            "vqa_train_images": 0,
            "vqa_test_images": 0,
            "ve_images": 0,
            "nlvr_pairs": 0,
            "grounding_images": 0,
            "workers": 1,
        },
        "preprocess": {
            "image_root": str(root / "data" / "synth"),
            "out_dir": str(root / "data" / "processed"),
            "files": {
                "pretrain.json": "pretrain",
                "retrieval_train.json": "retrieval_train",
                "retrieval_val.json": "retrieval_eval",
                "retrieval_test.json": "retrieval_eval",
            },
            "max_side": 48,
            "shard_size": 32,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 1000, "train_files": ["pretrain.json", "retrieval_train.json"]},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    return root
