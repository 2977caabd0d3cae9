"""The task registry (albef.tasks): every entry names stage functions and sections that exist, the CLI, the
params checks, registration and serving read it, and a task added as one entry runs through the tracked
stages (issue 17, item 1)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml

from albef.config import ConfigError
from albef.tasks import EVAL_TASKS, FINETUNE_TASKS, MODEL_TASKS, REGISTER_TASKS, TASKS, Task, get_task

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_entry_names_a_stage_function_with_the_registrys_call_signature():
    from albef.tasks import _resolve

    calls = {
        "train_entry": {"task", "name", "progress", "on_log"},
        "eval_entry": {"task", "model_dir", "out_dir", "metrics_path", "progress", "name"},
        "train_settings": {"task", "name"},
        "eval_settings": {"task", "name"},
    }
    for task in TASKS.values():
        for field, keywords in calls.items():
            entry = getattr(task, field)
            if entry is None:
                continue
            accepted = set(inspect.signature(_resolve(entry, "")).parameters)
            assert keywords <= accepted, (task.name, field, keywords - accepted)


def test_every_section_and_model_the_registry_names_exists():
    from albef.checkpoint import TASKS as MODEL_CLASSES

    for task in TASKS.values():
        assert task.model in MODEL_CLASSES, task.name
        for section in (task.train_section, task.eval_section, task.register_section):
            assert section is None or section in PARAMS, (task.name, section)
    assert sorted(MODEL_TASKS) == sorted(MODEL_CLASSES)


def test_every_registered_task_is_served_by_the_pyfunc_and_predictor_the_registry_names():
    from albef.serving.predict import TaskPredictor
    from albef.serving.tasks import serving_config

    for task in TASKS.values():
        if task.register_section is None:
            continue
        pyfunc = task.pyfunc_class()
        # the pyfunc serves the model the task exports (grounding: the retrieval model), reads its columns and
        # takes its settings from the task's evaluation section
        assert pyfunc.task == task.model and pyfunc.columns, task.name
        assert serving_config(PARAMS, task.name) == pyfunc.settings(PARAMS)
        assert set(pyfunc.example().columns) == set(pyfunc.columns)
        if TASKS[task.model].predictor:
            predictor = TASKS[task.model].predictor_class()
            assert issubclass(predictor, TaskPredictor) and predictor.task == task.model
    assert TASKS["grounding"].pyfunc_class() is TASKS["retrieval"].pyfunc_class()
    with pytest.raises(
        ValueError, match=r"no pyfunc model for task 'nlvr_ta'; available: retrieval, vqa, ve"
    ):
        TASKS["nlvr_ta"].pyfunc_class()


def test_the_params_checks_read_each_tasks_sections_as_its_stages_do():
    from albef.sections import section_reader

    for task in TASKS.values():
        for section in (task.train_section, task.eval_section):
            if section is None:
                continue
            reader = section_reader(section)
            assert reader is not None, section
            reader(PARAMS)  # the defaults read
            bad = {**PARAMS, section: {**PARAMS[section], "no_such_key": 1}}
            with pytest.raises(ConfigError, match=f"{section}"):
                reader(bad)


def test_the_cli_offers_what_the_registry_holds():
    from albef.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    finetune = next(a for a in sub.choices["finetune"]._actions if a.dest == "task")
    evaluate = next(a for a in sub.choices["evaluate"]._actions if a.dest == "task")
    register = next(a for a in sub.choices["register"]._actions if a.dest == "task")
    assert (
        list(finetune.choices) == FINETUNE_TASKS == ["retrieval", "grounding", "vqa", "ve", "nlvr", "nlvr_ta"]
    )
    assert list(evaluate.choices) == EVAL_TASKS == ["retrieval", "grounding", "vqa", "ve", "nlvr"]
    assert list(register.choices) == REGISTER_TASKS


def test_an_unknown_task_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'caption'; available: pretrain, retrieval"):
        get_task("caption")
    with pytest.raises(ValueError, match="no evaluation for task 'nlvr_ta'"):
        TASKS["nlvr_ta"].evaluate({}, "m", "o")


# a task added as one registry entry: its stage functions live in this module


def _toy_train(params, task, name, progress=True, on_log=None):
    out = Path(params[name]["out"])
    out.mkdir(parents=True)
    (out / "trained.txt").write_text(f"{task} {name}")
    return {"steps": 3, "loss": 0.5}


def _toy_settings(params, task, name):
    if set(params[name]) - {"out", "test"}:
        raise ConfigError(f"{name}: unknown key(s) {sorted(set(params[name]) - {'out', 'test'})}")
    return dict(params[name])


def _toy_evaluate(params, task, model_dir, out_dir, metrics_path=None, progress=True, name=None):
    Path(out_dir).mkdir(parents=True)
    (Path(out_dir) / "answers.json").write_text("[]")
    metrics = {"accuracy": 50.0, "model": (Path(model_dir) / "trained.txt").read_text()}
    Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics_path).write_text(json.dumps(metrics))
    return metrics


def test_a_task_added_as_one_entry_trains_evaluates_and_is_checked(tmp_path, monkeypatch):
    from albef.sections import check_sections
    from albef.stages import tracked_evaluate, tracked_train

    here = __name__
    toy = Task(
        name="toy",
        description="a task of this test",
        model="retrieval",
        train_section="finetune_toy",
        train_entry=f"{here}:_toy_train",
        train_settings=f"{here}:_toy_settings",
        eval_section="evaluate_toy",
        eval_entry=f"{here}:_toy_evaluate",
        eval_settings=f"{here}:_toy_settings",
        report_files=("answers.json",),
    )
    monkeypatch.setitem(TASKS, "toy", toy)
    monkeypatch.chdir(tmp_path)
    params = {
        "mlflow": {"enabled": False},
        "finetune_toy": {"out": "models/toy"},
        "evaluate_toy": {"test": "toy_test.json"},
    }
    assert tracked_train(params, "finetune_toy", "toy", progress=False) == {"steps": 3, "loss": 0.5}
    metrics = tracked_evaluate(params, "models/toy", "reports/toy", "metrics/toy.json", task="toy")
    assert metrics["model"] == "toy finetune_toy"
    assert (tmp_path / "reports/toy/answers.json").is_file()
    with pytest.raises(ConfigError, match="evaluate_toy: unknown key"):
        check_sections({**params, "evaluate_toy": {"tset": 1}}, ["evaluate_toy"])
