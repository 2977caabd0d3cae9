"""SNLI-VE, NLVR2 and text-assignment models: structure, initialisation from other tasks' checkpoints (the
official key remapping) and the NLVR2 teacher-initialisation quirk."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from albef.checkpoint import (
    CheckpointError,
    infer_config,
    load_for_task,
    load_official,
    save_pretrained,
)
from albef.config import base_config, tiny_config
from albef.models.nlvr import ALBEFNLVR, ALBEFTextAssignment, RecordedAssignment
from albef.models.pretrain import ALBEFPretrain
from albef.models.ve import ALBEFVE
from albef.parity import nlvr_reference_config, reference_config

OFFICIAL = Path(__file__).parent / "official"


@pytest.fixture(scope="module")
def pre():
    return torch.load(OFFICIAL / "albef_ref_pretrain.pt", weights_only=True)


@pytest.fixture(scope="module")
def nlvr_ref():
    return torch.load(OFFICIAL / "albef_ref_nlvr.pt", weights_only=True)


def _cross(model, layer: int, name: str) -> torch.nn.Linear:
    return getattr(model.text_encoder.encoder.layer[layer].crossattention.self, name)


def test_two_image_encoder_shares_only_cross_attention_keys_and_values():
    cfg = tiny_config()
    model = ALBEFNLVR(cfg)
    t, f = cfg.text.text_layers, cfg.text.fusion_layers
    assert len(model.text_encoder.encoder.layer) == t + 2 * f
    for i in range(f):
        a, b = t + 2 * i, t + 2 * i + 1
        assert _cross(model, a, "key").weight is _cross(model, b, "key").weight
        assert _cross(model, a, "value").bias is _cross(model, b, "value").bias
        assert _cross(model, a, "query").weight is not _cross(model, b, "query").weight
    # the momentum twin is tied the same way, and copies stay aligned parameter by parameter
    assert model.text_encoder_m.encoder.layer[t].crossattention.self.key.weight is (
        model.text_encoder_m.encoder.layer[t + 1].crossattention.self.key.weight
    )


def test_nlvr_uses_the_left_image_in_even_and_the_right_in_odd_fusion_layers():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFNLVR(cfg).eval()
    images = torch.randn(4, 3, 32, 32)
    ids = torch.randint(4, 100, (2, 6))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    logits = model.logits(images, ids, mask)
    swapped = model.logits(torch.cat([images[2:], images[:2]]), ids, mask)
    assert not torch.allclose(logits, swapped)  # the two slots are not interchangeable
    with pytest.raises(ValueError, match="left and right images stacked"):
        model.logits(images[:3], ids, mask)
    with pytest.raises(ValueError, match="labels must lie in"):
        model(images, ids, mask, torch.tensor([0, 2]))


def test_classifier_training_step_updates_the_teacher_and_distils():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ALBEFVE(cfg)
    with torch.no_grad():
        model.cls_head[2].weight.add_(1.0)  # online != teacher
    before = model.cls_head_m[2].weight.clone()
    images = torch.randn(3, 3, 32, 32)
    ids = torch.randint(4, 100, (3, 5))
    out = model(images, ids, torch.ones_like(ids), torch.tensor([0, 1, 2]), alpha=0.4)
    expected = 0.995 * before + 0.005 * model.cls_head[2].weight
    torch.testing.assert_close(model.cls_head_m[2].weight, expected)
    assert out.logits.shape == out.logits_m.shape == (3, 3)
    out.loss.backward()
    assert model.cls_head[0].weight.grad is not None and model.cls_head_m[0].weight.grad is None
    cfg.distill = False
    plain = ALBEFVE(cfg)
    assert not any(k.endswith("_m") for k in dict(plain.named_children()))
    assert plain(images, ids, torch.ones_like(ids), torch.tensor([0, 1, 2])).logits_m is None


def test_pretraining_checkpoint_initialises_ve_as_ve_py(pre):
    cfg = reference_config(pre)
    model = ALBEFVE(cfg).eval()
    report = load_official(model, {"model": pre["state_dict"]})
    assert report.missing == sorted(
        k for k in model.state_dict() if k.startswith(("cls_head.", "cls_head_m."))
    )
    assert {"temp", "image_queue", "vision_proj.weight", "itm_head.weight", "text_proj_m.bias"} <= set(
        report.unexpected
    )
    # momentum encoders carry over from the checkpoint (not re-copied from the online ones)
    torch.testing.assert_close(
        model.text_encoder_m.encoder.layer[0].output.dense.weight,
        pre["state_dict"]["text_encoder_m.bert.encoder.layer.0.output.dense.weight"],
    )
    inp = pre["inputs"]
    hidden = model.fused_states(inp["image"], inp["input_ids"], inp["attention_mask"])
    torch.testing.assert_close(hidden, pre["outputs"]["multimodal_last_hidden_state"], atol=1e-5, rtol=0)


def test_pretraining_checkpoint_initialises_text_assignment_with_duplicated_fusion_layers(pre):
    cfg = reference_config(pre)
    model = ALBEFTextAssignment(cfg)
    report = load_official(model, pre["state_dict"])
    assert report.missing == ["ta_head.bias", "ta_head.weight"]
    assert any(k.startswith("text_encoder_m.") for k in report.unexpected)  # as Pretrain_nlvr.py
    t = cfg.text.text_layers
    sd = pre["state_dict"]
    for i in range(cfg.text.fusion_layers):
        src = f"text_encoder.bert.encoder.layer.{t + i}."
        for layer in (t + 2 * i, t + 2 * i + 1):
            block = model.text_encoder.encoder.layer[layer]
            torch.testing.assert_close(
                block.crossattention.self.query.weight, sd[src + "crossattention.self.query.weight"]
            )
            torch.testing.assert_close(
                block.crossattention.self.value.bias, sd[src + "crossattention.self.value.bias"]
            )
            torch.testing.assert_close(block.output.dense.weight, sd[src + "output.dense.weight"])
    torch.testing.assert_close(model.vision_proj.weight, sd["vision_proj.weight"])
    torch.testing.assert_close(
        model.text_encoder.encoder.layer[0].attention.self.key.weight,
        sd["text_encoder.bert.encoder.layer.0.attention.self.key.weight"],
    )


def test_text_assignment_step(pre):
    torch.manual_seed(0)
    cfg = reference_config(pre)
    model = ALBEFTextAssignment(cfg).eval()  # no dropout: a replay must give the same loss
    load_official(model, pre["state_dict"])
    inp = pre["inputs"]
    out = model(inp["image"], inp["input_ids"], inp["attention_mask"])
    weights = model.sampling_weights(model.visual_encoder(inp["image"]))
    assert torch.all(weights.diagonal() == 0)
    for b, (left, right, label) in enumerate(zip(out.left, out.right, out.labels, strict=True)):
        assert (int(left), int(right)).count(b) == {0: 1, 1: 1, 2: 0}[int(label)]
        assert left != right
        if label == 0:
            assert left == b
        if label == 1:
            assert right == b
    # replaying the same assignment gives the same loss; the loss is the CE of the TA head
    again = model(
        inp["image"],
        inp["input_ids"],
        inp["attention_mask"],
        RecordedAssignment(out.left, out.right, out.labels),
    )
    torch.testing.assert_close(again.loss, out.loss)
    torch.testing.assert_close(again.loss, torch.nn.functional.cross_entropy(again.logits, out.labels))
    with pytest.raises(ValueError, match="at least 3 images"):
        model(inp["image"][:2], inp["input_ids"][:2], inp["attention_mask"][:2])


def _ta_state(pre) -> dict[str, torch.Tensor]:
    model = ALBEFTextAssignment(reference_config(pre))
    load_official(model, pre["state_dict"])
    return model.state_dict()


def test_nlvr_teacher_starts_random_by_default_as_the_official_script(pre):
    torch.manual_seed(0)
    cfg = reference_config(pre)
    assert cfg.quirks.nlvr_teacher_copy_before_load is True
    ta = _ta_state(pre)
    model = ALBEFNLVR(cfg)
    teacher_before = copy.deepcopy(model.text_encoder_m.state_dict())
    report = load_official(model, ta)
    assert report.momentum_from_online == []
    assert {k for k in report.missing if not k.startswith(("cls_head.", "cls_head_m."))} == {
        k for k in model.state_dict() if k.startswith(("visual_encoder_m.", "text_encoder_m."))
    }
    assert {"temp", "vision_proj.weight", "text_proj.bias", "ta_head.weight"} <= set(report.unexpected)
    for k, v in model.text_encoder_m.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # the teacher is the initialisation
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(model.text_encoder_m.state_dict()[key], model.text_encoder.state_dict()[key])


def test_nlvr_teacher_fix_copies_the_loaded_weights(pre):
    cfg = reference_config(pre)
    cfg.quirks.nlvr_teacher_copy_before_load = False
    model = ALBEFNLVR(cfg)
    report = load_official(model, _ta_state(pre))
    assert not any(k.startswith(("visual_encoder_m.", "text_encoder_m.")) for k in report.missing)
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder_m.state_dict()[k], v), k
    torch.testing.assert_close(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)


def test_load_for_task_chain_pretrain_to_ta_to_nlvr(pre, tmp_path):
    cfg = reference_config(pre)
    pretrain = ALBEFPretrain(cfg)
    load_official(pretrain, pre["state_dict"])
    save_pretrained(pretrain, tmp_path / "pre")
    ta, report = load_for_task(tmp_path / "pre", "nlvr_ta")
    assert isinstance(ta, ALBEFTextAssignment) and report.missing == ["ta_head.bias", "ta_head.weight"]
    save_pretrained(ta, tmp_path / "ta")
    nlvr, report = load_for_task(tmp_path / "ta", "nlvr")
    assert isinstance(nlvr, ALBEFNLVR) and not report.momentum_from_online
    torch.testing.assert_close(
        nlvr.text_encoder.state_dict()["encoder.layer.3.output.dense.weight"],
        ta.text_encoder.state_dict()["encoder.layer.3.output.dense.weight"],
    )
    fixed = copy.deepcopy(cfg)
    fixed.quirks.nlvr_teacher_copy_before_load = False
    nlvr, report = load_for_task(tmp_path / "ta", "nlvr", base=fixed)
    assert report.momentum_from_online  # the run's quirk switch applies to the new task
    key = "encoder.layer.4.crossattention.self.key.weight"
    torch.testing.assert_close(nlvr.text_encoder_m.state_dict()[key], nlvr.text_encoder.state_dict()[key])
    ve, report = load_for_task(tmp_path / "pre", "ve")
    assert isinstance(ve, ALBEFVE)
    with pytest.raises(CheckpointError, match="unknown task"):
        load_for_task(tmp_path / "pre", "captioning")


def test_official_nlvr_checkpoint_sizes_are_read_as_the_single_image_config(nlvr_ref):
    base = base_config()
    base.vision.heads = base.text.heads = 4
    cfg = infer_config(nlvr_ref["state_dict"], base)
    assert (cfg.text.text_layers, cfg.text.fusion_layers) == (6, 6)
    model = ALBEFNLVR(cfg)
    report = load_official(model, nlvr_ref["state_dict"], strict=True)
    assert not report.missing and not report.unexpected
    assert nlvr_reference_config(nlvr_ref).text.fusion_layers == 6


def test_own_format_roundtrip_keeps_the_shared_cross_attention(tmp_path):
    from albef.checkpoint import load_pretrained

    torch.manual_seed(0)
    model = ALBEFNLVR(tiny_config())
    save_pretrained(model, tmp_path / "nlvr")
    loaded = load_pretrained(tmp_path / "nlvr", task="nlvr")
    t = loaded.cfg.text.text_layers
    assert _cross(loaded, t, "key").weight is _cross(loaded, t + 1, "key").weight
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_text_assignment_matches_the_official_draws_and_loss():
    # official models/model_pretrain_nlvr.py forward, seeded (see tests/official/README.md); albef draws the
    # same torch.rand / torch.multinomial sequence from the same seed, so the assignment and loss replay
    ref = torch.load(OFFICIAL / "nlvr_ta_official.pt", weights_only=True)
    model = ALBEFTextAssignment(nlvr_reference_config(ref)).eval()
    report = load_official(model, ref["state_dict"], strict=True)
    assert not report.missing and not report.unexpected
    inp = ref["inputs"]
    with torch.no_grad():
        torch.manual_seed(int(ref["forward"]["seed"]))
        out = model(inp["image"], inp["input_ids"], inp["attention_mask"])
    assert 2 in out.labels.tolist() and 0 in out.labels.tolist()  # both kinds of draw are exercised
    torch.testing.assert_close(out.logits, ref["forward"]["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref["forward"]["loss"], atol=1e-5, rtol=0)


def test_cli_task_list_matches_the_registry():
    from albef.checkpoint import TASKS
    from albef.cli import MODEL_TASKS

    assert sorted(MODEL_TASKS) == sorted(TASKS)


def test_text_assignment_gradients_do_not_depend_on_thread_timing():
    """An image drawn for many captions repeats in the left/right index: its gradient is summed in a fixed
    order (equal, bit for bit, to PyTorch's deterministic mode), so two runs of one seed stay identical."""
    from conftest import under_deterministic_algorithms

    torch.manual_seed(0)
    model = ALBEFTextAssignment(tiny_config()).eval()  # no dropout: both passes see the same function
    bs = 256
    images = torch.randn(bs, 3, 32, 32)
    ids = torch.randint(5, 100, (bs, 12))
    mask = torch.ones_like(ids)
    left, right = torch.arange(bs) % 3, torch.arange(bs) % 3 + 3
    choices = RecordedAssignment(left, right, torch.full((bs,), 2))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(images, ids, mask, choices).loss.backward()
        return {n: p.grad.clone() for n, p in model.visual_encoder.named_parameters() if p.grad is not None}

    fast, reference = grads(), under_deterministic_algorithms(grads)
    assert fast.keys() == reference.keys() and all(torch.equal(fast[n], reference[n]) for n in fast)
