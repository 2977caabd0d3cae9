"""The training and evaluation stages with MLflow tracking around them, as the CLI (and so ``dvc.yaml``) and the
Prefect flows run them.

The stage functions (found through the task registry, :mod:`albef.tasks`) know nothing of MLflow; these
wrappers open the stage's run, hand the Trainer's ``on_log`` hook to it, and log the results. With
``mlflow.enabled: false`` (or no ``mlflow`` section) they are the plain stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from albef.config import section
from albef.sections import check_sections
from albef.tasks import get_task
from albef.tracking.provenance import provenance_tags
from albef.tracking.run import stage_run


def tracked_train(params: dict[str, Any], name: str, task: str, progress: bool = True) -> dict[str, Any]:
    """``pretrain`` / ``finetune_<task>`` with its MLflow run."""
    entry = get_task(task)
    check_sections(params, (name, "model"))  # a bad value fails here, before any MLflow run is opened
    values = section(params, name)
    tags = provenance_tags([values.get("data_dir", "data/processed"), values.get("init")])
    with stage_run(params, name, tags=tags) as run:
        if run is not None:
            run.log_dict(params, "params.json", "config")
        on_log = run.on_log if run is not None else None
        metrics = entry.train(params, name=name, progress=progress, on_log=on_log)
        if run is not None:
            # The last window's losses, temperature and throughput already sit in the step histories.
            summary = {
                k: v for k, v in metrics.items() if not k.startswith(("loss", "temp", "samples_per_s"))
            }
            run.log_metrics(summary, step=metrics.get("steps") or 0)
            run.log_dict(metrics, "metrics.json")
            run.log_artifact(values.get("plots"), "plots")  # (skipped where there is none)
            # The exported weights go to MLflow once, as the registered pyfunc model (the register stage); a
            # stage run keeps the small summary of what it exported.
            if values.get("out"):
                run.log_artifact(Path(values["out"]) / "training.json", "model")
    return metrics


def evaluate_section(task: str) -> str:
    """The params.yaml section of ``evaluate <task>`` (retrieval keeps the historical name ``evaluate``)."""
    section_name = get_task(task).eval_section
    if section_name is None:
        raise ValueError(f"no evaluation for task {task!r}")
    return section_name


def with_test_file(params: dict[str, Any], task: str, test_file: str) -> dict[str, Any]:
    """``params`` with ``evaluate <task>`` pointed at another test file of its data_dir (``--test-file``):
    one section serves several DVC stages, e.g. retrieval on the in-domain and on the shifted test set."""
    name = evaluate_section(task)
    values = dict(section(params, name))
    # grounding evaluates a list of files (val and test); --test-file makes it that one file
    key = "test_files" if task == "grounding" else "test_file"
    values[key] = [test_file] if key == "test_files" else test_file
    return {**params, name: values}


def tracked_evaluate(
    params: dict[str, Any],
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    task: str = "retrieval",
    pipeline_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``evaluate <task>`` with its MLflow run: metrics and the report's files (rankings, example images,
    answers, grounding heat maps). ``pipeline_params``: params.yaml as read, when ``params`` is an adjusted
    copy (:func:`with_test_file`), so the run nests under the same pipeline run as the other stages."""
    # Under DVC the stage name tells zero-shot from finetuned evaluation; elsewhere the output folder does.
    name = os.environ.get("DVC_STAGE") or f"evaluate_{Path(out_dir).name}"
    entry = get_task(task)
    settings_name = evaluate_section(task)
    check_sections(params, (settings_name,))  # before any MLflow run is opened
    evaluate = section(params, settings_name)
    tags = {
        **provenance_tags([evaluate.get("data_dir", "data/processed"), str(model_dir)]),
        "albef.model_dir": str(model_dir),
        "albef.task": task,
    }
    with stage_run(
        params,
        name,
        tags=tags,
        log_params={settings_name: evaluate, "model_dir": str(model_dir)},
        pipeline_params=pipeline_params,
    ) as run:
        metrics = entry.evaluate(params, model_dir, out_dir, metrics_path, progress=progress)
        if run is not None:
            run.log_metrics(metrics)
            run.log_dict(metrics, "metrics.json")
            for file in entry.report_files:  # a missing one (examples: 0 draws none) is skipped
                path = Path(out_dir) / file
                # a folder's files go under report/<folder>, as in the report
                run.log_artifact(path, f"report/{file}" if path.is_dir() else "report")
    return metrics


def tracked_unimodal(params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The unimodal warm start with its MLflow run: held-out label and MLM figures."""
    from albef.train.unimodal import unimodal_stage

    check_sections(params, ("unimodal", "model"))  # before any MLflow run is opened
    values = section(params, "unimodal")
    tags = provenance_tags([values.get("data_dir", "data/processed")])
    with stage_run(params, "unimodal", tags=tags, log_params={"unimodal": values}) as run:
        metrics = unimodal_stage(params, progress=progress)
        if run is not None:
            run.log_metrics(metrics)
            run.log_dict(metrics, "metrics.json")
    return metrics
