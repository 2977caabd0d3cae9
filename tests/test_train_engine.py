"""The training loop on a tiny model and data: logging, checkpoints, exact resume, faults."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_params
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from albef.config import ConfigError
from albef.train.checkpointing import list_checkpoints
from albef.train.engine import CheckpointWriteError, TrainConfig, Trainer, TrainingDiverged
from albef.train.stages import finetune_stage, pretrain_stage, split_train_section
from albef.world import WorldInfo


def _copy_data(tiny_data: Path, root: Path) -> Path:
    shutil.copytree(tiny_data / "data", root / "data")
    return root


def test_pretrain_then_finetune_logs_checkpoints_and_exports(tiny_data, tmp_path):
    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root)
    metrics = pretrain_stage(params, progress=False)
    steps_per_epoch = 48 // 4  # 24 images x 2 captions, batch 4
    assert metrics["steps"] == 2 * steps_per_epoch and metrics["epochs"] == 2
    for term in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert term in metrics
    assert "r_mean" in metrics["val"]
    history = (root / "plots" / "pretrain" / "train.csv").read_text().splitlines()
    assert len(history) == 1 + 2 * steps_per_epoch  # one row per step (log_every 1)
    assert (root / "plots" / "pretrain" / "curves.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(root / "runs" / "pretrain" / "checkpoints")] == [
        "step-000000012.pt",
        "step-000000024.pt",
    ]
    exported = root / "models" / "pretrain"
    assert {"model.safetensors", "config.json", "training.json"} <= {p.name for p in exported.iterdir()}
    assert (exported / "tokenizer").is_dir()

    ft = finetune_stage(params, "retrieval", progress=False)
    assert ft["steps"] == 2 * (40 // 4)
    best = max(float(r) for r in _column(root, "finetune_retrieval", "r_mean"))
    assert ft["selected"]["r_mean"] == pytest.approx(best, abs=1e-3)
    summary = json.loads((root / "models" / "retrieval" / "training.json").read_text())
    assert summary["task"] == "retrieval" and summary["selected"]["step"] in (10, 20)


def _column(root: Path, stage: str, name: str) -> list[str]:
    lines = (root / "plots" / stage / "validation.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [line.split(",")[header.index(name)] for line in lines[1:]]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_resume_mid_epoch_reaches_the_same_weights(tiny_data, tmp_path):
    straight = _copy_data(tiny_data, tmp_path / "a")
    pretrain_stage(tiny_train_params(straight, **{"pretrain.val_file": None}), progress=False)

    resumed = _copy_data(tiny_data, tmp_path / "b")
    params = tiny_train_params(
        resumed, **{"pretrain.val_file": None, "pretrain.max_steps": 7, "pretrain.checkpoint_every": 3}
    )
    stopped = pretrain_stage(params, progress=False)
    assert stopped["steps"] == 7 and stopped["epochs"] == round(7 / 12, 3)  # stopped inside the first epoch
    params["pretrain"]["max_steps"] = 0
    metrics = pretrain_stage(params, progress=False)
    assert metrics["steps"] == 24
    a, b = _weights(straight / "models" / "pretrain"), _weights(resumed / "models" / "pretrain")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = (resumed / "runs" / "pretrain" / "history.csv").read_text().splitlines()
    assert [int(float(line.split(",")[0])) for line in history[1:]] == list(range(1, 25))


def test_changed_settings_do_not_resume_another_runs_checkpoints(tiny_data, tmp_path):
    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root, **{"pretrain.val_file": None, "pretrain.epochs": 1})
    pretrain_stage(params, progress=False)
    params["pretrain"]["lr"] = 5e-4
    metrics = pretrain_stage(params, progress=False)
    assert metrics["steps"] == 12
    assert list_checkpoints(root / "runs" / "pretrain" / "checkpoints.previous")


def test_changed_code_does_not_resume_the_old_runs_checkpoints(tiny_data, tmp_path, monkeypatch):
    """DVC re-runs a training stage when albef's code changes; the stage must train afresh, not resume the old
    run's final checkpoint and export the old weights."""
    import albef.train.engine as engine

    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root, **{"pretrain.val_file": None, "pretrain.epochs": 1})
    pretrain_stage(params, progress=False)
    assert pretrain_stage(params, progress=False)["steps"] == 12  # same code: resumes the finished run
    assert not (root / "runs" / "pretrain" / "checkpoints.previous").exists()
    monkeypatch.setattr(engine, "code_digest", lambda: "edited-code")
    pretrain_stage(params, progress=False)
    assert list_checkpoints(root / "runs" / "pretrain" / "checkpoints.previous")


def test_non_finite_loss_stops_with_the_step_and_terms_and_keeps_the_last_checkpoint(
    tiny_data, tmp_path, monkeypatch
):
    import albef.train.stages as stages

    real = stages.pretrain_forward
    calls = {"n": 0}

    def poisoned(model, batch, alpha, choices):
        out = real(model, batch, alpha, choices)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setitem(stages._TASKS, "pretrain", ("PretrainDataset", "pretrain", poisoned, False))
    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root, **{"pretrain.val_file": None, "pretrain.checkpoint_every": 2})
    with pytest.raises(TrainingDiverged, match=r"step 5 .*loss_itc=.*step-000000004\.pt"):
        pretrain_stage(params, progress=False)
    names = [p.name for p in list_checkpoints(root / "runs" / "pretrain" / "checkpoints")]
    assert names[-1] == "step-000000004.pt"
    assert not (root / "models" / "pretrain").exists()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    import albef.train.checkpointing as checkpointing

    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, fh, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root, **{"pretrain.val_file": None, "pretrain.checkpoint_every": 2})
    with pytest.raises(CheckpointWriteError, match=r"step 4 .*No space left.*step-000000002\.pt"):
        pretrain_stage(params, progress=False)
    ckpt_dir = root / "runs" / "pretrain" / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step-000000002.pt"]
    assert not [p for p in ckpt_dir.iterdir() if p.suffix == ".tmp"]
    monkeypatch.setattr(checkpointing.torch, "save", real_save)
    assert pretrain_stage(params, progress=False)["steps"] == 24  # resumes from step 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"pretrain.epoch": 2}, r"pretrain: unknown key\(s\) \['epoch'\]"),
        ({"pretrain.batch_size": 64, "model.queue_size": 128}, r"fewer than one global batch"),
        ({"pretrain.batch_size": 5}, r"queue_size .*16.* divisible .*5"),
        ({"pretrain.precision": "bf16"}, r"needs a GPU"),
        ({"pretrain.crop_scale": [0.9, 0.1]}, r"crop_scale"),
        ({"pretrain.lr": -1.0}, r"pretrain.lr must be > 0, got -1.0"),
    ],
)
def test_bad_settings_fail_before_training_with_the_key_named(tiny_data, tmp_path, override, message):
    root = _copy_data(tiny_data, tmp_path)
    with pytest.raises((ConfigError, ValueError), match=message):
        pretrain_stage(tiny_train_params(root, **override), progress=False)


def test_missing_or_mismatched_initial_weights(tiny_data, tmp_path):
    from albef.checkpoint import CheckpointError, build_model, save_pretrained
    from albef.config import tiny_config

    root = _copy_data(tiny_data, tmp_path)
    params = tiny_train_params(root, **{"finetune_retrieval.init": str(tmp_path / "nope")})
    with pytest.raises(CheckpointError, match="initial weights not found"):
        finetune_stage(params, "retrieval", progress=False)
    other = tiny_config()  # vocabulary of 100: does not fit the tokenizer's 1000 ids
    save_pretrained(build_model("pretrain", other), tmp_path / "other")
    params = tiny_train_params(root, **{"finetune_retrieval.init": str(tmp_path / "other")})
    with pytest.raises(ValueError, match="tokenizer and model config disagree"):
        finetune_stage(params, "retrieval", progress=False)


def test_split_train_section_names_unknown_keys():
    with pytest.raises(ConfigError, match=r"x: unknown key\(s\) \['bogus'\]"):
        split_train_section({"bogus": 1}, "x")
    stage, train = split_train_section({"epochs": 3, "out": "m", "crop_scale": [0.3, 1]}, "x")
    assert train.epochs == 3 and stage.out == "m" and stage.crop_scale == (0.3, 1.0)


def test_gradient_checkpointing_trains_the_same_weights(tiny_data, tmp_path):
    results = []
    for flag in (False, True):
        root = _copy_data(tiny_data, tmp_path / str(flag))
        params = tiny_train_params(
            root, **{"pretrain.val_file": None, "pretrain.max_steps": 3, "pretrain.grad_checkpointing": flag}
        )
        pretrain_stage(params, progress=False)
        results.append(_weights(root / "models" / "pretrain"))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=0, atol=1e-6, msg=key)


# ------------------------------------------------------------ the loader: workers that outlive an epoch


class _Loaded(Dataset):
    """16 noisy samples (the noise comes from the seeded global generator) that name the process that
    loaded them."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return torch.rand(4) + index, os.getpid()


def _collate(samples: list) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([s[0] for s in samples]), "pid": torch.tensor([s[1] for s in samples])}


@dataclass
class _Out:
    loss: torch.Tensor

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach()}


def _linear_trainer(
    run_dir: Path, pids: list[int] | None = None, fail_at: int = 0, validate=None, **settings
) -> Trainer:
    """A Trainer over a linear model: 4 batches an epoch, 3 epochs; records the loading processes in ``pids``
    and raises at forward call ``fail_at``."""
    calls = []

    def forward(model, batch, alpha, choices):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("forward failed")
        if pids is not None:
            pids.extend(batch["pid"].tolist())
        return _Out(((model(batch["x"]) - 1.0) ** 2).mean())

    torch.manual_seed(0)
    cfg = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "warmup_stair": 1, "log_every": 1, "precision": "fp32"}
    return Trainer(
        nn.Linear(4, 1),
        _Loaded(),
        _collate,
        forward,
        TrainConfig(**{**cfg, **settings}),
        run_dir,
        WorldInfo(),
        torch.device("cpu"),
        "linear",
        validate=validate,
        progress=False,
    )


def test_loader_workers_persist_across_epochs_and_stop_with_the_run(tmp_path):
    pids: list[int] = []
    _linear_trainer(tmp_path / "ok", pids, num_workers=2).fit()
    per_epoch = [set(pids[e * 16 : (e + 1) * 16]) for e in range(3)]
    assert len(per_epoch[0]) == 2 and os.getpid() not in per_epoch[0]
    assert per_epoch[0] == per_epoch[1] == per_epoch[2]  # the same two workers served every epoch

    # A failed run stops its workers at once, although its traceback (kept here) still holds the loader.
    pids.clear()
    with pytest.raises(RuntimeError, match="forward failed") as failed:
        _linear_trainer(tmp_path / "failed", pids, fail_at=6, num_workers=2).fit()
    assert len(set(pids)) == 2 and failed.traceback
    for pid in set(pids):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_resume_mid_epoch_with_persistent_workers_trains_the_same_weights(tmp_path):
    straight = _linear_trainer(tmp_path / "straight", num_workers=0)
    straight.fit()
    stopped = _linear_trainer(tmp_path / "resumed", num_workers=2, max_steps=6)  # epoch 1, batch 2 of 4
    assert stopped.fit().step == 6
    resumed = _linear_trainer(tmp_path / "resumed", num_workers=2, prefetch_factor=3)
    result = resumed.fit()
    assert result.step == 12 and result.resumed_from.endswith("step-000000006.pt")
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_logged_samples_per_second_leave_out_validation_and_checkpoints(tmp_path):
    """The throughput in history.csv is the training rate: an epoch-end validation (here 0.5 s) and the
    checkpoint after it are not counted in the window of the step that follows them."""

    def slow_validation(model):
        time.sleep(0.5)
        return {"score": 1.0}

    trainer = _linear_trainer(tmp_path, validate=slow_validation, num_workers=0)
    trainer.fit()
    with open(tmp_path / "history.csv", newline="") as fh:
        rates = [float(row["samples_per_s"]) for row in csv.DictReader(fh)]
    assert len(rates) == 12
    # one step of 4 samples inside a 0.5 s pause would log < 8 samples/s; a linear model's step takes ms
    assert min(rates) > 40, rates


def test_compile_on_a_machine_where_the_compiler_fails_stops_before_training_naming_the_setting(
    tmp_path, monkeypatch
):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("Compiler: cc not found")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.raises(
        ConfigError, match=r"train\.compile: true, but torch\.compile does not work.*cc not found"
    ):
        _linear_trainer(tmp_path, compile=True)
    assert not (tmp_path / "checkpoints").exists()


def test_compile_compiles_every_transformer_block_in_place():
    from albef.config import tiny_config
    from albef.models import ALBEFPretrain
    from albef.train.engine import compile_model

    model = ALBEFPretrain(tiny_config())
    keys = list(model.state_dict())
    # ViT blocks and text/fusion layers of the model and of its momentum twins (2 + 2 each, tiny preset)
    assert compile_model(model) == 8
    assert list(model.state_dict()) == keys  # in place: checkpoints keep their keys


def test_a_gpu_out_of_memory_error_names_the_batch_size_and_the_remedies(tmp_path):
    trainer = _linear_trainer(tmp_path, batch_size=4, grad_accum=1)

    def out_of_memory(model, batch, alpha, choices):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.forward = out_of_memory
    with pytest.raises(
        torch.cuda.OutOfMemoryError, match=r"batch_size 4 .*train\.grad_accum.*grad_checkpointing"
    ):
        trainer.fit()
