"""SNLI-VE and NLVR2 stages end to end on tiny synthetic data: TA pretraining -> NLVR2, pretraining -> VE,
evaluation with accuracy and predictions, and the missing-image policy."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODEL, assert_halves_logged, call_under_torchrun, same_json_outputs, with_one_thread

SMALL = {"batch_size": 4, "epochs": 1, "num_workers": 0, "log_every": 1, "warmup_stair": 1, "hflip": False}


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """Synthetic VE and NLVR2 splits (and a few pretraining pairs), preprocessed, with a tokenizer, and a
    random tiny pretraining export to start from."""
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.data.stages import preprocess_stage, synth_stage
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    root = tmp_path_factory.mktemp("cls_data")
    sizes = dict.fromkeys(
        [
            "retrieval_train_images",
            "retrieval_val_images",
            "retrieval_test_images",
            "vqa_train_images",
            "vqa_test_images",
            "grounding_images",
        ],
        0,
    )
    files = {
        "pretrain.json": "pretrain",
        **{f"ve_{s}.json": "ve" for s in ("train", "dev", "test")},
        **{f"nlvr_{s}.json": "nlvr" for s in ("train", "dev", "test")},
    }
    params = {
        "synth": {
            "out": str(root / "synth"),
            "seed": 3,
            "image_size": 48,
            "pretrain_images": 8,
            "ve_images": 8,  # 6 train images (18 records), 1 dev, 1 test (3 records each)
            "nlvr_pairs": 8,  # 6 train pairs (12 records), 1 dev, 1 test (2 records each)
            "workers": 1,
            **sizes,
        },
        "preprocess": {
            "image_root": str(root / "synth"),
            "out_dir": str(root / "processed"),
            "files": files,
            "max_side": 48,
            "shard_size": 64,
            "workers": 1,
        },
        "tokenizer": {
            "vocab_size": 1000,
            "train_files": ["pretrain.json", "ve_train.json", "nlvr_train.json"],
        },
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    data = root / "processed"
    torch.manual_seed(0)
    pre = build_model("pretrain", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    tokenizer = ALBEFTokenizer.from_pretrained(data / "tokenizer")
    export_model(pre, root / "models" / "pretrain", tokenizer, None, {"stage": "test"})
    return root


def _params(root, **sections) -> dict:
    params = {"model": copy.deepcopy(TINY_MODEL)}
    for name, values in sections.items():
        params[name] = {"data_dir": str(root / "processed"), **values}
    return params


def test_ta_then_nlvr_then_evaluate(cls_data, tmp_path):
    from albef.checkpoint import load_pretrained
    from albef.eval.stages import evaluate_classifier_stage
    from albef.models.nlvr import ALBEFNLVR, ALBEFTextAssignment
    from albef.train.classify import finetune_classifier_stage

    root = cls_data
    params = _params(
        root,
        pretrain_nlvr={
            **SMALL,
            "init": str(root / "models" / "pretrain"),
            "out": str(tmp_path / "ta"),
            "run_dir": str(tmp_path / "runs" / "ta"),
            "max_steps": 2,
            "crop_scale": [0.5, 1.0],
        },
        finetune_nlvr={
            **SMALL,
            "epochs": 2,
            "lr": 1e-3,
            "init": str(tmp_path / "ta"),
            "out": str(tmp_path / "nlvr"),
            "run_dir": str(tmp_path / "runs" / "nlvr"),
            "metrics": str(tmp_path / "metrics" / "nlvr.json"),
            "plots": str(tmp_path / "plots" / "nlvr"),
            "eval_batch_size": 4,
        },
        evaluate_nlvr={"batch_size": 4},
    )
    ta = finetune_classifier_stage(params, "nlvr_ta", progress=False)
    assert ta["steps"] == 2 and ta["loss"] > 0
    assert isinstance(load_pretrained(tmp_path / "ta"), ALBEFTextAssignment)

    metrics = finetune_classifier_stage(params, "nlvr", progress=False)
    assert metrics["steps"] == 6 and metrics["train_records"] == 12 and metrics["skipped_missing_images"] == 0
    assert 0 <= metrics["selected"]["accuracy"] <= 100 and metrics["val_records"] == 2
    assert json.loads((tmp_path / "metrics" / "nlvr.json").read_text()) == metrics
    assert (tmp_path / "plots" / "nlvr" / "validation.csv").is_file()
    summary = json.loads((tmp_path / "nlvr" / "training.json").read_text())
    assert summary["task"] == "nlvr" and summary["selected"]["accuracy"] == metrics["selected"]["accuracy"]
    assert isinstance(load_pretrained(tmp_path / "nlvr"), ALBEFNLVR)

    out = tmp_path / "eval"
    result = evaluate_classifier_stage(
        params, "nlvr", tmp_path / "nlvr", out, tmp_path / "m.json", progress=False
    )
    assert result["records"] == 2 and set(result["per_class"]) == {"False", "True"}
    assert 0 <= result["sentence_only_accuracy"] <= 100 and result["sentence_only"]["train_records"] == 12
    assert result["accuracy"] == pytest.approx(100 * result["correct"] / 2)
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["index"] for r in rows] == [0, 1] and len(rows[0]["images"]) == 2
    assert sum(r["correct"] for r in rows) == result["correct"]
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((out / "metrics.json").read_text())

    # the wrong model kind is named, before any weight is read (one rule for every evaluation)
    with pytest.raises(Exception, match="does not hold a 've' model"):
        evaluate_classifier_stage(_params(root, evaluate_ve={}), "ve", tmp_path / "nlvr", tmp_path / "x")
    from albef.eval.stages import evaluate_grounding_stage, evaluate_retrieval_stage

    for evaluate, section in (
        (evaluate_retrieval_stage, "evaluate"),
        (evaluate_grounding_stage, "evaluate_grounding"),
    ):
        with pytest.raises(
            Exception, match="does not hold a 'pretrain' or 'retrieval' model: .* task 'nlvr'"
        ):
            evaluate(_params(root, **{section: {}}), tmp_path / "nlvr", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_ve_from_pretraining_and_evaluate(cls_data, tmp_path):
    from albef.eval.stages import evaluate_classifier_stage
    from albef.train.classify import finetune_classifier_stage

    root = cls_data
    params = _params(
        root,
        finetune_ve={
            **SMALL,
            "init": str(root / "models" / "pretrain"),
            "out": str(tmp_path / "ve"),
            "run_dir": str(tmp_path / "runs" / "ve"),
            "max_steps": 3,
            "val_file": None,  # the last weights are exported
        },
        evaluate_ve={"batch_size": 8},
    )
    metrics = finetune_classifier_stage(params, "ve", progress=False)
    assert metrics["steps"] == 3 and metrics["train_records"] == 18 and "selected" not in metrics
    result = evaluate_classifier_stage(params, "ve", tmp_path / "ve", tmp_path / "eval", progress=False)
    assert result["records"] == 3
    assert list(result["per_class"]) == ["contradiction", "neutral", "entailment"]
    # the hypothesis-only baseline, trained on ve_train.json, scored on the same 3 records
    assert 0 <= result["hypothesis_only_accuracy"] <= 100 and result["hypothesis_only"]["train_records"] == 18
    assert sum(v["records"] for v in result["per_class"].values()) == 3
    assert sum(sum(row.values()) for row in result["confusion"].values()) == 3
    rows = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-3 for r in rows)


def test_two_processes_share_the_ve_evaluation_and_rank_0_writes_what_one_process_writes(cls_data, tmp_path):
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.eval.stages import evaluate_classifier_stage
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    root = cls_data
    torch.manual_seed(1)
    model = build_model("ve", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    tokenizer = ALBEFTokenizer.from_pretrained(root / "processed" / "tokenizer")
    model_dir = export_model(model, tmp_path / "ve", tokenizer, None, {"stage": "test"})
    params = _params(root, evaluate_ve={"batch_size": 1})  # batches of one: equal work on any rank
    with_one_thread(
        lambda: evaluate_classifier_stage(params, "ve", model_dir, tmp_path / "one", progress=False)
    )
    log = call_under_torchrun(
        "albef.eval.stages:evaluate_classifier_stage",
        {
            "params": params,
            "task": "ve",
            "model_dir": model_dir,
            "out_dir": tmp_path / "two",
            "progress": False,
        },
        tmp_path,
    )
    assert_halves_logged(log, "records", 3)
    files = ("predictions.json", "metrics.json")
    assert same_json_outputs(tmp_path / "one", tmp_path / "two", files)["metrics.json"]["records"] == 3


def test_missing_nlvr_image_is_an_error_naming_the_record_or_a_counted_skip(cls_data, tmp_path):
    from albef.data.classify import MissingImageError
    from albef.eval.stages import evaluate_classifier_stage

    root = cls_data
    data = root / "processed"
    records = json.loads((data / "nlvr_test.json").read_text())
    records.insert(1, {**records[0], "images": [records[0]["images"][0], "images/nowhere/gone.jpg"]})
    (data / "nlvr_broken.json").write_text(json.dumps(records))
    torch.manual_seed(0)
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    model = build_model("nlvr", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    export_model(model, tmp_path / "nlvr", ALBEFTokenizer.from_pretrained(data / "tokenizer"), None, {})

    params = _params(root, evaluate_nlvr={"test_file": "nlvr_broken.json"})
    with pytest.raises(MissingImageError, match=r"nlvr_broken.json: record 1 .*images/nowhere/gone.jpg"):
        evaluate_classifier_stage(params, "nlvr", tmp_path / "nlvr", tmp_path / "e1", progress=False)
    params["evaluate_nlvr"]["missing_images"] = "skip"
    result = evaluate_classifier_stage(params, "nlvr", tmp_path / "nlvr", tmp_path / "e2", progress=False)
    assert result["skipped_missing_images"] == 1 and result["records"] == len(records) - 1
    assert json.loads((tmp_path / "e2" / "skipped.json").read_text())["records"] == [
        {"index": 1, "image": "images/nowhere/gone.jpg"}
    ]
    assert [r["index"] for r in json.loads((tmp_path / "e2" / "predictions.json").read_text())] == [0, 2]


def test_unknown_task_and_keys_are_named(cls_data):
    from albef.config import ConfigError
    from albef.eval.stages import evaluate_classifier_stage
    from albef.train.classify import finetune_classifier_stage

    with pytest.raises(ConfigError, match="unknown classification task 'vqa'"):
        finetune_classifier_stage({}, "vqa")
    with pytest.raises(ConfigError, match="unknown key"):
        finetune_classifier_stage(_params(cls_data, finetune_ve={"epochz": 1}), "ve")
    with pytest.raises(ConfigError, match="no validation"):
        finetune_classifier_stage(_params(cls_data, pretrain_nlvr={"val_file": "x.json"}), "nlvr_ta")
    with pytest.raises(ConfigError, match="unknown key"):
        evaluate_classifier_stage(_params(cls_data, evaluate_ve={"k_test": 3}), "ve", "m", "o")
