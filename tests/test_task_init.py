"""Every task from one pretraining export and from official checkpoints of every layout: the VQA decoder
remap, the VE/NLVR2 heads and the two-image duplication live side by side in albef.checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from albef.checkpoint import TASKS, infer_config, load_for_task, load_official, save_pretrained
from albef.config import base_config
from albef.models.nlvr import ALBEFNLVR, ALBEFTextAssignment
from albef.models.pretrain import ALBEFPretrain
from albef.models.retrieval import ALBEFRetrieval
from albef.models.ve import ALBEFVE
from albef.models.vqa import ALBEFVQA
from albef.parity import nlvr_reference_config, reference_config, vqa_reference_config

OFFICIAL = Path(__file__).parent / "official"


def _ref(name: str) -> dict:
    return torch.load(OFFICIAL / f"albef_ref_{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def pre_dir(tmp_path_factory):
    ref = _ref("pretrain")
    model = ALBEFPretrain(reference_config(ref))
    load_official(model, ref["state_dict"], strict=True)
    out = tmp_path_factory.mktemp("pre") / "pre"
    save_pretrained(model, out)
    return out, model


def _layer(module, i: int) -> torch.Tensor:
    return module.encoder.layer[i].output.dense.weight


def test_one_pretraining_export_starts_every_task(pre_dir, tmp_path):
    source, pre = pre_dir
    t = pre.cfg.text.text_layers
    fusion = pre.text_encoder.bert.encoder.layer[t].output.dense.weight

    retrieval, report = load_for_task(source, "retrieval")
    assert isinstance(retrieval, ALBEFRetrieval) and not report.decoder_from_encoder
    torch.testing.assert_close(_layer(retrieval.text_encoder, t), fusion)

    vqa, report = load_for_task(source, "vqa")
    assert isinstance(vqa, ALBEFVQA) and report.decoder_from_encoder
    torch.testing.assert_close(_layer(vqa.text_decoder.bert, 0), fusion)
    torch.testing.assert_close(
        _layer(vqa.text_decoder_m.bert, 0), pre.text_encoder_m.bert.encoder.layer[t].output.dense.weight
    )

    ve, report = load_for_task(source, "ve")
    assert isinstance(ve, ALBEFVE) and not report.decoder_from_encoder
    assert all(k.startswith(("cls_head.", "cls_head_m.")) for k in report.missing)
    torch.testing.assert_close(_layer(ve.text_encoder, t), fusion)

    ta, report = load_for_task(source, "nlvr_ta")
    assert isinstance(ta, ALBEFTextAssignment) and report.missing == ["ta_head.bias", "ta_head.weight"]
    torch.testing.assert_close(_layer(ta.text_encoder, t), fusion)
    torch.testing.assert_close(_layer(ta.text_encoder, t + 1), fusion)
    save_pretrained(ta, tmp_path / "ta")
    nlvr, report = load_for_task(tmp_path / "ta", "nlvr")
    assert isinstance(nlvr, ALBEFNLVR)
    torch.testing.assert_close(_layer(nlvr.text_encoder, t + 1), fusion)

    # every task saves and comes back strictly, then starts its own task unchanged
    for task, model in {"retrieval": retrieval, "vqa": vqa, "ve": ve, "nlvr": nlvr}.items():
        save_pretrained(model, tmp_path / task)
        again, report = load_for_task(tmp_path / task, task)
        assert report is None and type(again) is TASKS[task]


@pytest.mark.parametrize(
    ("name", "task", "config"),
    [
        ("pretrain", "pretrain", reference_config),
        ("pretrain", "retrieval", reference_config),
        ("pretrain", "vqa", reference_config),
        ("pretrain", "ve", reference_config),
        ("pretrain", "nlvr_ta", reference_config),
        ("retrieval", "retrieval", reference_config),
        ("vqa", "vqa", vqa_reference_config),
        ("ve", "ve", reference_config),
        ("nlvr", "nlvr", nlvr_reference_config),
    ],
)
def test_official_checkpoints_of_every_layout_load_from_a_file(tmp_path, name, task, config):
    ref = _ref(name)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": ref["state_dict"]}, path)
    want = config(ref)
    base = base_config()
    base.vision.heads, base.text.heads = want.vision.heads, want.text.heads
    cfg = infer_config(ref["state_dict"], base)
    assert (cfg.text.text_layers, cfg.text.fusion_layers) == (want.text.text_layers, want.text.fusion_layers)
    if name == "vqa":
        assert cfg.text.decoder_layers == want.text.decoder_layers
    model, report = load_for_task(path, task, base)
    assert type(model) is TASKS[task]
    if name == task:  # the task's own layout: nothing but the queues is missing, nothing left over
        assert not report.unexpected, report.summary()
        assert not [k for k in report.missing if not k.endswith("_queue") and k != "queue_ptr"], (
            report.summary()
        )
        assert not report.decoder_from_encoder
