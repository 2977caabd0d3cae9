"""Loading official checkpoints in every layout, albef's own format, and pretrained encoder initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from albef.checkpoint import (
    CheckpointError,
    build_model,
    infer_config,
    load_official,
    load_pretrained,
    read_official_state_dict,
    save_pretrained,
)
from albef.cli import main as cli_main
from albef.config import base_config, tiny_config
from albef.models import ALBEFPretrain, ALBEFRetrieval
from albef.parity import reference_config

OFFICIAL = Path(__file__).parent / "official" / "albef_ref_pretrain.pt"


@pytest.fixture(scope="module")
def ref():
    return torch.load(OFFICIAL, weights_only=True)


def test_pretraining_checkpoint_loads_into_the_retrieval_model(ref):
    cfg = reference_config(ref)
    model = ALBEFRetrieval(cfg).eval()
    report = load_official(model, {"model": ref["state_dict"], "epoch": 3})
    assert report.missing == ["idx_queue"]
    assert sorted(report.unexpected) == sorted(k for k in ref["state_dict"] if ".cls." in k)
    _, image_feat = model.encode_image(ref["inputs"]["image"])
    _, text_feat = model.encode_text(ref["inputs"]["input_ids"], ref["inputs"]["attention_mask"])
    torch.testing.assert_close(image_feat, ref["outputs"]["image_feat"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text_feat, ref["outputs"]["text_feat"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.image_queue, ref["state_dict"]["image_queue"])


def test_released_finetuned_layout_without_momentum_or_queues(ref):
    # mscoco.pth-style: raw state dict, finetuning key names, momentum encoders and queues stripped, DDP prefix
    cfg = reference_config(ref)
    state = {}
    for key, value in ref["state_dict"].items():
        if key.split(".")[0].endswith("_m") or "queue" in key or ".cls." in key:
            continue
        state["module." + key.replace("text_encoder.bert.", "text_encoder.")] = value
    model = ALBEFRetrieval(cfg)
    report = load_official(model, state)
    assert {"image_queue", "text_queue", "idx_queue", "queue_ptr"} == set(report.missing)
    assert report.momentum_from_online and not report.unexpected
    torch.testing.assert_close(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)
    torch.testing.assert_close(model.text_proj_m.weight, ref["state_dict"]["text_proj.weight"])
    # the same file loads into the pretraining model too (MLM head reported missing, not invented)
    report = load_official(ALBEFPretrain(cfg), state)
    assert any(k.startswith("text_encoder.cls.") for k in report.missing)
    with pytest.raises(CheckpointError, match="lacks"):
        load_official(ALBEFPretrain(cfg), state, strict=True)


def test_position_embeddings_are_resampled_to_the_target_size(ref):
    cfg = reference_config(ref)
    cfg.vision.image_size = 96  # grid 4x4 -> 6x6, as 256 -> 384 in finetuning
    model = ALBEFRetrieval(cfg)
    report = load_official(model, ref["state_dict"])
    assert set(report.resampled) == {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}
    old = ref["state_dict"]["visual_encoder.pos_embed"]
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat([old[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
    torch.testing.assert_close(model.visual_encoder.pos_embed.detach(), expected)


def test_wrong_architecture_is_refused_with_shapes(ref):
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \(.*\), model \("):
        load_official(ALBEFPretrain(tiny_config()), ref["state_dict"])


def test_another_queue_size_starts_fresh_queues(ref):
    cfg = reference_config(ref)
    cfg.queue_size = 8
    model = ALBEFPretrain(cfg)
    report = load_official(model, ref["state_dict"])
    assert {"image_queue", "text_queue", "queue_ptr"} <= set(report.reset)
    assert model.image_queue.shape == (cfg.embed_dim, 8)


def test_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_official_state_dict(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth: not a readable PyTorch checkpoint"):
        read_official_state_dict(bad)
    with pytest.raises(CheckpointError, match="no tensors"):
        read_official_state_dict({"epoch": 1})


@pytest.mark.parametrize(
    ("task", "key_file", "entry"),
    [
        ("pretrain", "albef_full_keys.json", None),
        ("retrieval", "albef_full_keys_finetune.json", "retrieval"),
        ("vqa", "albef_full_keys_finetune.json", "vqa"),
        ("ve", "albef_full_keys_finetune.json", "ve"),
        ("nlvr", "albef_full_keys_finetune.json", "nlvr"),
    ],
)
def test_full_size_models_have_the_official_keys(task, key_file, entry):
    path = OFFICIAL.parent / key_file
    data = json.loads(path.read_text())
    data = data["models"][entry] if entry else data
    official = {e["key"]: tuple(e["shape"]) for e in data["keys"]}
    cfg = base_config()
    if task != "pretrain":
        cfg.vision.image_size = 384
    with torch.device("meta"):
        model = build_model(task, cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in official.items() if not k.endswith("position_ids")}
    assert ours == official
    from albef.checkpoint import parameter_count

    assert parameter_count(model) == data["num_unique_parameters"]


def test_own_format_roundtrip_is_strict_and_exact(tmp_path):
    torch.manual_seed(0)
    model = ALBEFRetrieval(tiny_config()).eval()
    with torch.no_grad():
        model.image_queue.mul_(2)
        model.queue_ptr.fill_(8)
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, ALBEFRetrieval)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # the tied MLM decoder stays tied after a round trip
    pre = ALBEFPretrain(tiny_config())
    save_pretrained(pre, tmp_path / "p")
    pre2 = load_pretrained(tmp_path / "p")
    assert (
        pre2.text_encoder.cls.predictions.decoder.weight
        is pre2.text_encoder.bert.embeddings.word_embeddings.weight
    )
    with pytest.raises(CheckpointError, match="holds a 'pretrain' model, not 'retrieval'"):
        load_pretrained(tmp_path / "p", task="retrieval")
    # the same weights give the same bytes (DVC hashes the file): no hash-map-ordered metadata
    save_pretrained(pre, tmp_path / "p2")
    assert (tmp_path / "p" / "model.safetensors").read_bytes() == (
        tmp_path / "p2" / "model.safetensors"
    ).read_bytes()


def test_own_format_refuses_a_mismatched_or_broken_directory(tmp_path):
    save_pretrained(ALBEFRetrieval(tiny_config()), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model"]["text"]["intermediate"] = 48
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_pretrained(tmp_path / "m")
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not an albef model directory"):
        load_pretrained(tmp_path / "empty")


def test_infer_config_reads_sizes_from_weights(ref):
    base = base_config()
    base.vision.heads = base.text.heads = 4  # heads cannot be read from weights: the base supplies them
    cfg = infer_config(ref["state_dict"], base)
    assert (cfg.vision.image_size, cfg.vision.width, cfg.vision.depth) == (64, 64, 2)
    assert (cfg.text.vocab_size, cfg.text.hidden, cfg.text.text_layers, cfg.text.fusion_layers) == (
        1000,
        64,
        2,
        2,
    )
    assert (cfg.embed_dim, cfg.queue_size, cfg.text.intermediate, cfg.text.max_positions) == (32, 16, 128, 64)
    assert infer_config(ref["state_dict"], base, image_size=96).vision.image_size == 96
    with pytest.raises(CheckpointError, match="heads cannot be read from the weights"):
        infer_config(ref["state_dict"], base_config())


def test_cli_convert_official(tmp_path, ref, capsys):
    src = tmp_path / "ALBEF_tiny.pth"
    torch.save({"model": ref["state_dict"], "epoch": 29}, src)
    params = tmp_path / "params.yaml"
    params.write_text(
        "model:\n  preset: tiny\n  vision: {heads: 4}\n"
        "  text: {heads: 4, cls_token_id: 1, sep_token_id: 2, mask_token_id: 3}\n"
    )
    assert (
        cli_main(
            [
                "convert-official",
                str(src),
                str(tmp_path / "out"),
                "--task",
                "retrieval",
                "--params",
                str(params),
            ]
        )
        == 0
    )
    assert "missing: idx_queue" in capsys.readouterr().out
    model = load_pretrained(tmp_path / "out", task="retrieval").eval()
    _, feat = model.encode_image(ref["inputs"]["image"])
    torch.testing.assert_close(feat, ref["outputs"]["image_feat"], atol=1e-5, rtol=0)
    assert (
        cli_main(
            ["convert-official", str(tmp_path / "missing.pth"), str(tmp_path / "x"), "--task", "pretrain"]
        )
        == 2
    )
    assert "checkpoint not found" in capsys.readouterr().err


def test_deit_initialisation_from_a_local_file(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from albef.models.vision import ImageEncoder, load_deit_weights

    cfg = tiny_config()
    torch.manual_seed(1)
    deit = VisionTransformer(img_size=16, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit.pth")
    encoder = ImageEncoder(cfg.vision)  # 32 px: 1x1 grid -> 2x2
    result = load_deit_weights(encoder, tmp_path / "deit.pth")
    assert result["missing"] == [] and result["unexpected"] == []
    torch.testing.assert_close(encoder.blocks[1].mlp.fc2.weight, deit.blocks[1].mlp.fc2.weight)
    assert encoder.pos_embed.shape == (1, 5, 32)
    with pytest.raises(FileNotFoundError, match="not a local file and the hub failed"):
        load_deit_weights(encoder, tmp_path / "no_such_deit_model")


def test_bert_initialisation_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from albef.pretrained import init_from_pretrained

    cfg = tiny_config()
    torch.manual_seed(2)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    model = ALBEFPretrain(cfg)
    cross_before = model.text_encoder.bert.encoder.layer[1].crossattention.self.query.weight.detach().clone()
    init_from_pretrained(model, bert=tmp_path / "bert")
    layer = model.text_encoder.bert.encoder.layer[1]
    torch.testing.assert_close(
        layer.attention.self.query.weight, bert.bert.encoder.layer[1].attention.self.query.weight
    )
    torch.testing.assert_close(layer.crossattention.self.query.weight, cross_before)  # BERT has none: kept
    torch.testing.assert_close(model.text_encoder.cls.predictions.bias, bert.cls.predictions.bias)
    torch.testing.assert_close(
        model.text_encoder_m.bert.encoder.layer[0].output.dense.weight,
        bert.bert.encoder.layer[0].output.dense.weight,
    )
    small = BertForMaskedLM(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="BERT has 1 layers but the model needs 2"):
        init_from_pretrained(ALBEFPretrain(cfg), bert=tmp_path / "small")
    with pytest.raises(FileNotFoundError, match="could not load BERT weights"):
        init_from_pretrained(ALBEFPretrain(cfg), bert=tmp_path / "nothing-here")
