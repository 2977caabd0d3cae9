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

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from albef.orchestration import mlflow_link, report
from albef.orchestration import workspace as _workspace
from albef.orchestration.pipeline import (
    FLOW_PREFIX,
    FLOW_STAGES,
    Plan,
    PlanError,
    apply_overrides,
    flow_of,
    prepare,
)
from albef.orchestration.process import failure, run_supervised
from albef.orchestration.workspace import Workspace
from albef.tracking.run import PARENT_ENV, STAGE_RUN_ENV

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
        env[PARENT_ENV] = settings["mlflow_parent_run_id"]
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
    cfg = stage_tracking(settings)
    # in a workspace: the checkout's MLflow store and the experiment's name (albef.orchestration.workspace)
    env.update(_workspace.stage_env(_workspace.describe(project), cfg.uri if cfg is not None else None))
    earlier = mlflow_link.find_stage_run(cfg, settings.get("mlflow_parent_run_id"), stage, logger)
    if earlier is not None and earlier.status != "FINISHED":
        # an interrupted attempt of this stage in this pipeline run: its MLflow run continues
        env[STAGE_RUN_ENV] = earlier.run_id
        logger.info("continuing MLflow run %s of the interrupted attempt", earlier.run_id)
    started = time.time()
    try:
        run = run_supervised(
            [
                sys.executable,
                "-m",
                "dvc",
                "repro",
                *(["--force", "--single-item"] if settings.get("force") else []),
                stage,
            ],
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
    cfg = stage_tracking(settings)
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
                f"`{mlflow_link.redacted(cfg.uri)}`; open it with "
                f"`mlflow ui --backend-store-uri {mlflow_link.redacted(cfg.uri)}`\n"
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


def end_runs_of_dead_flow_runs(cfg, logger) -> list[str]:
    """MLflow parent runs left RUNNING by flow runs that are over end KILLED. A flow run ends its parent run
    itself however it stops, except when its process is killed outright (SIGKILL, a lost machine): Prefect
    then marks the flow run CRASHED, and the next flow run tidies up here. Returns the MLflow runs it ended."""
    from prefect.client.orchestration import get_client

    running = mlflow_link.running_parent_runs(cfg, logger)
    running.pop(str(flow_run.id), None)
    ended = []
    if not running:
        return ended
    with get_client(sync_client=True) as client:
        for flow_run_id, run_id in running.items():
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception:  # a flow run of another Prefect server (or deleted): not ours to judge
                continue
            if state is not None and state.is_final():
                logger.info(
                    "mlflow: parent run %s of flow run %s (%s) was left RUNNING: now KILLED",
                    run_id,
                    flow_run_id,
                    state.type.value,
                )
                mlflow_link.close_parent_run(cfg, run_id, "KILLED", logger)
                ended.append(run_id)
    return ended


@contextlib.contextmanager
def flow_workspace(plan: Plan, overrides: dict[str, Any] | None, keep: bool, logger) -> Iterator[Workspace]:
    """Where this flow run's stages run (:mod:`albef.orchestration.workspace`): the checkout, under its lock;
    or a workspace of its own with the overrides written into its params.yaml, saved as a DVC experiment when
    the stages succeed and removed (kept on failure, or with ``keep``)."""
    here = _workspace.describe(plan.project)
    if plan.mode == "checkout":  # (or a subflow, in the workspace its parent flow run made)
        with _workspace.checkout_lock(here.path, f"flow run {flow_run.name}", logger):
            yield here
        return
    if here.isolated:
        raise PlanError(
            f"project_dir {plan.project} is the workspace of experiment {here.experiment}: run "
            "the flow with overrides from the checkout it was made from"
        )
    with experiment_slot(logger):
        name = _workspace.experiment_name(flow_run.name, str(flow_run.id))
        made = _workspace.create(plan.project, name, logger)
        for key, (old, new) in apply_overrides(made.path, overrides).changed.items():
            logger.info("%s params.yaml: %s = %r (was %r)", made.experiment, key, new, old)
        try:
            yield made
        except BaseException:
            logger.warning(
                "workspace %s kept for inspection (remove it with `git worktree remove --force %s`)",
                made.path,
                made.path,
            )
            raise
        _workspace.save(made, logger)
        if keep:
            logger.info("workspace %s kept (keep_workspace)", made.path)
        else:
            _workspace.remove(made)


# Experiment workspaces run concurrently up to this Prefect global concurrency limit, when it exists (the UI's
# Concurrency page, `prefect gcl create albef-experiments --limit 2`, or the sweep flow's max_concurrent);
# without it, they all run at once.
EXPERIMENT_LIMIT = "albef-experiments"


@contextlib.contextmanager
def experiment_slot(logger) -> Iterator[None]:
    """One slot of :data:`EXPERIMENT_LIMIT` for the whole experiment (renewed while it runs)."""
    from prefect.concurrency.sync import concurrency

    logger.info("taking a slot of the concurrency limit %s (when it exists)", EXPERIMENT_LIMIT)
    with concurrency(EXPERIMENT_LIMIT, occupy=1, strict=False, raise_on_lease_renewal_failure=False):
        yield


def stage_settings(
    plan: Plan, where: Workspace, parent_run_id: str | None, deadline_minutes: float | None
) -> dict[str, Any]:
    """What every task of a flow run needs: where to run, the launch environment, the tracking settings and
    the parent run. (Paths and ids only: the tracking URI, which may hold credentials, is resolved in the
    task from these, never passed as a task parameter.)"""
    return {
        "project_dir": str(where.path),
        "launch_env": dict(plan.env),
        "deadline_s": deadline_minutes * 60 if deadline_minutes else None,
        "mlflow_parent_run_id": parent_run_id,
        "params": {k: plan.params[k] for k in ("mlflow",) if k in plan.params},
    }


def stage_tracking(settings: dict[str, Any]):
    """The tracking settings of a task's stage: the mlflow section, against the checkout's store (a
    workspace's stages track where the checkout's UI looks)."""
    checkout = _workspace.describe(settings["project_dir"]).checkout
    return mlflow_link.tracking(settings.get("params") or {}, checkout, os.environ.get("ALBEF_MLFLOW_UI_URL"))


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
    workspace: str = "auto",
    keep_workspace: bool = False,
) -> list[dict[str, Any]]:
    """The body of every per-stage flow: check everything, then one task run per DVC stage, in order, in the
    checkout or in a workspace of the flow run's own (overrides: a DVC experiment)."""
    logger = get_run_logger()
    requested = stages or ([f"{FLOW_PREFIX}{flow_name}"] if flow_name else None)
    plan = prepare(project_dir, requested, overrides, gpus, nodes, rdzv_endpoint, workspace=workspace)
    if flow_name:
        foreign = [s for s in plan.stages if flow_of(s, plan.declared) != flow_name]
        if foreign:
            raise PlanError(
                f"flow {flow_name} runs {', '.join(FLOW_STAGES[flow_name])}, not {', '.join(foreign)}"
            )
    checkout = _workspace.describe(plan.project).checkout
    cfg = mlflow_link.tracking(plan.params, checkout)
    with flow_workspace(plan, overrides, keep_workspace, logger) as where:
        owns_parent = mlflow_parent_run_id is None
        if owns_parent:
            end_runs_of_dead_flow_runs(cfg, logger)
            mlflow_parent_run_id = mlflow_link.open_parent_run(
                cfg,
                str(flow_run.id),
                f"prefect-{flow_run.name}",
                logger,
                request={
                    "flow": flow_name,
                    "stages": plan.stages,
                    "overrides": overrides,
                    "workspace": plan.mode,
                },
                experiment=where.experiment,
            )
        settings = stage_settings(plan, where, mlflow_parent_run_id, deadline_minutes)
        repro = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
        results = []
        try:
            for stage in plan.stages:
                results.append(repro(stage, settings))
        except BaseException as exc:  # KILLED when the flow run was cancelled
            if owns_parent:
                mlflow_link.close_parent_run(
                    cfg, mlflow_parent_run_id, mlflow_link.ending_status(exc), logger
                )
            raise
    if owns_parent:
        mlflow_link.close_parent_run(cfg, mlflow_parent_run_id, "FINISHED", logger)
    return results
