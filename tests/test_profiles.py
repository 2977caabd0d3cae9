"""Profiles (albef/profiles.py): named override sets that DVC, the stages and Prefect read the same way."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from albef.config import ConfigError, ModelConfig, read_params
from albef.orchestration.pipeline import PlanError
from albef.profiles import PROFILES, apply_profile, as_set_args, load_profile

REPO = Path(__file__).resolve().parents[1]
TRAIN = ("pretrain", "finetune_retrieval", "finetune_vqa", "finetune_ve", "pretrain_nlvr", "finetune_nlvr")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_applies_to_params_yaml_and_builds_its_model(name):
    params = apply_profile(read_params(REPO / "params.yaml"), load_profile(name))
    cfg = ModelConfig.from_dict(params["model"])
    for section in TRAIN:  # the queue is advanced by the global batch of every training stage
        cfg.check_global_batch(params[section]["batch_size"], prefix="model")
    if name == "gpu":
        assert (cfg.vision.image_size, cfg.vision.width, cfg.vision.depth) == (96, 384, 6)
        assert (cfg.text.text_layers, cfg.text.fusion_layers) == (4, 4)
        assert params["pretrain"]["batch_size"] == 128 and params["pretrain"]["precision"] == "bf16"


def test_dvc_reads_the_printed_overrides_as_the_profile(tmp_path):
    """``dvc exp run $(albef profile gpu)``: DVC's own override code turns the printed -S arguments into the
    same params.yaml the profile gives (keys params.yaml leaves to the preset included)."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    args = shlex.split(as_set_args(load_profile("gpu")))
    assert args[0::2] == ["-S"] * (len(args) // 2)
    apply_overrides(str(tmp_path / "params.yaml"), args[1::2])
    via_dvc = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert via_dvc == apply_profile(read_params(REPO / "params.yaml"), load_profile("gpu"))


def test_a_profile_with_an_unknown_key_or_name_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain.epochz: 3\n")
    with pytest.raises(PlanError, match="epochz"):
        apply_profile(read_params(REPO / "params.yaml"), load_profile(str(bad)))
    with pytest.raises(ConfigError, match="'gpux'.*gpu, smoke"):
        load_profile("gpux")


def test_the_profile_command_writes_a_params_file(tmp_path):
    out = tmp_path / "params-gpu.yaml"
    cmd = [sys.executable, "-m", "albef", "profile", "gpu", "--write", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load(out.read_text())
    assert written == apply_profile(read_params(REPO / "params.yaml"), load_profile("gpu"))
