"""One MLflow run per pipeline stage, nested under one parent run per pipeline run.

How the stages of one pipeline find the same parent, although DVC runs each in its own process:

1. ``ALBEF_MLFLOW_PARENT_RUN_ID`` set (an orchestrator such as the Prefect flow created the parent): the
   stage runs nest under it, and its status stays the orchestrator's business.
2. Otherwise a *pipeline key* names the pipeline run: ``ALBEF_MLFLOW_PIPELINE`` when set, else a digest
   of the git commit, the uncommitted changes to tracked Python files and the params. Every stage of one
   ``dvc repro`` (or ``dvc exp run -S ...``) computes the same key; a change of code or params gives a new
   one. The parent is the newest run tagged ``albef.pipeline=<key>``, created by the first stage that
   finds none. Each stage marks it RUNNING when it starts and FINISHED/FAILED when it ends.

Only the main process logs (rank 0 under torchrun or SLURM). Tracking never stops training: every call
goes through a local journal (:mod:`albef.tracking.journal`) and is delivered when the store answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from albef.tracking.config import TrackingConfig, tracking_config
from albef.tracking.journal import PIPELINE_TAG, STAGE_TAG, Deliverer, Journal, now_ms
from albef.tracking.provenance import flatten, git_state, library_versions, numeric_items

log = logging.getLogger(__name__)

PARENT_ENV = "ALBEF_MLFLOW_PARENT_RUN_ID"
# Set by an orchestrator retrying an interrupted stage (the Prefect flows): continue that attempt's run
# instead of opening a second one.
STAGE_RUN_ENV = "ALBEF_MLFLOW_STAGE_RUN_ID"
PIPELINE_ENV = "ALBEF_MLFLOW_PIPELINE"
MAX_PARAM_LENGTH = 6000  # MLflow's limit for a param value


def pipeline_key(params: dict[str, Any], cwd: str | Path | None = None) -> str:
    """The name shared by every stage of one pipeline run (see the module docstring)."""
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    git = git_state(cwd)
    try:
        diff = subprocess.run(
            ["git", "diff", "HEAD", "--", "*.py"], cwd=git.get("root", "."), capture_output=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        diff = b""
    material = json.dumps(
        {"commit": git.get("commit", "no-git"), "diff": hashlib.sha256(diff).hexdigest(), "params": params},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _is_main_process() -> bool:
    from albef.train.distributed import world_info_from_env

    return world_info_from_env().is_main


class StageRun:
    """The MLflow run of one stage. Every method is safe to call whatever the store's state."""

    def __init__(self, cfg: TrackingConfig, stage: str, tracking_uri: str, journal: Journal):
        self.cfg, self.stage, self.uri, self.journal = cfg, stage, tracking_uri, journal
        self.ref, self.parent_ref = "stage", "parent"
        self._deliverer: Deliverer | None = None
        self._next_attempt = 0.0
        self._offline = False
        self._ended = False
        self._ids: dict[str, str] = {}  # local reference -> MLflow run id, as delivered so far

    # -- recording ----------------------------------------------------------------------------------------
    def _record(self, op: dict[str, Any]) -> None:
        self.journal.append(op)
        self.pump()

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {mlflow_name(k): _param_value(v) for k, v in flatten(params).items()}
        items = sorted(flat.items())
        for start in range(0, len(items), 100):
            self._record({"op": "log", "ref": self.ref, "params": dict(items[start : start + 100])})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self._record(
                {"op": "log", "ref": self.ref, "tags": {mlflow_name(k): str(v) for k, v in tags.items()}}
            )

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        values = numeric_items(flatten(metrics))
        if values:
            ts = now_ms()
            self._record(
                {
                    "op": "log",
                    "ref": self.ref,
                    "metrics": [[mlflow_name(k), v, ts, int(step)] for k, v in sorted(values.items())],
                }
            )

    def on_log(self, step: int, row: dict[str, float]) -> None:
        """The :class:`~albef.train.engine.Trainer` hook: every loss term, lr, alpha, temperature,
        throughput and validation metric, at its optimisation step."""
        self.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)

    def log_artifact(self, path: str | Path | None, artifact_path: str | None = None) -> None:
        if not self.cfg.log_artifacts or not path or not Path(path).exists():
            return
        copy = self.journal.snapshot(path)
        self._record({"op": "artifact", "ref": self.ref, "path": str(copy), "artifact_path": artifact_path})

    def log_dict(self, data: dict[str, Any], name: str, artifact_path: str | None = None) -> None:
        """``data`` as a JSON artifact called ``name``."""
        if not self.cfg.log_artifacts:
            return
        target = self.journal.files_dir / uuid.uuid4().hex[:8] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        self._record({"op": "artifact", "ref": self.ref, "path": str(target), "artifact_path": artifact_path})

    # -- delivery -----------------------------------------------------------------------------------------
    def pump(self, force: bool = False) -> bool:
        """Deliver what is pending unless the store failed less than ``retry_every`` seconds ago.
        Returns True when nothing is left to deliver."""
        if not force and time.monotonic() < self._next_attempt:
            return False
        try:
            self._deliverer = self._deliverer or Deliverer(self.uri)
            left, error = self._deliverer.deliver(self.journal)
        except Exception as exc:  # the client could not even be built (e.g. a sqlite file it cannot open)
            left, error = self.journal.pending(), exc
        self._ids = self.journal.read_state().ids
        if left:
            self._next_attempt = time.monotonic() + self.cfg.retry_every
            if not self._offline:
                log.warning(
                    "mlflow: tracking server %s unavailable (%s); training continues, %d call(s) kept in %s and "
                    "retried every %.0f s (or run `albef mlflow sync`)",
                    self.uri,
                    _short_error(error),
                    left,
                    self.journal.path,
                    self.cfg.retry_every,
                )
            self._offline = True
            return False
        if self._offline:
            log.warning("mlflow: tracking server %s is back; the kept calls were delivered", self.uri)
        self._offline = False
        return True

    @property
    def run_id(self) -> str | None:
        """The MLflow id of this stage's run, once delivered."""
        return self._ids.get(self.ref)

    @property
    def parent_run_id(self) -> str | None:
        return self._ids.get(self.parent_ref)

    def finish(self, status: str = "FINISHED", owns_parent: bool = True) -> bool:
        """End the run (and mark the pipeline's parent with the same status) and try once more to deliver
        everything. Returns True when all was delivered; else the journal waits for `albef mlflow sync`."""
        if self._ended:
            return True
        self._ended = True
        end = now_ms()
        self.journal.append({"op": "end", "ref": self.ref, "status": status, "end_time": end})
        self.journal.append(
            {
                "op": "parent_status",
                "ref": self.parent_ref,
                "status": status,
                "end_time": end,
                "owned": owns_parent,
            }
        )
        delivered = self.pump(force=True)
        self.journal.unlock()
        if delivered:
            self.journal.remove()
        else:
            log.warning(
                "mlflow: %d tracking call(s) of stage %s not delivered; they are kept in %s. Run "
                "`albef mlflow sync` when %s is reachable.",
                self.journal.pending(),
                self.stage,
                self.journal.path,
                self.uri,
            )
        return delivered


_NAME_UNSAFE = re.compile(r"[^\w.\- :/]")


def mlflow_name(key: str) -> str:
    """``key`` as a name MLflow accepts for a param, metric or tag: it refuses a whole batch over one character
    outside ``[A-Za-z0-9_.- :/]`` (e.g. the ``+`` of ``refcoco+_train.json``), so such characters become ``_``."""
    return _NAME_UNSAFE.sub("_", key)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _short_error(error: BaseException | None) -> str:
    text = str(error or "unknown error").splitlines()[0]
    return text if len(text) < 300 else text[:297] + "..."


def _limit_client_waits(cfg: TrackingConfig) -> None:
    # MLflow's defaults (7 retries with exponential backoff, 120 s timeouts) make one call to a dead server
    # block for minutes; a stage tolerates the outage through its journal instead. Explicit settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.request_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # The CLI prints the stage's metrics as JSON on stdout; MLflow's "View run at" lines would break it.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def start_stage_run(
    params: dict[str, Any],
    stage: str,
    *,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    log_params: dict[str, Any] | None = None,
    pipeline_params: dict[str, Any] | None = None,
) -> StageRun | None:
    """Open the MLflow run of ``stage`` (None when tracking is off or this is not the main process).

    ``pipeline_params``: the params that name the pipeline run (default ``params``), for a stage that runs on
    an adjusted copy of params.yaml (``--test-file``) and must still nest under the pipeline's parent run."""
    cfg = tracking_config(params)
    if not cfg.enabled or not _is_main_process():
        return None
    uri = cfg.resolved_uri()  # a malformed URI fails here, before any work
    _limit_client_waits(cfg)
    journal = Journal.create(cfg.spool_dir, stage)
    journal.lock()
    run = StageRun(cfg, stage, uri, journal)
    git = git_state()
    parent_id = os.environ.get(PARENT_ENV)
    key = pipeline_key(params if pipeline_params is None else pipeline_params)
    start = now_ms()
    journal.append(
        {
            "op": "parent",
            "ref": run.parent_ref,
            "run_id": parent_id,
            "experiment": cfg.experiment,
            "artifact_location": cfg.artifact_location,
            "key": key,
            "name": f"pipeline-{key[:8]}",
            "start_time": start,
            "tags": {
                "albef.kind": "pipeline",
                **({"mlflow.source.git.commit": git["commit"]} if git.get("commit") else {}),
            },
        }
    )
    run_tags = {
        STAGE_TAG: stage,
        PIPELINE_TAG: key,
        "albef.kind": "stage",
        **{f"albef.git.{k}": v for k, v in git.items()},
        **({"mlflow.source.git.commit": git["commit"]} if git.get("commit") else {}),
        **{f"albef.lib.{k}": v for k, v in library_versions().items()},
        **(tags or {}),
    }
    journal.append(
        {
            "op": "run",
            "ref": run.ref,
            "run_id": os.environ.get(STAGE_RUN_ENV) or None,
            "parent": run.parent_ref,
            "experiment": cfg.experiment,
            "artifact_location": cfg.artifact_location,
            "name": run_name or f"{stage}-{uuid.uuid4().hex[:6]}",
            "start_time": start,
            "tags": {k: str(v) for k, v in run_tags.items()},
        }
    )
    run.log_params(log_params if log_params is not None else params)
    run.pump(force=True)
    if run.run_id:
        log.info("mlflow: stage %s logs to run %s at %s", stage, run.run_id, uri)
    return run


@contextmanager
def stage_run(params: dict[str, Any], stage: str, **kwargs: Any) -> Iterator[StageRun | None]:
    """``with stage_run(params, "pretrain") as run:`` opens the run, and ends it FINISHED, or FAILED when
    the body raises (the error propagates)."""
    run = start_stage_run(params, stage, **kwargs)
    owns_parent = not os.environ.get(PARENT_ENV)
    try:
        yield run
    except BaseException:
        if run is not None:
            run.finish("FAILED", owns_parent)
        raise
    if run is not None:
        run.finish("FINISHED", owns_parent)
