"""Every params.yaml section goes through one typed reader (albef.config.build_dataclass, listed per section in
albef.sections): numbers YAML 1.1 leaves as strings are numbers, other wrong types and out-of-range values fail
naming section.key, and a tracked stage checks its sections before it opens any MLflow run (issue 16, item 1)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from albef.config import ConfigError
from albef.sections import check_sections, section_reader
from albef.train.stages import split_train_section

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _with(params: dict, section: str, **values) -> dict:
    out = copy.deepcopy(params)
    out[section].update(values)
    return out


def test_every_section_of_params_yaml_has_a_reader_and_reads():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    unread = [name for name in params if section_reader(name) is None]
    assert unread == ["tokenizer"], unread  # tokenizer: two plain keys read by albef.data.stages
    check_sections(params, list(params))


def test_a_number_yaml_reads_as_a_string_is_taken_as_the_number():
    text = "pretrain:\n  lr: 1e-4\n  min_lr: 1E-6\n  warmup_lr: 5e-6\n"
    values = yaml.safe_load(text)["pretrain"]
    assert values["lr"] == "1e-4"  # YAML 1.1: no dot, so not a float
    _, train = split_train_section(values, "pretrain")
    assert (train.lr, train.min_lr, train.warmup_lr) == (1e-4, 1e-6, 5e-6)
    assert isinstance(train.lr, float)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("pretrain", {"batch_size": "32"}, r"pretrain\.batch_size must be an integer, got '32'"),
        ("pretrain", {"lr": "fast"}, r"pretrain\.lr must be a number, got 'fast'"),
        ("pretrain", {"epochs": 2.5}, r"pretrain\.epochs must be an integer, got 2\.5"),
        ("pretrain", {"min_lr": -1}, r"pretrain\.min_lr must be >= 0, got -1"),
        ("pretrain", {"alpha": 5}, r"pretrain\.alpha must be <= 1, got 5"),
        ("pretrain", {"min_lr": 0.1}, r"pretrain: min_lr \(0\.1\) must be <= lr \(0\.001\)"),
        ("pretrain", {"itc": "yes"}, r"pretrain\.itc must be true or false"),
        ("pretrain", {"crop_scale": [0.9]}, r"pretrain\.crop_scale"),
        ("finetune_vqa", {"warmup_lr": 1.0}, r"finetune_vqa: warmup_lr \(1\.0\) must be <= lr"),
        ("finetune_ve", {"num_workers": -2}, r"finetune_ve\.num_workers must be >= 0, got -2"),
        ("synth", {"workers": "two"}, r"synth\.workers must be an integer, got 'two'"),
        ("preprocess", {"max_drop_fraction": "lots"}, r"preprocess\.max_drop_fraction must be a number"),
        ("unimodal", {"vision_lr": 0}, r"unimodal\.vision_lr must be > 0, got 0"),
        ("evaluate", {"k_test": 0}, r"evaluate\.k_test must be >= 1, got 0"),
        ("evaluate", {"device": 0}, r"evaluate\.device must be a string, got 0"),
        ("model", {"momentum": 1.5}, r"model\.momentum must be in \(0, 1\)"),
        ("model", {"embed_dim": "64"}, r"model\.embed_dim must be an integer, got '64'"),
    ],
)
def test_a_wrong_type_or_range_fails_naming_the_key(params, section, values, message):
    with pytest.raises(ConfigError, match=message):
        check_sections(_with(params, section, **values), [section])


def test_a_tracked_stage_with_a_bad_value_fails_before_any_mlflow_run(mlflow_sqlite, tmp_path, params):
    from mlflow import MlflowClient

    from albef.stages import tracked_evaluate, tracked_train

    bad = _with(params, "pretrain", min_lr=-1)
    bad["mlflow"] = {**bad["mlflow"], "experiment": "typed", "spool_dir": str(tmp_path / "spool")}
    with pytest.raises(ConfigError, match=r"pretrain\.min_lr must be >= 0"):
        tracked_train(bad, "pretrain", "pretrain", progress=False)
    typo = _with(params, "evaluate", k_tset=4)
    typo["mlflow"] = bad["mlflow"]
    with pytest.raises(ConfigError, match=r"evaluate: unknown key\(s\) \['k_tset'\]"):
        tracked_evaluate(typo, tmp_path / "model", tmp_path / "out", progress=False)
    client = MlflowClient(mlflow_sqlite)
    experiment = client.get_experiment_by_name("typed")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert runs == [], [(r.info.run_name, r.info.status) for r in runs]
