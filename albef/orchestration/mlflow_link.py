"""The pipeline's MLflow parent run, and where each stage's own run is.

The stages open their MLflow runs themselves (``albef.tracking``, the ``mlflow`` section of params.yaml);
when ``ALBEF_MLFLOW_PARENT_RUN_ID`` is set they nest under that run. A flow run therefore opens one parent
run, hands its id to every stage command, and closes it at the end; a retried task or a retried flow run
reuses it (the parent is found again by the flow run's id), so a retry continues the same pipeline run
instead of starting another. Afterwards the flow looks up the run each stage created (tags
``mlflow.parentRunId`` and ``albef.stage``) to link it from Prefect. Nothing is invented: with no
``mlflow`` section, tracking switched off, MLflow missing or the server down, there is no parent and no
link, and the flow says so in its log. Tracking never fails a pipeline.

A flow run that is cancelled (or told to stop by SIGTERM or Ctrl-C) ends its parent run KILLED, not FAILED. A
stage ends its own run, KILLED on SIGTERM (``albef.tracking.run``); a stage process that died without ending it
(SIGKILL, the out-of-memory killer) leaves it RUNNING, and the flow marks it KILLED (:func:`end_orphaned_stage_run`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albef.tracking.journal import KIND_TAG, PARENT_TAG, STAGE_TAG
from albef.tracking.redact import redact, redact_text
from albef.tracking.run import EXPERIMENT_TAG
from albef.tracking.store import ensure_experiment

_log = logging.getLogger(__name__)

FLOW_RUN_TAG = "albef.prefect.flow_run_id"


@dataclass(frozen=True)
class Tracking:
    uri: str
    experiment: str
    ui_url: str | None = None  # where people open the MLflow UI (an http tracking URI is its own UI)
    artifact_location: str | None = None  # for a new experiment (mlflow.artifact_location)
    project: str | None = None  # the stages' working directory

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        """The run's page in the UI: at ``ui_url``, else at an http(s) tracking URI without its user info (a link
        shown in Prefect must not carry credentials; the browser asks for them)."""
        base = self.ui_url or (self.uri if self.uri.startswith(("http://", "https://")) else None)
        base = re.sub(r"^(https?://)[^/@]*@", r"\1", base).rstrip("/") if base else None
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if base else None


def tracking(params: dict[str, Any], project: str | Path, ui_url: str | None = None) -> Tracking | None:
    """The stages' tracking settings (None when they do not track)."""
    section = params.get("mlflow")
    if not isinstance(section, dict) or not section.get("enabled", True):
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or section.get("tracking_uri") or "sqlite:///mlflow.db"
    # a relative sqlite/file store is relative to the stages' working directory, the project
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme) and not uri[len(scheme) :].startswith("/"):
            uri = f"{scheme}{(Path(project) / uri[len(scheme) :]).resolve()}"
    return Tracking(
        uri,
        str(section.get("experiment") or "albef"),
        ui_url,
        section.get("artifact_location"),
        str(Path(project).resolve()),
    )


def _client(cfg: Tracking):
    # MLflow's defaults (7 retries, 120 s timeouts) would hold a flow for minutes on a dead server
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.uri)


def open_parent_run(
    cfg: Tracking | None,
    flow_run_id: str,
    name: str,
    logger=None,
    *,
    request: dict[str, Any] | None = None,
    experiment: str | None = None,
) -> str | None:
    """The pipeline's parent run for this flow run: found again on a retry, else created. ``request``: what the
    flow run was asked (stages, overrides, workspace ...), logged as its params (overrides as
    ``override.<key>``); ``experiment``: the DVC experiment it is saved as (tag albef.dvc_experiment)."""
    log = logger or _log
    if cfg is None:
        log.info("mlflow: the stages do not track (no mlflow section, or enabled: false): no parent run")
        return None
    try:
        client = _client(cfg)
        # as the stages create it: their artifact location, portable in the embedded store
        exp_id = ensure_experiment(client, cfg.uri, cfg.experiment, cfg.artifact_location, cfg.project)
        found = client.search_runs(
            [exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("mlflow: continuing parent run %s of flow run %s", run_id, flow_run_id)
            return run_id
        tags = {KIND_TAG: "pipeline", "albef.orchestrator": "prefect", FLOW_RUN_TAG: flow_run_id}
        if experiment:
            tags[EXPERIMENT_TAG] = experiment
        run = client.create_run(exp_id, run_name=name, tags=tags)
        params = request_params(request or {})
        if params:
            from mlflow.entities import Param

            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        log.info("mlflow: parent run %s at %s", run.info.run_id, redacted(cfg.uri))
        return run.info.run_id
    except Exception as exc:  # tracking never stops the pipeline
        log.warning(
            "mlflow: no parent run (%s: %s); stages track on their own",
            type(exc).__name__,
            redacted(str(exc)),
        )
        return None


def running_parent_runs(cfg: Tracking | None, logger=None) -> dict[str, str]:
    """The pipeline parent runs still RUNNING: ``{flow run id: MLflow run id}`` (empty when tracking is off or
    the store cannot be read)."""
    if cfg is None:
        return {}
    found = _search_runs(
        cfg,
        f"tags.`{KIND_TAG}` = 'pipeline' and attributes.status = 'RUNNING'",
        "list the running pipeline runs",
        logger,
        max_results=500,
    )
    return {r.data.tags[FLOW_RUN_TAG]: r.info.run_id for r in found if r.data.tags.get(FLOW_RUN_TAG)}


def _search_runs(cfg: Tracking, filter_string: str, what: str, logger=None, **kwargs: Any) -> list:
    """The runs of the stages' experiment that match ``filter_string`` (none when it does not exist yet, or
    when the store cannot be read: then a warning that it could not ``what``)."""
    try:
        client = _client(cfg)
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=filter_string, **kwargs)
    except Exception as exc:
        (logger or _log).warning("mlflow: could not %s: %s", what, redacted(str(exc)))
        return []


def request_params(request: dict[str, Any]) -> dict[str, str]:
    """A flow run's request as MLflow params: ``{"overrides": {"evaluate.k_test": 4}, "stages": ["evaluate"]}``
    -> ``{"override.evaluate.k_test": "4", "stages": "evaluate"}`` (None values left out; secrets, such as an
    override of a key named like one or a URI's password, as ``***``: :mod:`albef.tracking.redact`)."""
    out: dict[str, str] = {}
    for key, value in redact(request).items():
        if value is None:
            continue
        if key == "overrides":
            for name, sub in _flat(value).items():
                out[f"override.{name}"] = json.dumps(sub) if not isinstance(sub, str) else sub
        elif isinstance(value, list | tuple):
            out[key] = ",".join(map(str, value))
        else:
            out[key] = str(value)
    return {k: v[:6000] for k, v in out.items()}


# ``text`` (a tracking URI, an error message) with the credentials of its URIs redacted: what logs and Prefect
# artifacts show
redacted = redact_text


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def close_parent_run(cfg: Tracking | None, run_id: str | None, status: str, logger=None) -> None:
    if cfg is not None and run_id:
        _terminate(cfg, run_id, status, f"parent run {run_id}", logger)


def _terminate(cfg: Tracking, run_id: str, status: str, what: str, logger=None) -> bool:
    """End run ``run_id`` with ``status``; False, with a warning naming ``what``, when the store refuses."""
    try:
        _client(cfg).set_terminated(run_id, status)
    except Exception as exc:
        (logger or _log).warning("mlflow: could not mark %s %s: %s", what, status, redacted(str(exc)))
        return False
    return True


def ending_status(exc: BaseException) -> str:
    """How a flow run that raised ``exc`` ends its parent run: KILLED when it was stopped from outside (a
    cancelled flow run, SIGTERM, Ctrl-C, a stage stopped by a signal to its supervisor), else FAILED."""
    from albef.orchestration.process import StageFailed
    from albef.orchestration.supervise import TERMINATED_STATUS

    stopped: tuple[type[BaseException], ...] = (KeyboardInterrupt,)
    try:
        from prefect.exceptions import CancelledRun, ExternalSignal  # ExternalSignal: TerminationSignal

        stopped += (CancelledRun, ExternalSignal)
    except ImportError:
        pass
    if isinstance(exc, stopped) or (isinstance(exc, StageFailed) and exc.status == TERMINATED_STATUS):
        return "KILLED"
    return "FAILED"


def end_orphaned_stage_run(
    cfg: Tracking | None, parent_id: str | None, stage: str, status: str = "KILLED", logger=None
) -> str | None:
    """After a stage process ended without success: its run, if it is still RUNNING, ends with ``status``.
    A stage ends its own run on any error or SIGTERM, so a run left RUNNING belongs to a process that was
    killed outright (SIGKILL). A retry continues the run all the same. Returns the run id it ended."""
    ref = find_stage_run(cfg, parent_id, stage, logger)
    if ref is None or ref.status != "RUNNING":
        return None
    if not _terminate(cfg, ref.run_id, status, f"the run {ref.run_id} of stage {stage}", logger):
        return None
    (logger or _log).info(
        "mlflow: the run %s of stage %s was left RUNNING by its process; now %s", ref.run_id, stage, status
    )
    return ref.run_id


@dataclass(frozen=True)
class StageRunRef:
    run_id: str
    experiment_id: str
    url: str | None
    status: str = "FINISHED"  # RUNNING (or FAILED, KILLED) when its attempt was interrupted


def find_stage_run(
    cfg: Tracking | None, parent_id: str | None, stage: str, logger=None
) -> StageRunRef | None:
    """The newest run stage ``stage`` opened under ``parent_id`` (None: there is none to link)."""
    if cfg is None or not parent_id:
        return None
    found = _search_runs(
        cfg,
        f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{STAGE_TAG}` = '{stage}'",
        f"look up the run of stage {stage}",
        logger,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not found:
        return None
    info = found[0].info
    return StageRunRef(
        info.run_id, info.experiment_id, cfg.run_url(info.experiment_id, info.run_id), info.status
    )
