"""``full_pipeline``: the stage flows in pipeline order, as subflows of one flow run.

Everything is checked before the first stage runs: stage names, ``params.yaml`` overrides, GPUs. With
overrides the run works in a workspace of its own (written there, never into the checkout) and ends as a
DVC experiment. The flow then opens the pipeline's MLflow parent run (when the stages track), calls each stage
flow for its DVC stages with that run's id, closes the parent run, and publishes a summary table.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from albef.orchestration import mlflow_link
from albef.orchestration.pipeline import FLOW_STAGES, flow_of, prepare
from albef.orchestration.workspace import describe
from flows.options import flow_function
from flows.stages import STAGE_FLOWS
from flows.tasks import end_runs_of_dead_flow_runs, flow_workspace


def _full_pipeline(
    project_dir: str,
    stages: list[str] | None,
    overrides: dict[str, Any] | None,
    workspace: str,
    keep_workspace: bool,
    **launch: Any,  # gpus, nodes, rdzv_endpoint, deadline and retries: passed on to every stage flow
) -> list[dict[str, Any]]:
    logger = get_run_logger()
    placement = (launch["gpus"], launch["nodes"], launch["rdzv_endpoint"])
    plan = prepare(project_dir, stages, overrides, *placement, workspace=workspace)
    logger.info("stages: %s", ", ".join(plan.stages))
    cfg = mlflow_link.tracking(plan.params, describe(plan.project).checkout)
    results: list[dict[str, Any]] = []
    with flow_workspace(plan, overrides, keep_workspace, logger) as where:
        end_runs_of_dead_flow_runs(cfg, logger)
        parent = mlflow_link.open_parent_run(
            cfg,
            str(flow_run.id),
            f"prefect-{flow_run.name}",
            logger,
            request={
                "flow": "full_pipeline",
                "stages": plan.stages,
                "overrides": overrides,
                "workspace": plan.mode,
            },
            experiment=where.experiment,
        )
        try:
            for name in FLOW_STAGES:
                chosen = [s for s in plan.stages if flow_of(s, plan.declared) == name]
                if not chosen:
                    continue
                results += STAGE_FLOWS[name](
                    project_dir=str(where.path),
                    stages=chosen,
                    workspace="checkout",  # the workspace this flow run works in
                    mlflow_parent_run_id=parent,
                    **launch,
                )
        except BaseException as exc:  # KILLED when the flow run was cancelled
            mlflow_link.close_parent_run(cfg, parent, mlflow_link.ending_status(exc), logger)
            raise
    mlflow_link.close_parent_run(cfg, parent, "FINISHED", logger)
    create_markdown_artifact(
        markdown=_summary(results, plan.changed, parent, where.experiment),
        key="full-pipeline-summary",
        description="every stage of the pipeline run",
    )
    return results


full_pipeline = flow(name="full_pipeline", log_prints=True)(
    flow_function(
        "full_pipeline",
        "data -> preprocess -> pretrain -> finetune -> evaluate -> register, each through DVC, as subflows of "
        "this flow run, in the checkout or (with overrides) in a workspace of its own saved as a DVC experiment.",
        _full_pipeline,
        nested=False,  # it opens the pipeline's MLflow run itself
    )
)


def _summary(
    results: list[dict[str, Any]], changed: dict[str, Any], parent: str | None, experiment: str | None
) -> str:
    lines = ["# full_pipeline", ""]
    if changed:
        lines.append("overrides: " + ", ".join(f"`{k}={v[1]!r}`" for k, v in changed.items()))
        lines.append("")
    if experiment:
        lines += [f"DVC experiment: `{experiment}` (`dvc exp show`, `dvc exp apply {experiment}`)", ""]
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
