"""``sweep``: several override sets as concurrent DVC experiments, the best one registered through the gate.

Each override set becomes a flow run of the ``full_pipeline`` deployment (a subflow run in the UI) in a
workspace of its own (:mod:`albef.orchestration.workspace`); they run concurrently, as many at once as the
Prefect global concurrency limit ``albef-experiments`` allows (``max_concurrent`` sets it). When all have
finished, the sweep reads ``metric`` from each saved experiment, publishes a table, and with
``register_best`` runs the register stages on the best experiment (a workspace made from its commit), so
its model goes through the same promotion gate as any other.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from albef.orchestration import workspace as _workspace
from albef.orchestration.pipeline import PlanError, prepare
from flows.options import StageName
from flows.tasks import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DELAY_SECONDS,
    EXPERIMENT_LIMIT,
    repro_stage,
    stage_settings,
)

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


def metric_of(checkout: Path, experiment: str, metric: str) -> float | None:
    """``metric`` (``<metrics file>:<key>``, nested keys dotted) as saved in DVC experiment ``experiment``."""
    file, _, key = metric.partition(":")
    ref = _workspace.experiment_ref(checkout, experiment)
    shown = subprocess.run(
        ["git", "show", f"{ref}:{file}"], cwd=checkout, capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        return None
    value: Any = json.loads(shown.stdout)
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _check_metric(metric: str) -> None:
    file, sep, key = metric.partition(":")
    if not sep or not file.endswith(".json") or not key:
        raise PlanError(
            f"metric: expected <metrics file>:<key>, e.g. metrics/retrieval.json:r_mean, got {metric!r}"
        )


@flow(name="sweep", log_prints=True)
def sweep(
    runs: list[dict[str, Any]],
    project_dir: str = ".",
    stages: list[StageName] | None = None,
    metric: str = "metrics/retrieval.json:r_mean",
    goal: Literal["max", "min"] = "max",
    max_concurrent: int | None = None,
    register_best: bool = False,
    register_stages: list[StageName] | None = None,
    deployment: str = "full_pipeline/albef",
    gpus: int = 0,
    deadline_minutes: float | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
) -> dict[str, Any]:
    """Several override sets as concurrent DVC experiments; the best by ``metric`` optionally registered.

    Args:
        runs: One overrides mapping per experiment, e.g. [{"pretrain.lr": 1e-4}, {"pretrain.lr": 3e-4}].
        project_dir: The albef checkout (default: the deployment's working directory).
        stages: What each experiment runs (DVC stages, flows or flow:<flow>); default: every stage.
        metric: How experiments are compared: <metrics file>:<key>, e.g. metrics/retrieval.json:r_mean.
        goal: max or min of the metric.
        max_concurrent: Sets the Prefect global concurrency limit albef-experiments to this many before the
            runs start (empty: leave it as it is; without that limit every run starts at once).
        register_best: Run the register stages on the best experiment (its model through the promotion gate).
        register_stages: The stages that register (default ["register"], the retrieval model).
        deployment: The deployment each experiment runs as.
        gpus: Processes per node of each experiment.
        deadline_minutes: Wall-clock limit of each DVC stage.
        retries: Retries of a crashed, killed or overdue stage.
        retry_delay_seconds: Seconds between retries.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    logger = get_run_logger()
    if not runs or not all(isinstance(r, dict) and r for r in runs):
        raise PlanError("runs: expected a non-empty list of non-empty overrides mappings")
    _check_metric(metric)
    if max_concurrent is not None and max_concurrent < 1:
        raise PlanError(f"max_concurrent: expected 1 or more, got {max_concurrent}")
    plans = [prepare(project_dir, stages, overrides, gpus, workspace="experiment") for overrides in runs]
    checkout = _workspace.describe(plans[0].project).checkout
    if max_concurrent is not None:
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(EXPERIMENT_LIMIT, max_concurrent)
        logger.info("concurrency limit %s: %d experiments at once", EXPERIMENT_LIMIT, max_concurrent)

    children = [
        run_deployment(
            deployment,
            parameters={
                "project_dir": str(checkout),
                "overrides": overrides,
                "stages": stages,
                "workspace": "experiment",
                "keep_workspace": True,  # the best one's outputs are registered from it (then all are removed)
                "gpus": gpus,
                "deadline_minutes": deadline_minutes,
                "retries": retries,
                "retry_delay_seconds": retry_delay_seconds,
            },
            timeout=0,  # started, not awaited: they run concurrently
        )
        for overrides in runs
    ]
    logger.info("started %d experiments: %s", len(children), ", ".join(c.name for c in children))
    try:
        with get_client(sync_client=True) as client:
            while True:
                children = [client.read_flow_run(c.id) for c in children]
                if all(c.state and c.state.type.value in FINAL for c in children):
                    break
                time.sleep(2)
    except BaseException:  # the sweep was cancelled or crashed: so are the experiments it started
        with get_client(sync_client=True) as client:
            for child in children:
                if not (child.state and child.state.type.value in FINAL):
                    client.set_flow_run_state(child.id, Cancelling(), force=True)
        raise

    rows = []
    for overrides, child in zip(runs, children, strict=True):
        experiment = _workspace.experiment_name(child.name, str(child.id))
        ok = child.state.type == StateType.COMPLETED
        value = metric_of(checkout, experiment, metric) if ok else None
        rows.append(
            {
                "experiment": experiment,
                "flow_run": child.name,
                "state": child.state.type.value,
                "overrides": overrides,
                "metric": value,
            }
        )
    scored = [r for r in rows if r["metric"] is not None]
    best = (max if goal == "max" else min)(scored, key=lambda r: r["metric"]) if scored else None
    create_markdown_artifact(
        markdown=_table(rows, metric, best), key="sweep", description="the sweep's experiments"
    )
    if best is None:
        _remove_workspaces(checkout, rows)
        raise PlanError(f"no experiment of the sweep finished with {metric}: {[r['state'] for r in rows]}")
    logger.info("best: %s (%s = %s)", best["experiment"], metric, best["metric"])
    try:
        if register_best:
            best["registered"] = _register(
                checkout, best["experiment"], register_stages, retries, retry_delay_seconds
            )
    finally:
        _remove_workspaces(checkout, rows)
    return {"metric": metric, "best": best, "runs": rows}


def _remove_workspaces(checkout: Path, rows: list[dict[str, Any]]) -> None:
    """The finished experiments' workspaces (a failed one's is kept for inspection)."""
    for row in rows:
        if row["state"] == "COMPLETED":
            _workspace.remove(_workspace.describe(_workspace.workspace_path(checkout, row["experiment"])))


def _register(
    checkout: Path, experiment: str, stages: list[str] | None, retries: int, retry_delay_seconds: float
) -> list[dict[str, Any]]:
    """The register stages in the best experiment's workspace, as its run left it (its params, dvc.lock,
    models and training runs; made again from the experiment's commit if it is gone). Forced: the sweep was
    asked to register the best one, so it goes through the gate even when DVC finds the stage up to date (the
    same model and metrics registered before the sweep)."""
    made = _workspace.create(
        checkout, experiment, get_run_logger(), rev=_workspace.experiment_ref(checkout, experiment)
    )
    plan = prepare(made.path, stages or ["register"], None, workspace="checkout")
    settings = {**stage_settings(plan, made, None, None), "force": True}
    repro = repro_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    with _workspace.checkout_lock(made.path, f"sweep: registering {experiment}", get_run_logger()):
        return [repro(stage, settings) for stage in plan.stages]


def _table(rows: list[dict[str, Any]], metric: str, best: dict[str, Any] | None) -> str:
    lines = [
        "# sweep",
        "",
        f"metric `{metric}`; best: `{best['experiment']}`" if best else f"metric `{metric}`; no result",
        "",
        "| experiment | flow run | state | overrides | metric |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        shown = ", ".join(f"`{k}={v!r}`" for k, v in r["overrides"].items())
        value = "-" if r["metric"] is None else f"{r['metric']:.4g}"
        lines.append(f"| {r['experiment']} | {r['flow_run']} | {r['state']} | {shown} | {value} |")
    lines += ["", "`dvc exp show` lists them; `dvc exp apply <experiment>` brings one into the checkout."]
    return "\n".join(lines) + "\n"
