"""Training checkpoints: atomic writes, pruning, exact resume of weights, optimizer and every RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_batch

from albef.checkpoint import CheckpointError
from albef.config import tiny_config
from albef.models import ALBEFRetrieval
from albef.models.components import RandomChoices
from albef.train import checkpointing
from albef.train.checkpointing import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from albef.train.optim import build_optimizer


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = ALBEFRetrieval(tiny_config())
    return model, build_optimizer(model, lr=1e-3)


def _train(model, optimizer, steps: int) -> None:
    cfg = model.cfg
    for _ in range(steps):
        images, ids, mask = make_batch(cfg, 4, 8, seed=int(torch.randint(0, 10**6, ())))
        out = model(images, ids, mask, torch.arange(4), choices=RandomChoices())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


def test_resume_continues_bit_for_bit(tmp_path):
    model, optimizer = _setup()
    _train(model, optimizer, 2)
    save_checkpoint(tmp_path, 2, model, optimizer, extra={"sampler_position": 8})
    _train(model, optimizer, 2)  # the uninterrupted run
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    resumed, resumed_opt = _setup(seed=123)  # different init: everything must come from the checkpoint
    info = load_checkpoint(latest_checkpoint(tmp_path), resumed, resumed_opt)
    assert info == {"step": 2, "epoch": 0, "extra": {"sampler_position": 8}}
    _train(resumed, resumed_opt, 2)
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_rng_states_round_trip(tmp_path):
    model, _ = _setup()
    save_checkpoint(tmp_path, 1, model)
    after = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    load_checkpoint(checkpoint_path := latest_checkpoint(tmp_path), model)
    assert checkpoint_path.name == "step-000000001.pt"
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], again[0]) and after[1:] == again[1:]


def test_only_the_last_k_are_kept_and_temporaries_are_ignored(tmp_path):
    model, _ = _setup()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, keep=2)
    (tmp_path / ".step-000000050.pt.tmp").write_bytes(b"half a checkpoint")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000030.pt", "step-000000040.pt"]
    assert latest_checkpoint(tmp_path).name == "step-000000040.pt"


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = _setup()
    good = save_checkpoint(tmp_path, 1, model)
    before = good.read_bytes()

    def disk_full(obj, fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert good.read_bytes() == before


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "step-000000001.pt"
    bad.write_bytes(b"garbage")
    model, _ = _setup()
    with pytest.raises(CheckpointError, match="step-000000001.pt: not a readable albef training checkpoint"):
        load_checkpoint(bad, model)
