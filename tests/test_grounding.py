"""Weakly supervised grounding: Grad-CAM on the ITM score, box scoring, the evaluation stage, ``albef explain``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from albef.checkpoint import build_model
from albef.config import ConfigError, ModelConfig
from albef.eval.grounding import (
    best_box,
    box_iou,
    box_scores,
    check_layer,
    default_layer,
    gradcam_itm,
    gradcam_maps,
    grounding_metrics,
    kept_cross_attention,
    score_expression,
    upsample_map,
)
from albef.models.xbert import Mode
from tests.conftest import (
    TINY_MODEL,
    assert_halves_logged,
    call_under_torchrun,
    make_batch,
    same_json_outputs,
    with_one_thread,
)

# ----------------------------------------------------------------------------- Grad-CAM


@pytest.fixture(scope="module")
def tiny_retrieval():
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "tiny", "vision": {"image_size": 64}}, prefix="model")
    return build_model("retrieval", cfg).eval()


def test_default_layer_is_the_official_block_8() -> None:
    from albef.config import base_config

    assert default_layer(base_config()) == 8  # third of six fusion layers, from layer 6
    small = ModelConfig.from_dict({"preset": "small"}, prefix="model")  # two fusion layers: the first
    assert default_layer(small) == small.text.text_layers
    cfg = ModelConfig.from_dict({"preset": "tiny"}, prefix="model")  # one fusion layer: the last
    assert default_layer(cfg) == cfg.text.num_layers - 1
    with pytest.raises(ConfigError, match="not a fusion layer"):
        check_layer(cfg, 0)


def test_gradcam_shape_non_negative_and_masked(tiny_retrieval) -> None:
    model = tiny_retrieval
    images, ids, mask = make_batch(model.cfg, batch=3, length=7)
    cam = gradcam_itm(model, images, ids, mask)
    g = model.cfg.vision.grid_size
    assert cam.tokens.shape == (3, 7, g, g) and cam.expression.shape == (3, g, g)
    assert (cam.tokens >= 0).all() and (cam.expression >= 0).all()
    assert cam.expression.sum() > 0
    assert (cam.tokens[mask == 0] == 0).all()  # padding positions carry no map
    # the expression map is the mean over the padded text positions, as the official code
    torch.testing.assert_close(cam.expression, cam.tokens.mean(1))
    # parameters' gradients are untouched and the hook is switched off again
    assert all(p.grad is None for p in model.parameters())
    block = model.text_backbone.encoder.layer[cam.layer].crossattention
    assert not block.save_attention and block.attention_probs is None


def test_gradcam_equals_the_official_backward(tiny_retrieval) -> None:
    """Independent computation: the official recipe (save_attention, loss.backward(), hook-kept gradient)."""
    model = tiny_retrieval
    images, ids, mask = make_batch(model.cfg, batch=2, length=6, seed=3)
    layer = default_layer(model.cfg)
    cam = gradcam_itm(model, images, ids, mask)
    block = model.text_backbone.encoder.layer[layer].crossattention
    block.save_attention = True
    try:
        embeds = model.visual_encoder(images)
        hidden = model.text_encoder(ids, mask, embeds, mode=Mode.MULTIMODAL)
        model.zero_grad()
        model.itm_head(hidden[:, 0])[:, 1].sum().backward()
        probs, grads = block.attention_probs.detach(), block.attention_grads.detach()
    finally:
        block.save_attention = False
        block.attention_probs = block.attention_grads = None
        model.zero_grad(set_to_none=True)
    b, h, t, _ = probs.shape
    g = model.cfg.vision.grid_size
    m = mask.view(b, 1, t, 1, 1).float()
    expected = probs[..., 1:].reshape(b, h, t, g, g) * m * grads[..., 1:].clamp(0).reshape(b, h, t, g, g) * m
    torch.testing.assert_close(cam.expression, expected.mean(1).mean(1))


def test_saving_attention_leaves_the_forward_unchanged(tiny_retrieval) -> None:
    model = tiny_retrieval
    images, ids, mask = make_batch(model.cfg, batch=2, length=6, seed=5)
    with torch.no_grad():
        embeds = model.visual_encoder(images)
        plain = model.text_encoder(ids, mask, embeds, mode=Mode.MULTIMODAL)
        with kept_cross_attention(model, default_layer(model.cfg)):
            kept = model.text_encoder(ids, mask, embeds, mode=Mode.MULTIMODAL)
    torch.testing.assert_close(plain, kept, atol=1e-5, rtol=1e-5)


def test_gradcam_maps_formula() -> None:
    """Hand-made attention and gradients: CLS column dropped, negative gradients clamped, padding masked."""
    probs = torch.zeros(1, 2, 2, 5)
    grads = torch.zeros(1, 2, 2, 5)
    probs[0, :, 0, 1 + 3] = 0.5  # token 0 looks at patch (1, 1)
    grads[0, :, 0, 1 + 3] = 2.0
    probs[0, :, 0, 0] = 0.5  # the image [CLS] column is dropped
    grads[0, :, 0, 0] = 9.0
    probs[0, :, 0, 1] = 0.5
    grads[0, :, 0, 1] = -4.0  # negative gradient: clamped away
    probs[0, :, 1, 2] = 1.0  # token 1 is padding
    grads[0, :, 1, 2] = 1.0
    tokens, expression = gradcam_maps(probs, grads, torch.tensor([[1, 0]]), grid=2)
    assert tokens[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]
    assert tokens[0, 1].abs().sum() == 0
    assert expression[0].tolist() == [[0.0, 0.0], [0.0, 0.5]]  # mean over both (padded) positions


def test_gradcam_localises_a_constructed_case() -> None:
    """A fusion layer wired by hand so the ITM score reads only what the [CLS] query attends to in one
    patch: the Grad-CAM of that patch is the largest.

    The cross-attention query/key are set so every text position attends to image tokens by their first
    feature; the value carries a feature the ITM head rewards. Image tokens are given directly (the ViT is
    bypassed by a hook), with one bright patch."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"preset": "tiny", "vision": {"image_size": 64}}, prefix="model")
    model = build_model("retrieval", cfg).eval()
    layer = default_layer(cfg)
    block = model.text_backbone.encoder.layer[layer].crossattention
    n = cfg.vision.grid_size**2
    tokens = torch.zeros(1, 1 + n, cfg.vision.width)
    target = 5  # the bright patch
    tokens[0, 1 + target, 0] = 4.0
    with torch.no_grad():
        block.self.query.weight.zero_()
        block.self.query.bias.fill_(1.0)  # constant query: scores depend on the key alone
        block.self.key.weight.zero_()
        block.self.key.bias.zero_()
        block.self.key.weight[:, 0] = 1.0  # key = feature 0 of the image token
        block.self.value.weight.zero_()
        block.self.value.bias.zero_()
        block.self.value.weight[:, 0] = 1.0  # value = feature 0 too: only the bright patch carries signal
    model.visual_encoder.register_forward_hook(lambda m, i, o: tokens.clone())
    images, ids, mask = make_batch(cfg, batch=1, length=5, seed=2)
    cam = gradcam_itm(model, images, ids, mask, layer)
    # make the ITM head reward the direction the bright patch pushes [CLS] to, so its gradient is positive
    if cam.expression.sum() == 0:
        with torch.no_grad():
            model.itm_head.weight[1].neg_()
        cam = gradcam_itm(model, images, ids, mask, layer)
    flat = cam.expression[0].flatten()
    assert int(flat.argmax()) == target
    assert flat[target] > 0


# ----------------------------------------------------------------------------- boxes


def test_box_iou_official_inclusive_pixels() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    # overlap x in [5, 9], y in [0, 9]: 5 x 10 = 50 pixels; union 100 + 100 - 50
    assert math.isclose(box_iou([0, 0, 10, 10], [5, 0, 10, 10]), 50 / 150)
    # touching edges (one shared pixel column) count as no overlap in the official code (strict <)
    assert box_iou([0, 0, 10, 10], [9, 9, 10, 10]) == 0.0


def test_box_scores_sum_over_sqrt_area_and_best_box() -> None:
    heat = torch.zeros(20, 30)
    heat[5:10, 10:20] = 1.0  # a blob of 50 pixels
    boxes = [
        [10, 5, 10, 5, 0.9],  # exactly the blob: 50 / sqrt(50)
        [0, 0, 30, 20, 0.8],  # the whole image: 50 / sqrt(600)
        [0, 0, 5, 5, 0.7],  # empty region
        [40, 40, 5, 5, 0.6],  # outside the image: not scorable
        [25, -3, 10, 10, 0.5],  # partly outside: cut to the image
    ]
    scores = box_scores(heat, boxes)
    assert math.isclose(scores[0], 50 / math.sqrt(50), rel_tol=1e-9)
    assert math.isclose(scores[1], 50 / math.sqrt(600), rel_tol=1e-9)
    assert scores[2] == 0.0 and scores[3] is None and scores[4] == 0.0
    assert best_box(scores) == 0
    assert box_scores(heat, boxes, area_power=1.0)[1] == pytest.approx(50 / 600)
    assert box_scores(heat, boxes, area_power=0.0)[1] == pytest.approx(50)
    assert best_box([None, None]) is None
    assert best_box([1.0, 3.0, 3.0]) == 1  # first of equal maxima


def test_score_expression_localises_an_upsampled_map() -> None:
    heat = torch.zeros(4, 4)
    heat[3, 0] = 1.0  # bottom-left patch of a 4x4 grid over a 40 x 80 (w x h) image
    truth = [0, 60, 10, 20]
    proposals = [[30, 0, 10, 20, 0.9], [0, 58, 11, 22, 0.8], [0, 0, 40, 80, 0.7]]
    r = score_expression(heat, truth, width=40, height=80, proposals=proposals)
    assert r["pred_index"] == 1 and r["correct"] and r["reachable"]
    assert r["chance"] == pytest.approx(1 / 3)
    assert upsample_map(heat, 80, 40).shape == (80, 40)
    miss = score_expression(heat, truth, 40, 80, [[100, 100, 5, 5]])
    assert miss == {"pred_box": None, "iou": 0.0, "correct": False, "reason": "no_proposal"}


def test_grounding_metrics_per_split_and_skips() -> None:
    rows = [
        {"split": "val", "correct": True, "reachable": True, "chance": 0.5},
        {"split": "val", "correct": False, "reachable": True, "chance": 0.5},
        {"split": "testA", "correct": True, "reachable": True, "chance": 0.25},
        {"split": "testB", "correct": False, "reachable": False, "chance": 0.0, "reason": "no_proposal"},
        {"split": "testB", "skipped": "bad_box"},
    ]
    m = grounding_metrics(rows)
    assert (m["val_d"], m["testA_d"], m["testB_d"]) == (50.0, 100.0, 0.0)
    assert m["expressions"] == 4 and m["skipped"] == {"bad_box": 1}
    assert m["splits"]["val"]["random_proposal"] == 50.0 and m["splits"]["testB"]["no_proposal"] == 1
    assert list(m)[:3] == ["val_d", "testA_d", "testB_d"]


# ----------------------------------------------------------------------------- stage and CLI


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory):
    """Tiny synthetic RefCOCO+ data (14 images: val, testA and testB non-empty), preprocessed into shards
    with the grounding assets copied, and a random tiny retrieval model exported with its tokenizer."""
    from albef.data.stages import preprocess_stage, synth_stage
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    root = tmp_path_factory.mktemp("grounding")
    counts = dict.fromkeys(
        (
            "pretrain_images",
            "retrieval_train_images",
            "retrieval_val_images",
            "retrieval_test_images",
            "vqa_train_images",
            "vqa_test_images",
            "ve_images",
            "nlvr_pairs",
            "shifted_test_images",
        ),
        0,
    )
    params = {
        "synth": {
            "out": str(root / "synth"),
            "seed": 3,
            "image_size": 48,
            **counts,
            "grounding_images": 14,
            "workers": 1,
        },
        "preprocess": {
            "image_root": str(root / "synth"),
            "out_dir": str(root / "processed"),
            "files": {
                "refcoco+_train.json": "grounding_train",
                "refcoco+_val.json": "grounding_eval",
                "refcoco+_test.json": "grounding_eval",
            },
            "grounding_assets": "refcoco+",
            "copy": ["refcoco+"],
            "max_side": 48,
            "shard_size": 32,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 1000, "train_files": ["refcoco+_train.json", "refcoco+_val.json"]},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    torch.manual_seed(0)
    model = build_model("retrieval", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    tokenizer = ALBEFTokenizer.from_pretrained(root / "processed" / "tokenizer")
    model_dir = export_model(model, root / "model", tokenizer, None, {"stage": "test"})
    return root, model_dir


def test_evaluate_grounding_stage_on_tiny_data(grounding_data, tmp_path) -> None:
    from albef.eval.stages import evaluate_grounding_stage

    root, model_dir = grounding_data
    params = {
        "evaluate_grounding": {
            "data_dir": str(root / "processed"),
            "num_workers": 0,
            "batch_size": 8,
            "examples": 2,
        }
    }
    metrics = evaluate_grounding_stage(
        params, model_dir, tmp_path / "out", tmp_path / "m.json", progress=False
    )
    assert {"val_d", "testA_d", "testB_d"} <= set(metrics)
    for key in ("val_d", "testA_d", "testB_d"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["expressions"] > 0 and metrics["layer"] == default_layer(ModelConfig.from_dict(TINY_MODEL))
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert len(results) == metrics["expressions"] + sum(metrics["skipped"].values())
    scored = [r for r in results if "skipped" not in r]
    assert all(r["correct"] == (r["iou"] >= 0.5) for r in scored)
    correct = sum(r["correct"] for r in scored)
    assert metrics["accuracy"] == pytest.approx(100 * correct / len(scored), abs=1e-3)
    pngs = sorted((tmp_path / "out" / "examples").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    sheet, parts = Image.open(tmp_path / "out" / "examples.png"), [Image.open(p) for p in pngs]
    assert sheet.height == sum(p.height for p in parts) and sheet.width == max(p.width for p in parts)


def test_two_processes_share_the_grounding_evaluation_and_rank_0_writes_what_one_process_writes(
    grounding_data, tmp_path
) -> None:
    from albef.eval.stages import evaluate_grounding_stage

    root, model_dir = grounding_data
    # batches of one: every expression is computed alike whichever rank and batch it falls in
    params = {"evaluate_grounding": {"data_dir": str(root / "processed"), "batch_size": 1, "examples": 1}}
    one = with_one_thread(
        lambda: evaluate_grounding_stage(params, model_dir, tmp_path / "one", progress=False)
    )
    log = call_under_torchrun(
        "albef.eval.stages:evaluate_grounding_stage",
        {"params": params, "model_dir": model_dir, "out_dir": tmp_path / "two", "progress": False},
        tmp_path,
    )
    n = one["expressions"] + sum(one["skipped"].values())
    assert_halves_logged(log, "expressions", n)
    files = same_json_outputs(tmp_path / "one", tmp_path / "two", ("results.json", "metrics.json"))
    assert [r["index"] for r in files["results.json"]["results"]] == list(range(n))
    assert (tmp_path / "two" / "examples.png").is_file()


def test_bad_box_policy(grounding_data, tmp_path) -> None:
    """A ref whose box lies outside its image is skipped and counted (or, with bad_box: error, fails)."""
    import pickle
    import shutil

    from albef.eval.stages import evaluate_grounding_stage

    root, model_dir = grounding_data
    data = tmp_path / "processed"
    shutil.copytree(root / "processed", data)
    instances = json.loads((data / "refcoco+" / "instances.json").read_text())
    refs = pickle.loads((data / "refcoco+" / "refs(unc).p").read_bytes())
    val_ids = {r["ref_id"] for r in json.loads((data / "refcoco+_val.json").read_text())}
    victim = next(r for r in refs if r["ref_id"] in val_ids)
    ann = next(a for a in instances["annotations"] if a["id"] == victim["ann_id"])
    ann["bbox"] = [1000, 1000, 5, 5]
    (data / "refcoco+" / "instances.json").write_text(json.dumps(instances))
    section = {"data_dir": str(data), "num_workers": 0, "examples": 0, "test_files": ["refcoco+_val.json"]}
    metrics = evaluate_grounding_stage(
        {"evaluate_grounding": section}, model_dir, tmp_path / "o", progress=False
    )
    n_val = sum(
        1 for r in json.loads((data / "refcoco+_val.json").read_text()) if r["ref_id"] == victim["ref_id"]
    )
    assert metrics["skipped"] == {"bad_box": n_val}
    with pytest.raises(ValueError, match="outside"):
        evaluate_grounding_stage(
            {"evaluate_grounding": {**section, "bad_box": "error"}},
            model_dir,
            tmp_path / "o2",
            progress=False,
        )
    with pytest.raises(ConfigError, match="unknown key"):
        evaluate_grounding_stage(
            {"evaluate_grounding": {"nope": 1}}, model_dir, tmp_path / "o3", progress=False
        )


def test_explain_cli_writes_a_png(grounding_data, tmp_path) -> None:
    from albef.cli import main

    root, model_dir = grounding_data
    record = json.loads((root / "processed" / "refcoco+_val.json").read_text())[0]
    image = root / "synth" / record["image"]
    out = tmp_path / "explain.png"
    rc = main(
        [
            "explain",
            "--image",
            str(image),
            "--text",
            record["text"],
            "--model",
            str(model_dir),
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            [
                "explain",
                "--image",
                str(image),
                "--text",
                "x",
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--layer",
                "0",
            ]
        )
        == 2
    )


def test_params_yaml_section_is_valid() -> None:
    from pathlib import Path

    from albef.config import build_dataclass, read_params
    from albef.eval.settings import GroundingEvalConfig

    params = read_params(Path(__file__).resolve().parents[1] / "params.yaml")
    cfg = build_dataclass(GroundingEvalConfig, params["evaluate_grounding"], "evaluate_grounding")
    assert cfg.area_power == 0.5 and cfg.iou_threshold == 0.5 and cfg.layer is None


# ----------------------------------------------------------------------------- the pipeline stages


def _write_params(path, params: dict):
    import yaml

    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_grounding_train_dataset_numbers_images_by_file_name(grounding_data) -> None:
    """The official grounding_dataset(mode='train'): idx = the image file name, so every expression of one
    image is an ITC positive of the others and never a hard negative."""
    from albef.data.datasets import GroundingTrainDataset, image_source
    from albef.data.transforms import eval_transform

    root, _ = grounding_data
    data = root / "processed"
    ds = GroundingTrainDataset(data / "refcoco+_train.json", image_source(data), eval_transform(48))
    names = [r["image"].rsplit("/", 1)[1] for r in ds.records]
    assert len(ds) == len(names) > len(set(names))  # several expressions per image
    idx = [ds[i][2] for i in range(len(ds))]
    assert sorted(set(idx)) == list(range(len(set(names))))
    assert all((names[i] == names[j]) == (idx[i] == idx[j]) for i in range(len(ds)) for j in range(len(ds)))
    image, text, _ = ds[0]
    assert tuple(image.shape) == (3, 48, 48) and text == ds.records[0]["text"].lower().rstrip(".")


def test_finetune_then_evaluate_grounding_through_the_cli(
    grounding_data, tmp_path, mlflow_sqlite, monkeypatch
):
    """albef finetune grounding: the retrieval model and losses from a pretraining export, on the RefCOCO+
    train expressions; albef evaluate grounding: metrics file and report, one MLflow run per stage."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from albef.cli import main
    from albef.model_files import read_config
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    root, _ = grounding_data
    data = str(root / "processed")
    torch.manual_seed(1)
    pre = build_model("pretrain", ModelConfig.from_dict(TINY_MODEL, prefix="model"))
    init = export_model(
        pre, tmp_path / "pretrain", ALBEFTokenizer.from_pretrained(root / "processed" / "tokenizer"), None, {}
    )
    params = {
        "model": TINY_MODEL,
        "finetune_grounding": {
            "data_dir": data,
            "train_file": "refcoco+_train.json",
            "init": str(init),
            "out": str(tmp_path / "models" / "grounding"),
            "run_dir": str(tmp_path / "runs" / "grounding"),
            "metrics": str(tmp_path / "metrics" / "finetune_grounding.json"),
            "plots": str(tmp_path / "plots" / "grounding"),
            "batch_size": 4,
            "epochs": 1,
            "lr": 1e-3,
            "warmup_stair": 2,
            "num_workers": 0,
            "log_every": 1,
            "hflip": False,
            "augment": False,
            "max_tokens": 16,
        },
        "evaluate_grounding": {"data_dir": data, "num_workers": 0, "batch_size": 8, "examples": 1},
        "mlflow": {"experiment": "grounding", "spool_dir": str(tmp_path / "spool")},
    }
    path = _write_params(tmp_path / "params.yaml", params)
    assert main(["finetune", "grounding", "--params", str(path), "--quiet"]) == 0

    out = tmp_path / "models" / "grounding"
    assert read_config(out)[0] == "retrieval"  # grounding exports the retrieval model (Grounding.py)
    summary = json.loads((out / "training.json").read_text())
    assert summary["task"] == "grounding" and summary["stage"] == "finetune_grounding"
    n_train = len(json.loads((root / "processed" / "refcoco+_train.json").read_text()))
    metrics = json.loads((tmp_path / "metrics" / "finetune_grounding.json").read_text())
    assert metrics["steps"] == n_train // 4 and metrics["epochs"] == 1
    steps = metrics["steps"]
    assert math.isfinite(metrics["loss_itc"]) and math.isfinite(metrics["loss_itm"])
    # the retrieval model's text encoder drops the pretraining model's "bert." level (the official remap)
    before = {
        k.replace("text_encoder.bert.", "text_encoder."): v
        for k, v in load_file(init / "model.safetensors").items()
    }
    after = load_file(out / "model.safetensors")
    moved = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert any(k.startswith("text_encoder") for k in moved) and any(k.startswith("visual") for k in moved)

    monkeypatch.setenv("DVC_STAGE", "evaluate_grounding")  # as under dvc repro: names the MLflow run
    report, metrics_file = tmp_path / "reports" / "grounding", tmp_path / "metrics" / "grounding.json"
    argv = [
        "evaluate",
        "grounding",
        "--model",
        str(out),
        "--out",
        str(report),
        "--metrics",
        str(metrics_file),
    ]
    assert main([*argv, "--params", str(path), "--quiet"]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert {"val_d", "testA_d", "testB_d"} <= set(metrics) and metrics["model_task"] == "retrieval"
    assert json.loads((report / "metrics.json").read_text()) == metrics
    assert len(list((report / "examples").glob("*.png"))) == 1

    client = MlflowClient()
    exp = client.get_experiment_by_name("grounding")
    runs = {r.data.tags.get("albef.stage"): r for r in client.search_runs([exp.experiment_id])}
    assert {"finetune_grounding", "evaluate_grounding"} <= set(runs)
    run = runs["evaluate_grounding"]
    assert run.info.status == "FINISHED" and run.data.tags["albef.task"] == "grounding"
    assert run.data.metrics["val_d"] == pytest.approx(metrics["val_d"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {
        "report/results.json",
        "report/examples",
        "report/examples.png",
    }
    assert len(client.list_artifacts(run.info.run_id, "report/examples")) == 1
    assert runs["finetune_grounding"].data.metrics["steps"] == steps

    # --test-file: the section evaluates that one file instead of its test_files
    only_val = tmp_path / "val.json"
    argv = [
        "evaluate",
        "grounding",
        "--model",
        str(out),
        "--out",
        str(tmp_path / "r2"),
        "--metrics",
        str(only_val),
    ]
    assert main([*argv, "--test-file", "refcoco+_val.json", "--params", str(path), "--quiet"]) == 0
    assert "val_d" in json.loads(only_val.read_text()) and "testA_d" not in json.loads(only_val.read_text())
