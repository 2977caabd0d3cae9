"""Truncated, corrupt and pickled-code weight files: one line naming the file and what is wrong, never a
traceback, never a pickled call run; ``resume: auto`` falls back past a damaged newest checkpoint."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL
from torch import nn
from torch.utils.data import Dataset

from albef.checkpoint import CheckpointError, build_model, read_official_state_dict, save_pretrained
from albef.config import ModelConfig, tiny_config
from albef.train.checkpointing import CORRUPT_DIR, list_checkpoints
from albef.train.engine import TrainConfig, Trainer
from albef.world import WorldInfo

REPO = Path(__file__).resolve().parents[1]


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data[: len(data) // 2]


class _RunsCode:
    """Unpickling this calls ``os.system``: it would create the marker file if the pickle ever ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickled_code(path: Path, marker: Path) -> Path:
    """A ``.pth`` written with pickle itself (not torch.save) whose loading would run ``os.system``."""
    path.write_bytes(pickle.dumps({"model": {"pos_embed": _RunsCode(marker)}}))
    return path


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if ": error: " in line]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from albef.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------- albef model folders


def test_a_truncated_model_safetensors_is_one_line_from_the_cli(tmp_path):
    folder = save_pretrained(build_model("retrieval", ModelConfig.from_dict(TINY_MODEL)), tmp_path / "model")
    _truncate(folder / "model.safetensors")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": {"data_dir": str(tmp_path / "data"), "num_workers": 0}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALBEF_"))}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "albef",
            "evaluate",
            "retrieval",
            "--model",
            str(folder),
            "--params",
            str(params),
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    [line] = _error_lines(run.stderr)
    assert line.startswith("albef evaluate: error: ")
    assert f"{folder / 'model.safetensors'}: truncated or not a safetensors file" in line


# ---------------------------------------------------------------------------- .pth files


def test_pickled_code_as_init_deit_is_refused_in_one_line_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _pickled_code(tmp_path / "deit.pth", marker)
    section = {
        "init_deit": str(evil),
        "data_dir": str(tmp_path / "data"),
        "train_file": "pretrain.json",
        "out": str(tmp_path / "out"),
        "run_dir": str(tmp_path / "run"),
        "batch_size": 4,
        "num_workers": 0,
        "device": "cpu",
    }
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": TINY_MODEL, "pretrain": section}))
    rc, stderr = _cli(capsys, "pretrain", "--params", str(params), "--quiet")
    assert rc == 2
    [line] = _error_lines(stderr)
    assert f"{evil}: not a readable DeiT checkpoint: refused: it holds pickled code (posix.system" in line
    assert "weights_only=True does not run" in line
    assert not marker.exists()


def test_a_truncated_official_checkpoint_is_one_line_from_convert_official(tmp_path, capsys):
    src = tmp_path / "ALBEF.pth"
    torch.save({"model": build_model("retrieval", tiny_config()).state_dict()}, src)
    _truncate(src)
    rc, stderr = _cli(capsys, "convert-official", str(src), str(tmp_path / "out"), "--task", "retrieval")
    assert rc == 2
    [line] = _error_lines(stderr)
    assert f"{src}: not a readable PyTorch checkpoint: truncated or corrupt" in line
    assert not (tmp_path / "out").exists()


def test_pickled_code_as_an_official_checkpoint_or_parity_reference_is_refused(tmp_path):
    from albef.parity import check_reference

    marker = tmp_path / "ran"
    with pytest.raises(
        CheckpointError, match=r"ALBEF\.pth: .*refused: it holds pickled code \(posix\.system"
    ):
        read_official_state_dict(_pickled_code(tmp_path / "ALBEF.pth", marker))
    report = check_reference(_pickled_code(tmp_path / "albef_ref_retrieval.pt", marker))
    assert not report.ok and report.failures() == [report.error]
    assert (
        "albef_ref_retrieval.pt: not a readable parity reference: refused: it holds pickled code"
        in report.error
    )
    assert "\n" not in report.error
    assert not marker.exists()


def test_a_truncated_bert_folder_names_its_weights_file(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from albef.pretrained import bert_state_dict

    cfg = BertConfig(
        vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    _truncate(weights)
    with pytest.raises(
        CheckpointError, match=f"{weights}: not readable BERT weights: truncated or not a safetensors"
    ):
        bert_state_dict(tmp_path / "bert")


# ---------------------------------------------------------------------------- training checkpoints


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(4) + index


def _collate(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"x": torch.stack(samples)}


def _trainer(run_dir: Path, **settings) -> Trainer:
    """A linear model, 4 steps an epoch, 3 epochs, a checkpoint every 2 steps."""

    class Out:
        def __init__(self, loss: torch.Tensor) -> None:
            self.loss = loss

        def loss_terms(self) -> dict[str, torch.Tensor]:
            return {"loss": self.loss.detach()}

    def forward(model, batch, alpha, choices):
        return Out(((model(batch["x"]) - 1.0) ** 2).mean())

    torch.manual_seed(0)
    cfg = {"epochs": 3, "batch_size": 4, "lr": 1e-2, "warmup_stair": 1, "log_every": 1, "precision": "fp32"}
    cfg.update(num_workers=0, checkpoint_every=2, keep_checkpoints=3, **settings)
    return Trainer(
        nn.Linear(4, 1),
        _Numbers(),
        _collate,
        forward,
        TrainConfig(**cfg),
        run_dir,
        WorldInfo(),
        torch.device("cpu"),
        "linear",
        progress=False,
    )


def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(tmp_path, caplog):
    straight = _trainer(tmp_path / "straight")
    straight.fit()
    assert _trainer(tmp_path / "run", max_steps=6).fit().step == 6
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = checkpoints / "step-000000006.pt"
    assert [p.name for p in list_checkpoints(checkpoints)][-1] == newest.name
    kept = _truncate(newest)

    resumed = _trainer(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="albef.train.engine"):
        result = resumed.fit()
    assert result.resumed_from == str(checkpoints / "step-000000004.pt")  # the intact one before it
    assert result.step == 12
    for key, value in straight.model.state_dict().items():  # and it trains on to the same weights
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    aside = checkpoints / CORRUPT_DIR / newest.name
    assert aside.read_bytes() == kept  # moved aside, kept as it was
    assert all(p.parent == checkpoints for p in list_checkpoints(checkpoints))
    [warning] = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert str(newest) in warning and "truncated or corrupt" in warning


def test_resume_auto_starts_afresh_when_no_checkpoint_reads(tmp_path, caplog):
    assert _trainer(tmp_path / "run", max_steps=4).fit().step == 4
    checkpoints = tmp_path / "run" / "checkpoints"
    for path in list_checkpoints(checkpoints):
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="albef.train.engine"):
        result = _trainer(tmp_path / "run", max_steps=2).fit()
    assert result.resumed_from is None and result.step == 2
    assert sorted(p.name for p in (checkpoints / CORRUPT_DIR).iterdir()) == [
        "step-000000002.pt",
        "step-000000004.pt",
    ]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("skipping checkpoint" in m and "empty or truncated" in m for m in messages) == 2
    assert any("no readable checkpoint left" in m for m in messages)


def test_an_explicit_resume_path_that_is_unreadable_is_an_error_naming_it(tmp_path):
    marker = tmp_path / "ran"
    evil = _pickled_code(tmp_path / "step-000000002.pt", marker)
    with pytest.raises(
        CheckpointError, match="step-000000002.pt: not a readable albef training checkpoint: refused"
    ):
        _trainer(tmp_path / "run", resume=str(evil)).fit()
    assert not marker.exists()
    assert evil.exists()  # an explicit path is the user's file: reported, never moved
