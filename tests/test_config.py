from __future__ import annotations

import pytest

from albef.config import ConfigError, ModelConfig, base_config, load_model_config, small_config, tiny_config


def test_presets_are_valid_and_base_is_the_official_model():
    for make in (base_config, small_config, tiny_config):
        make().validate()
    base = base_config()
    assert (base.vision.image_size, base.vision.width, base.vision.depth, base.vision.heads) == (
        256,
        768,
        12,
        12,
    )
    assert (base.text.text_layers, base.text.fusion_layers, base.text.hidden) == (6, 6, 768)
    assert (base.embed_dim, base.queue_size, base.momentum, base.temp) == (256, 65536, 0.995, 0.07)
    assert base.quirks.single_sentence_sep is False


def test_preset_with_overrides():
    cfg = ModelConfig.from_dict({"preset": "tiny", "vision": {"image_size": 64}, "temp": 0.05})
    assert cfg.vision.image_size == 64 and cfg.vision.width == tiny_config().vision.width
    assert cfg.temp == 0.05


def test_roundtrip_through_dict():
    cfg = small_config()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"vision": {"widht": 10}}, "model.vision.widht"),
        ({"queue_sise": 3}, "model.queue_sise"),
        ({"preset": "huge"}, "model.preset"),
        ({"vision": {"width": 30, "heads": 4}}, "model.vision.width"),
        ({"text": {"hidden": 30, "heads": 4}}, "model.text.hidden"),
        ({"text": {"fusion_layers": 0}}, "model.text.fusion_layers"),
        ({"vision": {"image_size": 40}}, "model.vision.image_size"),
        ({"momentum": 1.5}, "model.momentum"),
        ({"embed_dim": "big"}, "model.embed_dim"),
        ({"distill": "yes"}, "model.distill"),
        ({"text": {"mask_token_id": 100}}, "model.text.mask_token_id"),
        ({"temp": 0.9}, "model.temp"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_dict({"preset": "tiny", **override})


def test_queue_must_be_divisible_by_the_global_batch():
    cfg = tiny_config()  # queue 32
    cfg.check_global_batch(8)
    with pytest.raises(ConfigError, match="queue_size .32. is not divisible by the global batch .12"):
        cfg.check_global_batch(12)


def test_load_from_params_yaml(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  preset: tiny\n  text:\n    vocab_size: 200\n")
    assert load_model_config(params).text.vocab_size == 200
    with pytest.raises(ConfigError, match="not divisible by the global batch"):
        load_model_config(params, global_batch=24)
    params.write_text("model:\n  preset: tiny\n  text: {vocab_sise: 200}\n")
    with pytest.raises(ConfigError, match="model.text.vocab_sise"):
        load_model_config(params)
    params.write_text("other: 1\n")
    with pytest.raises(ConfigError, match="no 'model' section"):
        load_model_config(params)
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "missing.yaml")


def test_alpha_has_one_home_the_training_sections(tmp_path):
    """``model.alpha`` was accepted and tracked but changed no loss (each training section's alpha is what the
    forward gets): params.yaml naming it is told where the setting lives; a model saved with it still loads."""
    import json

    import torch

    from albef.checkpoint import build_model, load_pretrained, save_pretrained

    with pytest.raises(ConfigError, match=r"model\.alpha: no longer a model setting.*pretrain\.alpha"):
        ModelConfig.from_dict({"preset": "tiny", "alpha": 0.4})
    torch.manual_seed(0)
    saved = save_pretrained(build_model("retrieval", tiny_config()), tmp_path / "old")
    config = json.loads((saved / "config.json").read_text())
    config["model"]["alpha"] = 0.4  # as albef wrote it before
    (saved / "config.json").write_text(json.dumps(config))
    assert load_pretrained(saved).cfg == tiny_config()


def test_a_stage_starting_from_a_model_warns_about_the_model_settings_it_cannot_take(tmp_path, caplog):
    """A finetune stage's model is the source model's (sizes, queue, temperature): params.yaml values that
    differ are named in a warning, not silently dropped; the quirks are this run's and are taken."""
    import logging

    import torch

    from albef.checkpoint import build_model, load_for_task, save_pretrained

    torch.manual_seed(0)
    source = save_pretrained(build_model("pretrain", tiny_config()), tmp_path / "pretrain")
    same = ModelConfig.from_dict(tiny_config().to_dict())
    same.quirks.single_sentence_sep = not same.quirks.single_sentence_sep
    with caplog.at_level(logging.WARNING, logger="albef.checkpoint"):
        model, _ = load_for_task(source, "retrieval", same)
    assert not caplog.records and model.cfg.quirks == same.quirks
    other = ModelConfig.from_dict({**tiny_config().to_dict(), "queue_size": 64, "temp": 0.05})
    with caplog.at_level(logging.WARNING, logger="albef.checkpoint"):
        model, _ = load_for_task(source, "retrieval", other)
    (record,) = caplog.records
    assert "model.queue_size = 64 (the model: 32)" in record.message, record.message
    assert "model.temp = 0.05 (the model: 0.07)" in record.message and "quirks" not in record.message
    assert model.cfg.queue_size == 32
