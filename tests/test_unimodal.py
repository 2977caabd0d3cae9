"""The unimodal warm start: labels, learning, and files that pretraining's init_deit / init_bert accept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from albef.config import ConfigError, ModelConfig
from albef.train.unimodal import SceneLabels, UnimodalConfig, unimodal_stage
from tests.conftest import TINY_MODEL


def test_scene_labels_follow_the_objects():
    scenes = {
        "a": {"objects": [{"color": "red", "shape": "circle", "size": "big", "x": 10, "y": 80}]},
        "b": {
            "objects": [
                {"color": "blue", "shape": "square", "size": "small", "x": 70, "y": 5},
                {"color": "red", "shape": "square", "size": "big", "x": 20, "y": 20},
            ]
        },
    }
    labels = SceneLabels(scenes, scene_size=96)
    names = labels.names()
    on = {names[i] for i, v in enumerate(labels(scenes["b"]).tolist()) if v}
    assert on == {
        "blue", "red", "square", "blue square", "red square", "small square", "big square", "2 objects",
        "blue right", "blue top", "red left", "red top", "square left", "square right", "square top",
    }  # fmt: skip
    assert len(names) == len(labels(scenes["a"]))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unimodal.heldout_fraction"):
        UnimodalConfig(heldout_fraction=0.0)
    with pytest.raises(ConfigError, match="unimodal.batch_size"):
        UnimodalConfig(batch_size=0)


def test_stage_learns_and_writes_pretrain_initialisation(tiny_data, tmp_path):
    from albef.checkpoint import build_model
    from albef.pretrained import init_from_pretrained

    data = tiny_data / "data"
    params = {
        "model": TINY_MODEL,
        "unimodal": {
            "data_dir": str(data / "processed"),
            "scenes": str(data / "synth" / "scenes.json"),
            "out": str(tmp_path / "unimodal"),
            "metrics": str(tmp_path / "unimodal.json"),
            "vision_steps": 200,
            "vision_lr": 3e-3,
            "text_steps": 150,
            "text_lr": 2e-3,
            "batch_size": 8,
            "warmup_steps": 5,
            "heldout_fraction": 0.25,
        },
    }
    metrics = unimodal_stage(params, progress=False)
    assert json.loads((tmp_path / "unimodal.json").read_text()) == metrics
    # 18 training images: the encoder fits them far below the label-frequency floor (on the embedded
    # default it beats the floor on held-out images too: README figures)
    assert metrics["image_train_bce"] < 0.7 * metrics["image_heldout_bce_prior"]
    # The text encoder learns the captions' language: its held-out MLM loss is far below a uniform guess over the
    # vocabulary. (Accuracy on the dozen held-out captions is a coarse measure: half their words are the
    # colours, shapes and sizes of a random scene, which no context predicts.)
    vocab = TINY_MODEL["text"]["vocab_size"]
    assert metrics["text_heldout_mlm_loss"] < 0.6 * math.log(vocab)
    assert metrics["text_heldout_mlm_accuracy"] > 10 / vocab
    out = tmp_path / "unimodal"
    assert not (tmp_path / "unimodal.partial").exists()
    model = build_model("pretrain", ModelConfig.from_dict(TINY_MODEL))
    init_from_pretrained(model, bert=out / "bert", deit=out / "deit.pth")
    saved = torch.load(out / "deit.pth", weights_only=True)["model"]
    assert torch.equal(model.visual_encoder.pos_embed, saved["pos_embed"])
    assert torch.equal(model.visual_encoder_m.pos_embed, saved["pos_embed"])


def test_missing_scenes_is_named(tiny_data, tmp_path):
    params = {
        "model": TINY_MODEL,
        "unimodal": {
            "data_dir": str(tiny_data / "data" / "processed"),
            "scenes": str(tmp_path / "nope.json"),
        },
    }
    with pytest.raises(FileNotFoundError, match="nope.json"):
        unimodal_stage(params, progress=False)
