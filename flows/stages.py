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


@flow(name="data", log_prints=True)
@documented
def data(
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
    """The embedded synthetic benchmark (DVC stage synth)."""
    return run_flow_stages("data", **locals())


@flow(name="preprocess", log_prints=True)
@documented
def preprocess(
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
    """Validation, shards and tokenizer (DVC stage preprocess)."""
    return run_flow_stages("preprocess", **locals())


@flow(name="pretrain", log_prints=True)
@documented
def pretrain(
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
    """The unimodal warm start, then ALBEF pretraining: ITC + ITM + MLM with momentum distillation
    (DVC stages unimodal, pretrain)."""
    return run_flow_stages("pretrain", **locals())


@flow(name="finetune", log_prints=True)
@documented
def finetune(
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
    """Finetuning of the pretrained model for retrieval, VQA, SNLI-VE, NLVR2 and weakly supervised grounding
    (DVC stages finetune_*, with pretrain_nlvr before finetune_nlvr)."""
    return run_flow_stages("finetune", **locals())


@flow(name="evaluate", log_prints=True)
@documented
def evaluate(
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
    """Zero-shot, finetuned and cross-dataset (shifted test set) retrieval, VQA, SNLI-VE, NLVR2 and Grad-CAM
    grounding evaluation (DVC stages evaluate_*)."""
    return run_flow_stages("evaluate", **locals())


@flow(name="register", log_prints=True)
@documented
def register(
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
    """The evaluated models into the MLflow registry, each with the promotion gate (DVC stages register,
    register_vqa, register_ve, register_grounding, register_nlvr), then the one-screen summary."""
    return run_flow_stages("register", **locals())


STAGE_FLOWS = {
    "data": data,
    "preprocess": preprocess,
    "pretrain": pretrain,
    "finetune": finetune,
    "evaluate": evaluate,
    "register": register,
}
