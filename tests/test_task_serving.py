"""VQA, SNLI-VE and NLVR2 shipped like retrieval: ``albef predict ve|nlvr`` on tiny exported models (random
weights, the tiny data's tokenizer), their errors, the per-task register stages with the promotion gate on a
fresh sqlite store, and each task's pyfunc loaded from the registry in a fresh process."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, load_in_fresh_python

from albef.config import ConfigError

ANSWERS = ["red", "blue", "green", "yes", "no", "two"]


@pytest.fixture(scope="module")
def task_models(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Exported tiny vqa (with an answer list), ve and nlvr models, as their finetune stages write them."""
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    tokenizer = ALBEFTokenizer.from_pretrained(tiny_data / "data" / "processed" / "tokenizer")
    root = tmp_path_factory.mktemp("task_models")
    out = {}
    for seed, task in enumerate(("vqa", "ve", "nlvr")):
        torch.manual_seed(seed)
        model = build_model(task, ModelConfig.from_dict(TINY_MODEL, prefix="model"))
        out[task] = export_model(model, root / task, tokenizer, None, {"stage": "test"})
    (out["vqa"] / "answer_list.json").write_text(json.dumps(ANSWERS))
    return out


@pytest.fixture(scope="module")
def images(tiny_data) -> list[Path]:
    return sorted((tiny_data / "data" / "synth" / "images").rglob("*.*"))[:3]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from albef.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_ve_and_nlvr_answer_as_the_evaluation_forward(task_models, images, capsys):
    from albef.checkpoint import load_pretrained
    from albef.data.images import open_rgb
    from albef.data.text import pre_caption
    from albef.data.transforms import eval_transform
    from albef.tokenizer import ALBEFTokenizer

    code, out, err = _cli(
        capsys, "predict", "ve", "--model", str(task_models["ve"]), "--image", str(images[0]),
        "--hypothesis", "There is a red circle.",
    )  # fmt: skip
    assert code == 0, err
    ve = json.loads(out)
    assert set(ve["probabilities"]) == {"contradiction", "neutral", "entailment"}
    assert sum(ve["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert ve["label"] == max(ve["probabilities"], key=ve["probabilities"].get)
    assert ve["probability"] == ve["probabilities"][ve["label"]]

    text = "The left image has more circles than the right one."
    code, out, err = _cli(
        capsys, "predict", "nlvr", "--model", str(task_models["nlvr"]), "--left", str(images[0]),
        "--right", str(images[1]), "--text", text,
    )  # fmt: skip
    assert code == 0, err
    nlvr = json.loads(out)
    assert set(nlvr["probabilities"]) == {"True", "False"} and nlvr["label"] in ("True", "False")

    # the same numbers as the evaluation's forward: left images then right images, pre_caption, 40 tokens
    model = load_pretrained(task_models["nlvr"]).eval()
    tok = ALBEFTokenizer.from_pretrained(task_models["nlvr"] / "tokenizer")
    t = eval_transform(model.cfg.vision.image_size)
    pixels = torch.stack([t(open_rgb(images[0])), t(open_rgb(images[1]))])
    ids = tok([pre_caption(text, 30)], max_length=40)
    with torch.no_grad():
        probs = torch.softmax(model.logits(pixels, ids.input_ids, ids.attention_mask), dim=1)[0]
    assert nlvr["probabilities"]["True"] == pytest.approx(float(probs[1]), abs=1e-5)
    # swapping the images changes the answer's numbers: the two images are not interchangeable
    code, out, _ = _cli(
        capsys, "predict", "nlvr", "--model", str(task_models["nlvr"]), "--left", str(images[1]),
        "--right", str(images[0]), "--text", text,
    )  # fmt: skip
    assert code == 0 and json.loads(out)["probabilities"] != nlvr["probabilities"]


def test_predict_errors_name_the_culprit(task_models, images, capsys, tmp_path):
    ve, nlvr = str(task_models["ve"]), str(task_models["nlvr"])
    cases = [
        (["ve", "--model", ve, "--image", str(tmp_path / "no.png"), "--hypothesis", "a dog"], "--image: "),
        (["ve", "--model", ve, "--image", str(images[0]), "--hypothesis", "  "], "hypothesis is empty"),
        (["ve", "--model", ve, "--image", str(images[0]), "--hypothesis", "?!"], "no words left"),
        (
            [
                "nlvr",
                "--model",
                ve,
                "--left",
                str(images[0]),
                "--right",
                str(images[1]),
                "--text",
                "two dogs",
            ],
            "does not hold a 'nlvr' model: its config.json says task 've'",
        ),
        (
            ["nlvr", "--model", nlvr, "--left", str(images[0]), "--right", str(tmp_path), "--text", "x"],
            "--right: ",
        ),
        (
            ["ve", "--model", str(tmp_path), "--image", str(images[0]), "--hypothesis", "a dog"],
            "not an albef model directory",
        ),
    ]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases.append(
        (
            ["ve", "--model", ve, "--image", str(tmp_path / "broken.png"), "--hypothesis", "a dog"],
            "is not a usable image",
        )
    )
    for args, words in cases:
        code, _, err = _cli(capsys, "predict", *args)
        assert code == 2 and words in err, (args, err)


def test_register_config_per_task_and_its_errors():
    from albef.cli import REGISTER_TASKS
    from albef.config import read_params
    from albef.orchestration.pipeline import PlanError, merge_overrides, select_stages
    from albef.tracking.config import REGISTER_SECTIONS, register_config
    from albef.tracking.registry import DESCRIPTIONS

    assert list(REGISTER_SECTIONS) == REGISTER_TASKS and set(DESCRIPTIONS) == set(REGISTER_SECTIONS)
    repo = Path(__file__).resolve().parents[1]
    params = read_params(repo / "params.yaml")
    for task in ("vqa", "ve", "nlvr", "grounding"):
        cfg = register_config(params, task)
        assert (cfg.model_name, cfg.model_dir, cfg.metrics) == (
            f"albef-{task}",
            f"models/{task}",
            f"metrics/{task}.json",
        )
        assert cfg.gate.metric == "accuracy" and cfg.section == f"register_{task}"
        assert register_config({}, task) == cfg  # the sections spell out the defaults
    assert register_config(params).model_name == "albef-retrieval"  # `register:` stays retrieval's
    assert register_config({"register_ve": {"gate": {"min_improvement": 1}}}, "ve").gate.metric == "accuracy"
    with pytest.raises(ConfigError, match=r"register_nlvr\.gate\.direction"):
        register_config({"register_nlvr": {"gate": {"direction": "up"}}}, "nlvr")
    with pytest.raises(ConfigError, match=r"register_vqa\.task: this section registers vqa"):
        register_config({"register_vqa": {"task": "ve"}}, "vqa")
    with pytest.raises(ConfigError, match="no registration for task 'nlvr_ta'"):
        register_config({}, "nlvr_ta")
    # the register flow (flow:register; plain "register" is the DVC stage) runs every register stage;
    # overrides of the new sections are validated
    assert select_stages(repo, ["register"]) == ["register"]
    assert select_stages(repo, ["flow:register"]) == [
        "register",
        "register_vqa",
        "register_ve",
        "register_grounding",
        "register_nlvr",
        "summary",
    ]
    with pytest.raises(PlanError, match=r"register_ve\.model_name"):
        merge_overrides(params, {"register_ve.model_name": "albef/ve"})


def _params(root: Path, task: str, model_dir: Path, accuracy: float) -> dict:
    metrics = root / f"{task}-{accuracy}.json"
    # the keys albef.eval.classify.accuracy_metrics / albef.eval.vqa.score_predictions write
    metrics.write_text(
        json.dumps({"accuracy": accuracy, "records": 10, "per_class": {"a": {"accuracy": 50.0}}})
    )
    return {
        "mlflow": {"experiment": "task-registry-test", "spool_dir": str(root / "spool")},
        f"register_{task}": {
            "model_name": f"albef-{task}-test",
            "model_dir": str(model_dir),
            "metrics": str(metrics),
        },
        "evaluate_vqa": {"k_test": 4},
    }


def test_register_each_task_gate_and_a_fresh_process_answers(
    task_models, images, mlflow_sqlite, tmp_path, capsys
):
    from albef.tracking.register import register_stage

    first = register_stage(
        _params(tmp_path, "ve", task_models["ve"], 60.0), tmp_path / "register_ve.json", task="ve"
    )
    assert first["promoted"] and first["version"] == 1 and first["model_name"] == "albef-ve-test"
    worse = register_stage(_params(tmp_path, "ve", task_models["ve"], 55.0), task="ve")
    assert worse["version"] == 2 and not worse["promoted"] and worse["aliases"] == ["challenger"]
    assert "is worse than champion v1" in worse["reason"]
    for task in ("vqa", "nlvr"):
        assert register_stage(_params(tmp_path, task, task_models[task], 40.0), task=task)["promoted"]

    from albef.tracking.config import register_config
    from albef.tracking.registry import Registry

    params = _params(tmp_path, "ve", task_models["ve"], 1.0)
    registry = Registry(register_config(params, "ve"), mlflow_sqlite)
    v1 = registry.version(1)
    run = registry.client.get_run(v1.run_id)
    assert run.data.tags["albef.stage"] == "register_ve" and v1.tags["metric.accuracy"] == "60"
    assert "visual entailment" in registry.client.get_registered_model("albef-ve-test").description
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    code, out, err = _cli(
        capsys, "registry", "list", "--task", "ve", "--params", str(tmp_path / "params.yaml")
    )
    assert code == 0 and "accuracy=60" in out and "accuracy=55" in out and "rejected" in out, err

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    requests = {
        "vqa": {
            "image": [b64(images[0]), b64(images[1])],
            "question": ["what color is the circle?", "how many?"],
        },
        "ve": {"image": [b64(images[0])], "hypothesis": ["there is a red circle"]},
        "nlvr": {"left_image": [b64(images[0])], "right_image": [b64(images[1])], "text": ["two circles"]},
    }
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    script = (
        "import json, sys, pandas as pd, mlflow\n"
        "out = {}\n"
        "for task, request in json.load(open(sys.argv[1])).items():\n"
        "    model = mlflow.pyfunc.load_model(f'models:/albef-{task}-test@champion')\n"
        "    out[task] = model.predict(pd.DataFrame(request)).to_dict(orient='list')\n"
        "print(json.dumps(out))\n"
    )
    out = load_in_fresh_python(script, tmp_path / "requests.json", mlflow_sqlite, tmp_path, timeout=300)
    vqa = out["vqa"]
    assert len(vqa["answer"]) == 2 and all(a in ANSWERS for row in vqa["answers"] for a in row)
    # evaluate_vqa.k_test (4) candidates re-ranked, as the evaluation did: the top 5 has 4 answers
    assert all(row == sorted(row, reverse=True) and len(row) == 4 for row in vqa["scores"])
    assert vqa["answer"] == [row[0] for row in vqa["answers"]]
    ve = out["ve"]
    probs = [ve[f"prob_{c}"][0] for c in ("contradiction", "neutral", "entailment")]
    assert sum(probs) == pytest.approx(1.0, abs=1e-4) and ve["probability"][0] == max(probs)
    assert ve["label"][0] == ("contradiction", "neutral", "entailment")[probs.index(max(probs))]
    nlvr = out["nlvr"]
    assert nlvr["label"][0] in ("True", "False")
    assert nlvr["prob_True"][0] + nlvr["prob_False"][0] == pytest.approx(1.0, abs=1e-4)


def test_task_pyfunc_bad_input_is_a_clear_error(task_models, images, mlflow_sqlite):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from albef.serving.tasks import log_task_model

    with pytest.raises(ValueError, match="holds a 've' model; the nlvr pyfunc needs a nlvr model"):
        log_task_model("nlvr", task_models["ve"])
    mlflow.set_experiment("task-bad-input")
    with mlflow.start_run():
        info = log_task_model("nlvr", task_models["nlvr"], max_tokens=16)
    model = mlflow.pyfunc.load_model(info.model_uri)
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]
    good = {"left_image": [b64[0]], "right_image": [b64[1]], "text": ["two circles"]}
    assert model.predict(pd.DataFrame(good))["label"][0] in ("True", "False")
    with pytest.raises(MlflowException, match=r"missing inputs.*right_image|missing column"):
        model.predict(pd.DataFrame({"left_image": [b64[0]], "text": ["two circles"]}))
    with pytest.raises(MlflowException, match=r"row 0, column 'right_image': empty"):
        model.predict(pd.DataFrame({**good, "right_image": [""]}))
    with pytest.raises(MlflowException, match=r"row 0, column 'left_image': expected an image file's bytes"):
        model.predict(pd.DataFrame({**good, "left_image": ["not an image!"]}))
    with pytest.raises(MlflowException, match="no words left"):
        model.predict(pd.DataFrame({**good, "text": ["?!"]}))


def test_the_register_stage_loads_no_model_library(task_models, mlflow_sqlite, tmp_path):
    """``albef register --task vqa`` (the stage dvc.yaml runs) in an interpreter where torch, torchvision, timm
    and safetensors cannot be imported: registration reads the exported model's files and config and logs them
    as code and data, so it pays no model-library import (about half of each register stage's time)."""
    import os
    import subprocess
    import sys

    from test_bare_imports import _SITECUSTOMIZE, MODEL_LIBRARIES

    from albef.tracking.config import register_config
    from albef.tracking.registry import Registry

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=MODEL_LIBRARIES))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(repo)])}
    params = _params(tmp_path, "vqa", task_models["vqa"], 50.0)
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "albef",
            "register",
            "--task",
            "vqa",
            "--params",
            "params.yaml",
            "--out",
            "out.json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    outcome = json.loads((tmp_path / "out.json").read_text())
    assert outcome["registered"] and outcome["promoted"] and outcome["version"] == 1, outcome
    version = Registry(register_config(params, "vqa"), mlflow_sqlite).version(1)
    assert version.tags["metric.accuracy"] == "50" and version.tags["albef.manifest_sha256"]
