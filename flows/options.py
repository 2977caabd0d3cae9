"""The parameters every albef flow takes, defined and described once: :func:`flow_parameters` is the one
signature of every flow (:func:`flow_function` gives it to each), and the Prefect run form shows these
descriptions (from the flows' docstrings, where :func:`documented` puts them) and offers the stage names as a
list to pick from."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from albef.orchestration.pipeline import MODES, dvc_stages, stage_choices
from flows.tasks import DEFAULT_RETRIES, DEFAULT_RETRY_DELAY_SECONDS

# The names `stages` accepts, read from the dvc.yaml beside flows/ (the checkout the deployments run in).
STAGE_NAMES = tuple(stage_choices(dvc_stages(Path(__file__).resolve().parents[1])))
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]
WorkspaceMode = Literal[MODES]  # type: ignore[valid-type]

PARAMETERS = """\
Args:
    project_dir: The albef checkout to run in (default: the deployment's working directory, the checkout
        `prefect deploy` ran from).
    overrides: params.yaml keys to change for this run only, e.g. {"pretrain.epochs": 5, "evaluate.k_test":
        64}. Unknown keys and invalid values fail at the start. A run with overrides works in a workspace of
        its own and ends as a DVC experiment (`dvc exp show`); the checkout's params.yaml is never changed.
    stages: DVC stages (with what they need), flows, or flow:<flow>, e.g. ["evaluate_retrieval"] or
        ["flow:register"]; a name that is both a DVC stage and a flow (preprocess, pretrain, register) is the
        DVC stage. Default: every stage of this flow.
    workspace: auto (a DVC experiment workspace with overrides, else the checkout), experiment (always a
        workspace of its own, saved as a DVC experiment), checkout (the checkout itself: no overrides; a
        second such run waits for the first).
    keep_workspace: Keep an experiment's workspace (.dvc/tmp/albef-workspaces/<name>) after it is saved;
        a failed run's workspace is always kept.
    gpus: Processes per node, one per GPU (0: one process, on the CPU or the one visible GPU). A worker with
        fewer GPUs fails at the start.
    nodes: Nodes taking part (several: torchrun with rdzv_endpoint).
    rdzv_endpoint: host:port of the first node, for several nodes.
    deadline_minutes: Wall-clock limit of each DVC stage; its processes are stopped when it passes (then
        retried, resuming from the last checkpoint).
    retries: Retries of a crashed, killed or overdue stage (a stage that reports an error is not retried).
    retry_delay_seconds: Seconds between retries.
    mlflow_parent_run_id: The MLflow run to nest the stages' runs under (full_pipeline sets it; leave
        empty).
"""


def documented(fn):
    """Append the shared parameter descriptions to a flow function's docstring (apply below @flow)."""
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n\n" + textwrap.indent(PARAMETERS, "    ")
    return fn


def flow_parameters(
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
) -> dict[str, Any]:
    """The parameters of a flow run, every one of them (the defaults filled in)."""
    return dict(locals())


def flow_function(
    name: str, summary: str, body: Callable[..., list[dict[str, Any]]], nested: bool = True
) -> Callable[..., list[dict[str, Any]]]:
    """A flow function ``name`` with :func:`flow_parameters`' signature (without ``mlflow_parent_run_id`` unless
    ``nested``: a run that opens the pipeline's MLflow run itself takes none) and ``summary`` with the shared
    parameter descriptions as its docstring; it calls ``body(**parameters)`` with every parameter. Prefect reads
    the signature and the docstring for its run form; apply ``@flow`` to the result."""
    signature = inspect.signature(flow_parameters, eval_str=True)
    kept = [p for p in signature.parameters.values() if nested or p.name != "mlflow_parent_run_id"]
    signature = signature.replace(parameters=kept, return_annotation=list[dict[str, Any]])

    def run(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(**bound.arguments)

    run.__signature__ = signature  # type: ignore[attr-defined]
    run.__name__ = run.__qualname__ = name
    run.__doc__ = summary
    return documented(run)
