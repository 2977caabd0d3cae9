"""Training as users run it, in real processes: `albef pretrain` killed with SIGKILL and resumed, and two
CPU processes under torchrun (gloo) whose queues hold both ranks' features."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_train_params
from safetensors.torch import load_file

from albef.train.checkpointing import list_checkpoints


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _project(tiny_data: Path, root: Path, **overrides) -> Path:
    shutil.copytree(tiny_data / "data", root / "data")
    params = tiny_train_params(root, **{"pretrain.val_file": None, **overrides})
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _albef(*args: str) -> list[str]:
    return [sys.executable, "-m", "albef", *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "models" / "pretrain" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def test_sigkill_at_any_moment_then_resume_is_bit_exact(tiny_data, tmp_path):
    reference = _project(tiny_data, tmp_path / "reference", **{"pretrain.checkpoint_every": 1})
    _run(_albef("pretrain", "--params", str(reference), "--quiet"), reference.parent)

    params = _project(tiny_data, tmp_path / "killed", **{"pretrain.checkpoint_every": 1})
    ckpts = params.parent / "runs" / "pretrain" / "checkpoints"
    rng = random.Random(0)
    kills = 0
    for wait_for_step in (3, 11):  # kill twice: once in epoch 0, once in epoch 1
        proc = subprocess.Popen(
            _albef("pretrain", "--params", str(params), "--quiet"),
            cwd=params.parent,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = list_checkpoints(ckpts)
            if done and int(done[-1].stem.split("-")[1]) >= wait_for_step:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))  # somewhere in the next step or checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1, "training finished before it could be killed"
    result = _run(_albef("pretrain", "--params", str(params), "--quiet"), params.parent)
    assert "resumed from" in result.stderr
    assert json.loads((params.parent / "metrics" / "pretrain.json").read_text())["steps"] == 24
    _assert_same_weights(_weights(reference.parent), _weights(params.parent))


def _torchrun(params: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "albef",
        "pretrain",
        "--params",
        str(params),
        "--quiet",
    ]
    return _run(cmd, params.parent)


def test_two_processes_under_torchrun_fill_the_queue_from_both_ranks_and_resume(tiny_data, tmp_path):
    from albef.checkpoint import build_model
    from albef.config import ModelConfig
    from albef.data.datasets import PretrainDataset, image_source
    from albef.data.transforms import build_transform
    from albef.train.sampler import EpochSampler, SeededSamples

    # One step only, then stop: the queue must hold rank 0's batch and then rank 1's.
    params = _project(tiny_data, tmp_path / "two", **{"pretrain.max_steps": 1, "pretrain.epochs": 1})
    _torchrun(params)
    cfg = yaml.safe_load(params.read_text())
    ckpt = torch.load(
        params.parent / "runs" / "pretrain" / "checkpoints" / "step-000000001.pt", weights_only=True
    )
    state = ckpt["model"]
    batch = cfg["pretrain"]["batch_size"]
    assert int(state["queue_ptr"]) == 2 * batch

    torch.manual_seed(42)  # the stage's seed: the initial weights every rank starts from
    model = build_model("pretrain", ModelConfig.from_dict(cfg["model"]))
    data_dir = Path(cfg["pretrain"]["data_dir"])
    transform = build_transform("pretrain", model.cfg.vision.image_size, hflip=False)
    dataset = SeededSamples(
        PretrainDataset(data_dir / "pretrain.json", image_source(data_dir), transform), seed=42
    )
    for rank in (0, 1):
        sampler = EpochSampler(len(dataset), batch, rank=rank, world_size=2, seed=42)
        sampler.set_epoch(0)
        keys = list(sampler)[:batch]
        images = torch.stack([dataset[k][0] for k in keys])
        with torch.no_grad():
            expected = F.normalize(model.vision_proj(model.visual_encoder(images)[:, 0, :]), dim=-1)
        got = state["image_queue"][:, rank * batch : (rank + 1) * batch].t()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    # Resume the two-process run to the end; it must equal an uninterrupted two-process run.
    params_text = params.read_text().replace("max_steps: 1", "max_steps: 0")
    params.write_text(params_text)
    resumed = _torchrun(params)
    assert "resumed from" in resumed.stderr
    straight = _project(tiny_data, tmp_path / "straight", **{"pretrain.epochs": 1})
    _torchrun(straight)
    _assert_same_weights(_weights(straight.parent), _weights(params.parent))
