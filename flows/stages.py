"""One Prefect flow per pipeline stage. Each runs its DVC stage(s) through ``dvc repro`` (see
``flows/tasks.py``); the stage logic lives in ``albef`` and ``dvc.yaml``, never here.

=============  ================================================================
flow           DVC stages
=============  ================================================================
``data``       ``synth``
``preprocess`` ``preprocess``
``pretrain``   ``unimodal``, ``pretrain``
``finetune``   ``finetune_*`` (retrieval, VQA, SNLI-VE, NLVR2, weakly supervised grounding; and
               ``pretrain_nlvr``, the prerequisite of ``finetune_nlvr``)
``evaluate``   ``evaluate_*`` (zero-shot, finetuned and shifted-test-set retrieval, VQA, SNLI-VE, NLVR2,
               Grad-CAM grounding)
``register``   ``register``, ``register_*`` (one per task's model), ``summary`` (one screen of results)
=============  ================================================================

Parameters, the same for every flow, are described in ``flows/options.py`` (the Prefect run form shows them).
A run with ``overrides`` works in a workspace of its own and ends as a DVC experiment; the checkout's
``params.yaml`` is never written (``albef.orchestration.workspace``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.options import StageName, WorkspaceMode, documented
from flows.tasks import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS, run_flow_stages


def stage_flow(flow_name: str, summary: str):
    """The flow ``flow_name``: its DVC stages (the table above) through :func:`flows.tasks.run_flow_stages`,
    with the parameters every stage flow takes (described in ``flows/options.py``). One definition for the
    six: the Prefect run form reads each one's signature and docstring, which are this function's."""

    def run(
        project_dir: str = ".",
        overrides: dict[str, Any] | None = None,
        stages: list[StageName] | None = None,
        workspace: WorkspaceMode = "auto",
        keep_workspace: bool = False,
        gpus: int = 0,
        nodes: int = 1,
        rdzv_endpoint: str | None = None,
        deadline_minutes: float | None = None,
        retries: int = DEFAULT_RETRIES,
        retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
        mlflow_parent_run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        # the parameters as passed (locals() also holds flow_name, the closure's variable)
        options = {k: v for k, v in locals().items() if k != "flow_name"}
        return run_flow_stages(flow_name, **options)

    run.__name__ = run.__qualname__ = flow_name
    run.__doc__ = summary
    return flow(name=flow_name, log_prints=True)(documented(run))


data = stage_flow("data", "The embedded synthetic benchmark (DVC stage synth).")
preprocess = stage_flow("preprocess", "Validation, shards and tokenizer (DVC stage preprocess).")
pretrain = stage_flow(
    "pretrain",
    "The unimodal warm start, then ALBEF pretraining: ITC + ITM + MLM with momentum distillation (DVC stages "
    "unimodal, pretrain).",
)
finetune = stage_flow(
    "finetune",
    "Finetuning of the pretrained model for retrieval, VQA, SNLI-VE, NLVR2 and weakly supervised grounding "
    "(DVC stages finetune_*, with pretrain_nlvr before finetune_nlvr).",
)
evaluate = stage_flow(
    "evaluate",
    "Zero-shot, finetuned and cross-dataset (shifted test set) retrieval, VQA, SNLI-VE, NLVR2 and Grad-CAM "
    "grounding evaluation (DVC stages evaluate_*).",
)
register = stage_flow(
    "register",
    "The evaluated models into the MLflow registry, each with the promotion gate (DVC stages register, "
    "register_vqa, register_ve, register_grounding, register_nlvr), then the one-screen summary.",
)

STAGE_FLOWS = {
    "data": data,
    "preprocess": preprocess,
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate,
    "register": register,
}
