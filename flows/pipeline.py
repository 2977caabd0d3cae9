"""``full_pipeline``: the stage flows in pipeline order, as subflows of one flow run.

Everything is checked before the first stage runs: stage names, ``params.yaml`` overrides (written once,
here), GPUs. The flow then opens the pipeline's MLflow parent run (when the stages track), calls each stage
flow for its DVC stages with that run's id, closes the parent run, and publishes a summary table.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from albef.orchestration import mlflow_link
from albef.orchestration.pipeline import FLOW_STAGES, flow_of, prepare
from flows.stages import STAGE_FLOWS
from flows.tasks import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS


@flow(name="full_pipeline", log_prints=True)
def full_pipeline(
    project_dir: str = ".",
    stages: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    gpus: int = 0,
    nodes: int = 1,
    rdzv_endpoint: str | None = None,
    deadline_minutes: float | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
) -> list[dict[str, Any]]:
    """data -> preprocess -> pretrain -> finetune -> evaluate -> register, each through DVC.

    ``stages``: flow names (data, preprocess, pretrain, finetune, evaluate, register) or DVC stage names;
    default every stage dvc.yaml declares. ``overrides``: params.yaml keys, ``{"pretrain.epochs": 5}``.
    ``gpus`` per node (0: one process), ``nodes`` + ``rdzv_endpoint`` for several nodes.
    ``deadline_minutes`` per DVC stage; ``retries`` for crashed, killed or overdue stages (they resume).
    """
    logger = get_run_logger()
    plan = prepare(project_dir, stages, overrides, gpus, nodes, rdzv_endpoint)
    for key, (old, new) in plan.changed.items():
        logger.info("params.yaml: %s = %r (was %r)", key, new, old)
    logger.info("stages: %s", ", ".join(plan.stages))
    cfg = mlflow_link.tracking(plan.params, plan.project)
    parent = mlflow_link.open_parent_run(cfg, str(flow_run.id), f"prefect-{flow_run.name}", logger)
    results: list[dict[str, Any]] = []
    try:
        for name in FLOW_STAGES:
            chosen = [s for s in plan.stages if flow_of(s, plan.declared) == name]
            if not chosen:
                continue
            results += STAGE_FLOWS[name](
                project_dir=str(plan.project),
                stages=chosen,
                gpus=gpus,
                nodes=nodes,
                rdzv_endpoint=rdzv_endpoint,
                deadline_minutes=deadline_minutes,
                retries=retries,
                retry_delay_seconds=retry_delay_seconds,
                mlflow_parent_run_id=parent,
            )
    except BaseException as exc:  # KILLED when the flow run was cancelled
        mlflow_link.close_parent_run(cfg, parent, mlflow_link.ending_status(exc), logger)
        raise
    mlflow_link.close_parent_run(cfg, parent, "FINISHED", logger)
    create_markdown_artifact(
        markdown=_summary(results, plan.changed, parent),
        key="full-pipeline-summary",
        description="every stage of the pipeline run",
    )
    return results


def _summary(results: list[dict[str, Any]], changed: dict[str, Any], parent: str | None) -> str:
    lines = ["# full_pipeline", ""]
    if changed:
        lines.append("params.yaml overrides: " + ", ".join(f"`{k}={v[1]!r}`" for k, v in changed.items()))
        lines.append("")
    if parent:
        lines += [f"MLflow parent run: `{parent}`", ""]
    lines += [
        "| stage | attempts | seconds | resumed from step | up to date | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['stage']} | {r['attempt']} | {r['seconds']} | {r.get('resumed_from_step') or '-'} | "
            f"{'yes' if r.get('up_to_date') else 'no'} | {r.get('mlflow_run_id') or '-'} |"
        )
    return "\n".join(lines) + "\n"
