"""Every stage computes on the device its settings name, through the one rule of :mod:`albef.device`.

The rule's own cases run against a faked CUDA (``torch.cuda.is_available`` / ``device_count`` /
``is_bf16_supported`` monkeypatched). The stages run with the rule patched to answer ``meta``, a device that
exists on every machine and that no tensor reaches unless code moves it there: every forward of a module with
weights must then see its weights and its tensor inputs on ``meta``. A stage that leaves its model or its
batches on the CPU (``albef unimodal`` did) fails. Meta tensors hold no values, so each stage stops at its first
read of a result; only the forwards before that are checked, and each test asks that some ran.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from torch import nn

import albef.device
import albef.distributed
import albef.eval.grounding
import albef.serving.predict
import albef.train.classify
import albef.train.stages
import albef.train.unimodal
import albef.train.vqa
from albef.config import ConfigError
from albef.device import resolve_device, resolve_precision

SENTINEL = torch.device("meta")

# ----------------------------------------------------------------------------- the rule


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with two CUDA devices without native bf16, as far as the rule can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)


def test_settings_on_a_machine_without_cuda(no_cuda):
    for setting in ("auto", "cpu", " CPU "):
        assert resolve_device(setting, "x.device") == torch.device("cpu")
    assert resolve_device("auto", "x.device", local_rank=3, world_size=4) == torch.device("cpu")
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            resolve_device(setting, "pretrain.device")
        assert str(info.value) == (
            f"pretrain.device: {setting!r} was asked for but this machine has no CUDA device "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )


@pytest.mark.parametrize("setting", ["gpu", "cuda:", "cuda:-1", "cuda:x", "meta", "", 0, None])
def test_unknown_settings_name_the_key(setting):
    with pytest.raises(ConfigError, match=r"^evaluate\.device: expected auto, cpu, cuda or cuda:N, got"):
        resolve_device(setting, "evaluate.device")


def test_settings_on_a_machine_with_two_gpus(two_gpus):
    assert resolve_device("auto", "d") == torch.device("cuda", 0)
    assert resolve_device("auto", "d", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda", "d", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", "d") == torch.device("cuda", 1)
    assert resolve_device("cpu", "d", local_rank=1, world_size=2) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"d: 'cuda:2' was asked for but this machine has 2 CUDA device"):
        resolve_device("cuda:2", "d")
    with pytest.raises(ConfigError, match=r"d: 'cuda:0' names one GPU, but this run has 2 processes"):
        resolve_device("cuda:0", "d", local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"d: 'auto' is this process's GPU cuda:2 \(LOCAL_RANK\)"):
        resolve_device("auto", "d", local_rank=2, world_size=3)


def test_precision_follows_the_device(two_gpus, monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", gpu) is None
    with pytest.raises(ConfigError, match=r"^pretrain\.precision: 'bf16' needs a GPU; this run is on cpu"):
        resolve_precision("bf16", cpu, "pretrain.precision")
    with pytest.raises(ConfigError, match=r"^evaluate\.precision: expected one of auto, fp32, bf16, fp16"):
        resolve_precision("half", gpu, "evaluate.precision")
    # no native bf16: auto falls back to fp16 (with a scaler in training); asking for bf16 is an error
    assert resolve_precision("auto", gpu) == torch.float16 == resolve_precision("fp16", gpu)
    with pytest.raises(
        ConfigError, match=r"^pretrain\.precision: 'bf16' was asked for but the GPU cuda:0 has no"
    ):
        resolve_precision("bf16", gpu, "pretrain.precision")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with pytest.raises(ConfigError, match="no native bf16"):  # emulated bf16 does not count
        resolve_precision("bf16", gpu, "pretrain.precision")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", gpu) == torch.bfloat16 == resolve_precision("bf16", gpu)


def test_init_distributed_applies_the_rule_before_joining_anything(no_cuda, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert albef.distributed.init_distributed("cpu", "x.device")[1] == torch.device("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a process group would wait for a second rank: it must not start
    with pytest.raises(ConfigError, match=r"^finetune_ve\.device: 'cuda' was asked for"):
        albef.distributed.init_distributed("cuda", "finetune_ve.device")
    assert not torch.distributed.is_initialized()


def test_sections_check_the_spelling_where_they_are_read():
    from albef.eval.settings import (
        classifier_eval_settings,
        grounding_eval_settings,
        retrieval_eval_settings,
        vqa_eval_settings,
    )
    from albef.train.stages import split_train_section
    from albef.train.unimodal import UnimodalConfig

    with pytest.raises(
        ConfigError, match=r"^finetune_vqa\.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"
    ):
        split_train_section({"device": "gpu"}, "finetune_vqa")
    with pytest.raises(ConfigError, match=r"^unimodal\.device"):
        UnimodalConfig(device="gpu")
    with pytest.raises(ConfigError, match=r"^evaluate\.device"):
        retrieval_eval_settings({"evaluate": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"^evaluate\.precision"):
        retrieval_eval_settings({"evaluate": {"precision": "half"}})
    with pytest.raises(ConfigError, match=r"^evaluate_grounding\.device"):
        grounding_eval_settings({"evaluate_grounding": {"device": "gpu"}})
    with pytest.raises(ConfigError, match=r"^evaluate_nlvr\.device"):
        classifier_eval_settings({"evaluate_nlvr": {"device": "gpu"}}, "nlvr")
    with pytest.raises(ConfigError, match=r"^evaluate_vqa\.precision"):
        vqa_eval_settings({"evaluate_vqa": {"precision": "half"}})
    # where a run computes does not change what it computes: a checkpoint resumes on another device
    _, train = split_train_section({"device": "cuda:0"}, "pretrain")
    assert train.device == "cuda:0" and "device" not in train.fingerprint_fields()


def test_params_yaml_gives_every_computing_section_a_device():
    from albef.config import read_params

    params = read_params(Path(__file__).resolve().parents[1] / "params.yaml")
    computing = [
        "unimodal", "pretrain", "finetune_retrieval", "finetune_grounding", "finetune_vqa", "finetune_ve",
        "pretrain_nlvr", "finetune_nlvr", "evaluate", "evaluate_vqa", "evaluate_ve", "evaluate_nlvr",
        "evaluate_grounding",
    ]  # fmt: skip
    assert {name: params[name].get("device") for name in computing} == dict.fromkeys(computing, "auto")


def test_a_missing_gpu_stops_a_stage_before_any_work(tiny_data, tmp_path, no_cuda):
    from albef.train.stages import pretrain_stage

    params = _train_params(tiny_data / "data" / "processed", tmp_path, "pretrain", device="cuda")
    with pytest.raises(
        ConfigError, match=r"^pretrain\.device: 'cuda' was asked for but this machine has no CUDA"
    ):
        pretrain_stage(params, progress=False)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- stages on the rule's device


@dataclass
class DeviceSpy:
    """The rule's calls (setting, key) and, per forward of a module with weights, the devices it saw."""

    rule_calls: list[tuple[object, str]] = field(default_factory=list)
    forwards: list[tuple[str, set[str]]] = field(default_factory=list)

    def check(self, setting: str, key: str) -> None:
        """The run asked the rule once, for ``key`` set to ``setting`` (a second call, such as a predictor's own
        ``auto``, would mean the setting was dropped on the way), and computed only on the rule's answer."""
        assert self.rule_calls == [(setting, key)], f"expected one call for {key}: {self.rule_calls}"
        assert self.forwards, "no forward ran on the rule's device"
        elsewhere = [(name, devices) for name, devices in self.forwards if devices - {"meta"}]
        assert not elsewhere, (
            f"{len(elsewhere)} of {len(self.forwards)} forwards off the device: {elsewhere[:3]}"
        )
        self.rule_calls.clear()
        self.forwards.clear()


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))
        elif isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, torch.Tensor))


class _MetaTolerantGenerator(torch.Generator):
    """The Trainer keeps a generator on its device; torch has none for meta, so that one stays on the CPU."""

    def __new__(cls, device=None):
        if device is not None and torch.device(device).type == "meta":
            device = "cpu"
        return super().__new__(cls) if device is None else super().__new__(cls, device)


@pytest.fixture
def spy(monkeypatch) -> DeviceSpy:
    """The rule answers ``meta`` wherever albef imported it (after checking the setting as the real rule does),
    and every module call records its devices."""
    recorded = DeviceSpy()

    def rule(setting="auto", key="device", **_):
        albef.device.check_device(setting, key)
        recorded.rule_calls.append((setting, key))
        return SENTINEL

    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", None) or ""
        if name.startswith("albef") and getattr(module, "resolve_device", None) is resolve_device:
            monkeypatch.setattr(module, "resolve_device", rule)
    monkeypatch.setattr(torch, "Generator", _MetaTolerantGenerator)

    call = nn.Module.__call__

    def recording_call(module, *args, **kwargs):
        if next(module.parameters(), None) is not None:  # not the CPU-side image transforms
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            seen = {t.device.type for t in [*own, *_tensors(args), *_tensors(kwargs.values())]}
            if seen:
                recorded.forwards.append((type(module).__name__, seen))
        return call(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__call__", recording_call)
    return recorded


def _until_values_are_read(run) -> None:
    """Run a stage on meta tensors: it stops where it first reads a value (anything but a ConfigError); what
    stopped it is logged, to tell a stage that stopped before any forward why."""
    try:
        run()
    except ConfigError:
        raise
    except Exception as exc:  # reading a meta tensor's values fails in many ways
        import logging

        logging.getLogger(__name__).info("stopped on meta tensors: %r", exc, exc_info=True)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    """Tiny synthetic VQA, SNLI-VE and RefCOCO+ splits, preprocessed, and random tiny retrieval, VQA and VE
    models exported with the data's tokenizer."""
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.data.stages import preprocess_stage, synth_stage
    from albef.tokenizer import ALBEFTokenizer
    from albef.train.stages import export_model

    root = tmp_path_factory.mktemp("device_data")
    empty = ("pretrain", "retrieval_train", "retrieval_val", "retrieval_test", "shifted_test")
    synth = {
        **{f"{name}_images": 0 for name in empty},
        "out": str(root / "synth"),
        "seed": 3,
        "image_size": 48,
        "vqa_train_images": 4,
        "vqa_test_images": 2,
        "ve_images": 8,
        "nlvr_pairs": 0,
        "grounding_images": 14,
        "workers": 1,
    }
    files = {
        "vqa_train.json": "vqa",
        "vqa_test.json": "vqa",
        "ve_train.json": "ve",
        "ve_test.json": "ve",
        "refcoco+_val.json": "grounding_eval",
        "refcoco+_test.json": "grounding_eval",
    }
    params = {
        "synth": synth,
        "preprocess": {
            "image_root": str(root / "synth"),
            "out_dir": str(root / "processed"),
            "files": files,
            "answer_list": "answer_list.json",
            "grounding_assets": "refcoco+",
            "copy": ["answer_list.json", "vqa_test_answers.json", "refcoco+"],
            "max_side": 48,
            "shard_size": 64,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 1000, "train_files": list(files)},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    tokenizer = ALBEFTokenizer.from_pretrained(root / "processed" / "tokenizer")
    for task in ("retrieval", "vqa", "ve"):
        torch.manual_seed(0)
        model = build_model(task, ModelConfig.from_dict(TINY_MODEL, prefix="model"))
        export_model(model, root / "models" / task, tokenizer, None, {"stage": "test"})
    (root / "models" / "vqa" / "answer_list.json").write_bytes(
        (root / "processed" / "answer_list.json").read_bytes()
    )
    return root


def _train_params(data_dir: Path, tmp_path: Path, name: str, **values) -> dict:
    """Training section ``name`` on ``data_dir``: one step of 4, no validation, writing under ``tmp_path``."""
    section = {
        "data_dir": str(data_dir),
        "val_file": None,
        "out": str(tmp_path / "models" / name),
        "run_dir": str(tmp_path / "runs" / name),
        "batch_size": 4,
        "max_steps": 1,
        "num_workers": 0,
        "hflip": False,
        "max_tokens": 16,
        **values,
    }
    return {"model": copy.deepcopy(TINY_MODEL), name: section}


def test_unimodal_computes_on_its_device(tiny_data, tmp_path, spy, monkeypatch):
    from albef.train import unimodal

    train_image_encoder = unimodal.train_image_encoder

    def image_encoder_then_on(*args, **kwargs):
        # the image encoder stops at its first loss read; the stage goes on to the text encoder all the same
        _until_values_are_read(lambda: train_image_encoder(*args, **kwargs))
        return nn.Identity(), {}

    monkeypatch.setattr(unimodal, "train_image_encoder", image_encoder_then_on)
    data = tiny_data / "data"
    section = {
        "data_dir": str(data / "processed"),
        "scenes": str(data / "synth" / "scenes.json"),
        "out": str(tmp_path / "unimodal"),
        "metrics": "",
        "vision_steps": 2,
        "text_steps": 2,
        "batch_size": 4,
        "device": "cpu",
    }
    _until_values_are_read(lambda: unimodal.unimodal_stage({"model": TINY_MODEL, "unimodal": section}, False))
    assert {"ImageEncoder", "Linear", "BertForMaskedLM"} <= {name for name, _ in spy.forwards}
    spy.check("cpu", "unimodal.device")
    assert not (tmp_path / "unimodal").exists()


@pytest.mark.parametrize("name", ["pretrain", "finetune_retrieval"])
def test_pretraining_and_retrieval_finetuning_compute_on_their_device(tiny_data, tmp_path, spy, name):
    from albef.train.stages import finetune_stage, pretrain_stage

    train_file = "pretrain.json" if name == "pretrain" else "retrieval_train.json"
    params = _train_params(
        tiny_data / "data" / "processed", tmp_path, name, device="cuda:0", train_file=train_file
    )
    run = (
        pretrain_stage if name == "pretrain" else lambda p, progress: finetune_stage(p, "retrieval", progress)
    )
    _until_values_are_read(lambda: run(params, progress=False))
    spy.check("cuda:0", f"{name}.device")


def test_ve_and_vqa_finetuning_compute_on_their_device(task_data, tmp_path, spy):
    from albef.train.classify import finetune_classifier_stage
    from albef.train.vqa import finetune_vqa_stage

    for name, run in (
        ("finetune_ve", lambda p: finetune_classifier_stage(p, "ve", progress=False)),
        ("finetune_vqa", lambda p: finetune_vqa_stage(p, progress=False)),
    ):
        params = _train_params(task_data / "processed", tmp_path, name, device="cuda")
        _until_values_are_read(lambda: run(params))  # noqa: B023 (called at once)
        spy.check("cuda", f"{name}.device")


def test_retrieval_evaluation_computes_on_its_device(tiny_data, task_data, tmp_path, spy):
    from albef.eval.stages import evaluate_retrieval_stage

    params = {
        "evaluate": {"data_dir": str(tiny_data / "data" / "processed"), "num_workers": 0, "device": "cpu"}
    }
    _until_values_are_read(
        lambda: evaluate_retrieval_stage(params, task_data / "models" / "retrieval", tmp_path, progress=False)
    )
    spy.check("cpu", "evaluate.device")


def test_vqa_and_ve_evaluations_compute_on_their_device(task_data, tmp_path, spy):
    from albef.eval.stages import evaluate_classifier_stage, evaluate_vqa_stage

    data, models = str(task_data / "processed"), task_data / "models"
    params = {"evaluate_vqa": {"data_dir": data, "k_test": 2, "device": "cpu"}}
    _until_values_are_read(lambda: evaluate_vqa_stage(params, models / "vqa", tmp_path, progress=False))
    spy.check("cpu", "evaluate_vqa.device")
    params = {"evaluate_ve": {"data_dir": data, "device": "cpu"}}
    _until_values_are_read(
        lambda: evaluate_classifier_stage(params, "ve", models / "ve", tmp_path, progress=False)
    )
    spy.check("cpu", "evaluate_ve.device")


def test_grounding_gradcam_computes_on_its_device(task_data, tmp_path, spy):
    from albef.eval.grounding import explain
    from albef.eval.stages import evaluate_grounding_stage

    model_dir = task_data / "models" / "retrieval"
    params = {
        "evaluate_grounding": {"data_dir": str(task_data / "processed"), "num_workers": 0, "device": "cpu"}
    }
    _until_values_are_read(lambda: evaluate_grounding_stage(params, model_dir, tmp_path, progress=False))
    spy.check("cpu", "evaluate_grounding.device")
    image = next((task_data / "synth" / "images").rglob("*.*"))
    _until_values_are_read(
        lambda: explain(image, "a red circle", model_dir, tmp_path / "x.png", device="cpu")
    )
    spy.check("cpu", "--device")


def test_predict_and_the_pyfuncs_compute_on_the_rules_device(task_data, capsys, spy):
    from PIL import Image

    from albef.cli import main
    from albef.serving.pyfunc import MODEL_ARTIFACT, RetrievalModel
    from albef.serving.tasks import VEModel

    models = task_data / "models"
    image = str(next((task_data / "synth" / "images").rglob("*.*")))
    # albef predict: --device reaches the rule, the model and the inputs follow (the CLI then fails to print
    # the meta result, which is no concern here)
    _until_values_are_read(
        lambda: main(["predict", "ve", "--model", str(models / "ve"), "--image", image, "--hypothesis", "A circle.",
                      "--device", "cpu"])
    )  # fmt: skip
    spy.check("cpu", "--device")
    # the pyfuncs have no setting: the rule's auto
    for pyfunc, task, call in (
        (RetrievalModel(), "retrieval", lambda m, img: m.score([img], ["a red circle"])),
        (VEModel(), "ve", lambda m, img: m.predictor([(img,)], ["A circle."])),
    ):
        context = types.SimpleNamespace(model_config={}, artifacts={MODEL_ARTIFACT: str(models / task)})
        pyfunc.load_context(context)
        _until_values_are_read(lambda: call(pyfunc, Image.open(image).convert("RGB")))  # noqa: B023
        spy.check("auto", "device")


def test_predict_names_a_bad_device_option(task_data, capsys):
    from albef.cli import main

    code = main(["predict", "vqa", "--model", str(task_data / "models" / "vqa"), "--image", "x.png",
                 "--question", "What?", "--device", "gpu"])  # fmt: skip
    assert code == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
