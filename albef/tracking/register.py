"""The ``register`` stages: log an evaluated model as a pyfunc, register it, run the gate.

``register`` registers the retrieval model; ``register_vqa``, ``register_ve`` and ``register_nlvr`` the other
tasks' (:data:`albef.tracking.config.REGISTER_SECTIONS`), all the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from albef.io import write_json
from albef.tracking.config import register_config, tracking_config
from albef.tracking.integrity import MANIFEST_TAG, seal
from albef.tracking.provenance import git_state, provenance_tags
from albef.tracking.redact import redact_uri
from albef.tracking.registry import Registry, RegistryError, gate_metric, read_metrics
from albef.tracking.run import stage_run

log = logging.getLogger(__name__)


def register_stage(
    params: dict[str, Any], out: str | Path | None = None, task: str = "retrieval"
) -> dict[str, Any]:
    """Register the ``task`` model of ``model_dir`` (section ``register``, ``register_<task>``) with the metrics
    of ``metrics`` as a new version of ``model_name``; it becomes ``challenger``, and ``champion`` when the
    gate passes. Writes a summary to ``out`` (for DVC) and returns it."""
    import mlflow

    from albef.serving.tasks import log_task_model, serving_config

    cfg = register_config(params, task)
    settings = serving_config(params, task)
    tracking = tracking_config(params)
    if not tracking.enabled:
        summary: dict[str, Any] = {"registered": False, "reason": "mlflow.enabled is false"}
        if out:
            write_json(out, summary)
        return summary
    metrics = read_metrics(cfg.metrics)
    # a missing gate metric fails before any upload
    value = gate_metric(metrics, cfg.gate, str(cfg.metrics), section=cfg.section)
    uri = tracking.resolved_uri()
    registry = Registry(cfg, uri)
    registry.evaluate_gate(value)  # so does an unusable champion

    provenance = provenance_tags([cfg.model_dir, cfg.metrics])
    git = git_state()
    section = params.get(cfg.section) or {}
    with stage_run(params, cfg.section, tags=provenance, log_params={cfg.section: section}) as run:
        if run is None or run.run_id is None:
            raise RegistryError(
                f"the registry at {redact_uri(uri)} is unreachable; rerun `albef register --task {task}` "
                "when it answers"
            )
        with _fluent_uri(uri), mlflow.start_run(run_id=run.run_id):
            info = log_task_model(task, cfg.model_dir, name="model", **settings)
            sealed = seal(info.model_uri)  # what the artifact store now holds, checked before any later load
        tags = {
            MANIFEST_TAG: sealed,
            "data_version": provenance["albef.data_version"],
            "git_commit": git.get("commit", "unknown"),
            "git_dirty": git.get("dirty", "unknown"),
            "source_run_id": run.run_id,
            "model_dir": str(cfg.model_dir),
        }
        version, decision = registry.register(
            info.model_uri, metrics, tags, run_id=run.run_id, model_id=info.model_id
        )
        summary = {
            "registered": True,
            "task": task,
            "model_name": cfg.model_name,
            "version": int(version.version),
            "aliases": sorted(version.aliases),
            "promoted": decision.promote,
            "reason": decision.reason,
            "gate_metric": cfg.gate.metric,
            "gate_value": value,
            "champion_before": decision.champion_version,
            "model_uri": info.model_uri,
        }
        run.log_metrics({f"eval.{k}": v for k, v in metrics.items()})
        run.set_tags(
            {
                "promotion_decision": "promoted" if decision.promote else "rejected",
                "promotion_reason": decision.reason,
                "registered_version": version.version,
            }
        )
        run.log_dict(summary, "register.json")
    if out:
        write_json(out, summary)
    return summary


@contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """``mlflow.pyfunc.log_model`` only speaks to the global (fluent) tracking URI: point it at ``uri`` for the
    upload and restore what was there, so a caller in the same process (a Prefect flow) keeps its own. MLflow
    also exports both URIs as environment variables (for subprocesses); those are restored as well, or every
    process started afterwards would inherit this store."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    old_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = old_tracking, old_registry
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
