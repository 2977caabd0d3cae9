"""The one Prefect task every flow uses: run one DVC stage, then publish what it wrote.

A task run is ``dvc repro <stage>`` in the project, under a supervisor that gives it a process group of its
own and a wall-clock deadline (``albef.orchestration.process``). Its output streams into the task's Prefect
log. When it fails, the task fails with the stage's own error lines; a failure the stage reported itself
(bad settings, a diverged run) is final, while a crash, a kill or a passed deadline is retried, and the
retry resumes: training stages keep their checkpoints in ``runs/<stage>`` (a ``persist`` output that DVC
leaves in place) and continue from the newest one (``resume: auto``). Prefect never caches: DVC decides
whether a stage is up to date. Tasks take and return paths, ids and small dicts only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from albef.orchestration import mlflow_link, report
from albef.orchestration.pipeline import FLOW_STAGES, PlanError, flow_of, prepare
from albef.orchestration.process import failure, run_supervised

DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY_SECONDS = 30.0

# Why earlier attempts of a task run failed, keyed by task run id. Prefect retries a task in the same
# process, and its state history keeps no message, so the successful attempt's artifact says here why the
# retries happened: a record that does not depend on log lines, which Prefect ships in the background and
# may drop under load.
_FAILED_ATTEMPTS: dict[str, list[str]] = {}


def _retry_unless_reported(task, task_run, state) -> bool:
    """Retry crashes, kills and deadlines; not errors the stage reported itself (they would recur)."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:
            exc = None
    return bool(getattr(exc, "retryable", True))


def _log_line(logger):
    def emit(line: str) -> None:
        head = line.lstrip()[:12].upper()
        if head.startswith(("ERROR", "CRITICAL", "TRACEBACK")) or ": error: " in line:
            logger.error(line)
        elif head.startswith("WARNING"):
            logger.warning(line)
        else:
            logger.info(line)

    return emit


def stage_env(settings: dict[str, Any]) -> dict[str, str]:
    """The stage command's environment: this one, the venv's commands first on PATH (dvc.yaml runs
    ``albef ...``), torchrun settings and the MLflow parent run."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the Prefect log as they are written
    env.update(settings.get("launch_env") or {})
    if settings.get("mlflow_parent_run_id"):
        env[mlflow_link.PARENT_ENV] = settings["mlflow_parent_run_id"]
    return env


@task(
    name="dvc-repro",
    task_run_name="dvc repro {stage}",
    cache_policy=NONE,
    retries=DEFAULT_RETRIES,
    retry_delay_seconds=DEFAULT_RETRY_DELAY_SECONDS,
    retry_condition_fn=_retry_unless_reported,
)
def repro_stage(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``dvc repro <stage>`` under its deadline; returns a small summary (metrics, attempt, resume step)."""
    logger = get_run_logger()
    context = TaskRunContext.get()
    attempt = context.task_run.run_count if context and context.task_run else 1
    project = Path(settings["project_dir"])
    deadline = settings.get("deadline_s")
    logger.info(
        "attempt %d: dvc repro %s in %s%s",
        attempt,
        stage,
        project,
        f" (deadline {deadline:g} s)" if deadline else "",
    )
    env = stage_env(settings)
    cfg = mlflow_link.tracking(settings.get("params") or {}, project, os.environ.get("ALBEF_MLFLOW_UI_URL"))
    earlier = mlflow_link.find_stage_run(cfg, settings.get("mlflow_parent_run_id"), stage, logger)
    if earlier is not None and earlier.status != "FINISHED":
        # an interrupted attempt of this stage in this pipeline run: its MLflow run continues
        env[mlflow_link.STAGE_RUN_ENV] = earlier.run_id
        logger.info("continuing MLflow run %s of the interrupted attempt", earlier.run_id)
    started = time.time()
    try:
        run = run_supervised(
            [sys.executable, "-m", "dvc", "repro", stage],
            cwd=project,
            env=env,
            deadline_s=deadline,
            on_line=_log_line(logger),
        )
    except BaseException:  # cancelled: the stage was stopped; a run it could not end is KILLED
        mlflow_link.end_orphaned_stage_run(cfg, settings.get("mlflow_parent_run_id"), stage, "KILLED", logger)
        raise
    run_key = str(context.task_run.id) if context and context.task_run else ""
    if run.status != 0:
        # a stage ends its own run on any error or SIGTERM: one left RUNNING was killed outright (SIGKILL)
        mlflow_link.end_orphaned_stage_run(cfg, settings.get("mlflow_parent_run_id"), stage, "KILLED", logger)
        error = failure(stage, run, deadline)
        logger.error("%s", error)
        # the last line of the stage's failure message: its own last error line ("... exited with -9")
        _FAILED_ATTEMPTS.setdefault(run_key, []).append(f"attempt {attempt}: {str(error).splitlines()[-1]}")
        raise error
    files = report.stage_files(project, stage)
    metrics = report.read_metrics(project, files.metrics)
    summary: dict[str, Any] = {
        "stage": stage,
        "attempt": attempt,
        "seconds": round(time.time() - started, 1),
        "resumed_from_step": run.resumed_from_step,
        "up_to_date": any("didn't change, skipping" in line for line in run.tail),
        "earlier_failures": "; ".join(_FAILED_ATTEMPTS.pop(run_key, [])) or None,
        "metrics_files": files.metrics,
        "images": [p for p in files.images if (project / p).is_file()],
    }
    publish(stage, project, summary, metrics, settings, logger)
    summary["metrics"] = {k: v for k, v in report.flatten(metrics).items() if not isinstance(v, str)}
    return summary


def publish(
    stage: str,
    project: Path,
    summary: dict[str, Any],
    metrics: dict[str, Any],
    settings: dict[str, Any],
    logger,
) -> None:
    """The stage's Prefect artifacts: its metrics table, the link to its MLflow run, its images."""
    shown = {
        k: summary[k] for k in ("attempt", "seconds", "resumed_from_step", "up_to_date", "earlier_failures")
    }
    create_markdown_artifact(
        markdown=report.metrics_markdown(stage, metrics, shown),
        key=report.artifact_key(stage, "metrics"),
        description=f"metrics of DVC stage {stage}",
    )
    cfg = mlflow_link.tracking(settings.get("params") or {}, project, os.environ.get("ALBEF_MLFLOW_UI_URL"))
    ref = mlflow_link.find_stage_run(cfg, settings.get("mlflow_parent_run_id"), stage, logger)
    if ref is None:
        logger.info("no MLflow run of stage %s to link (tracking off, or the stage opened none)", stage)
    elif ref.url:
        create_link_artifact(
            link=ref.url,
            link_text=f"MLflow run {ref.run_id}",
            key=report.artifact_key(stage, "mlflow-run"),
            description=f"the MLflow run of DVC stage {stage}",
        )
        summary["mlflow_run_id"] = ref.run_id
    else:
        create_markdown_artifact(
            markdown=(
                f"# MLflow run of {stage}\n\nrun `{ref.run_id}` (experiment {ref.experiment_id}) in "
                f"`{cfg.uri}`; open it with `mlflow ui --backend-store-uri {cfg.uri}`\n"
            ),
            key=report.artifact_key(stage, "mlflow-run"),
            description=f"the MLflow run of DVC stage {stage}",
        )
        summary["mlflow_run_id"] = ref.run_id
    for image in summary["images"]:
        markdown = report.image_markdown(project, image, f"{stage}: {Path(image).name}")
        if markdown:
            create_markdown_artifact(
                markdown=markdown,
                key=report.artifact_key(stage, Path(image).stem),
                description=f"{image} written by DVC stage {stage}",
            )


def run_flow_stages(
    flow_name: str | None,
    *,
    project_dir: str,
    stages: list[str] | None,
    overrides: dict[str, Any] | None,
    gpus: int,
    nodes: int,
    rdzv_endpoint: str | None,
    deadline_minutes: float | None,
    retries: int,
    retry_delay_seconds: float,
    mlflow_parent_run_id: str | None,
) -> list[dict[str, Any]]:
    """The body of every per-stage flow: check everything, then one task run per DVC stage, in order."""
    logger = get_run_logger()
    requested = stages or ([flow_name] if flow_name else None)
    plan = prepare(project_dir, requested, overrides, gpus, nodes, rdzv_endpoint)
    if flow_name:
        foreign = [s for s in plan.stages if flow_of(s, plan.declared) != flow_name]
        if foreign:
            raise PlanError(
                f"flow {flow_name} runs {', '.join(FLOW_STAGES[flow_name])}, not {', '.join(foreign)}"
            )
    for key, (old, new) in plan.changed.items():
        logger.info("params.yaml: %s = %r (was %r)", key, new, old)
    cfg = mlflow_link.tracking(plan.params, plan.project)
    owns_parent = mlflow_parent_run_id is None
    if owns_parent:
        mlflow_parent_run_id = mlflow_link.open_parent_run(
            cfg, str(flow_run.id), f"prefect-{flow_run.name}", logger
        )
    settings = {
        "project_dir": str(plan.project),
        "launch_env": plan.env,
        "deadline_s": deadline_minutes * 60 if deadline_minutes else None,
        "mlflow_parent_run_id": mlflow_parent_run_id,
        "params": {k: plan.params[k] for k in ("mlflow",) if k in plan.params},
    }
    repro = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    results = []
    try:
        for stage in plan.stages:
            results.append(repro(stage, settings))
    except BaseException as exc:  # KILLED when the flow run was cancelled
        if owns_parent:
            mlflow_link.close_parent_run(cfg, mlflow_parent_run_id, mlflow_link.ending_status(exc), logger)
        raise
    if owns_parent:
        mlflow_link.close_parent_run(cfg, mlflow_parent_run_id, "FINISHED", logger)
    return results
