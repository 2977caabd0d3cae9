"""One MLflow run per pipeline stage, nested under one parent run per pipeline run.

How the stages of one pipeline find the same parent, although DVC runs each in its own process:

1. ``ALBEF_MLFLOW_PARENT_RUN_ID`` set (an orchestrator such as the Prefect flow created the parent): the
   stage runs nest under it, and its status stays the orchestrator's business.
2. Otherwise a *pipeline key* names the pipeline run: ``ALBEF_MLFLOW_PIPELINE`` when set, else a digest
   of the git commit, the uncommitted changes to tracked Python files and the params. Every stage of one
   ``dvc repro`` (or ``dvc exp run -S ...``) computes the same key; a change of code or params gives a new
   one. The parent is the newest run tagged ``albef.pipeline=<key>``, created by the first stage that
   finds none. Each stage marks it RUNNING when it starts and FINISHED/FAILED/KILLED when it ends.

A stage stopped from outside (SIGTERM: a cancelled Prefect flow run, a passed deadline, ``kill``; or Ctrl-C)
ends its run KILLED: :func:`stage_run` turns SIGTERM into :class:`StageTerminated`, deferred while a tracking call
is being delivered so that no call is half done, and the process exits with status 143 (128 + SIGTERM). While the
run is open, MLflow's system-metrics monitor samples CPU, memory, disk, network and, with NVML, GPUs into
``system/*`` metrics (``mlflow.system_metrics``).

Only the main process logs (rank 0 under torchrun or SLURM). Tracking never stops training: every call
goes through a local journal (:mod:`albef.tracking.journal`) and is delivered when the store answers; system
metrics are the exception, sent straight to the store and skipped while it is unreachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from albef.config import flatten
from albef.tracking.config import TrackingConfig, tracking_config
from albef.tracking.journal import PIPELINE_TAG, STAGE_TAG, Deliverer, Journal, now_ms
from albef.tracking.provenance import git_state, library_versions, numeric_items
from albef.tracking.redact import redact, redact_text, redact_uri
from albef.world import world_info_from_env

log = logging.getLogger(__name__)

PARENT_ENV = "ALBEF_MLFLOW_PARENT_RUN_ID"
# Set by an orchestrator retrying an interrupted stage (the Prefect flows): continue that attempt's run
# instead of opening a second one.
STAGE_RUN_ENV = "ALBEF_MLFLOW_STAGE_RUN_ID"
PIPELINE_ENV = "ALBEF_MLFLOW_PIPELINE"
# Set by a flow run working in an experiment workspace (albef.orchestration.workspace): the DVC experiment the
# stage's results are saved as, recorded as the run's tag albef.dvc_experiment.
EXPERIMENT_ENV = "ALBEF_DVC_EXPERIMENT"
EXPERIMENT_TAG = "albef.dvc_experiment"
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


class StageTerminated(SystemExit):
    """SIGTERM reached a stage: it unwinds (its run ends KILLED) and the process exits with 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class Termination:
    """SIGTERM as :class:`StageTerminated` in the main thread, held back while a tracking call is written or
    delivered (:meth:`deferred`): interrupted half-way, a run created on the store but not yet recorded in the
    journal would be created again, and the first copy would stay RUNNING for ever."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first SIGTERM received
        self.raised = False
        self.closing = False  # the run is ending: a signal now waits until it has ended
        self._critical = 0
        self._pid = os.getpid()
        self._installed = False

    def install(self) -> None:
        """Handle SIGTERM in this process, unless this is not the main thread or someone else already does."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, self._handle)
        self._installed = True

    def release(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked child (a data-loader worker) inherited the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            self.signum = signum
        if not (self._critical or self.closing or self.raised):
            self.stop()

    def stop(self) -> None:
        self.raised = True
        raise StageTerminated(self.signum or signal.SIGTERM)

    def pending(self) -> bool:
        """A signal came while it was held back and has not been raised yet."""
        return self.signum is not None and not self.raised

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and not self.closing and self.pending():
            self.stop()


class StageRun:
    """The MLflow run of one stage. Every method is safe to call whatever the store's state."""

    def __init__(
        self,
        cfg: TrackingConfig,
        stage: str,
        tracking_uri: str,
        journal: Journal,
        termination: Termination | None = None,
        owns_parent: bool = True,
    ):
        self.cfg, self.stage, self.uri, self.journal = cfg, stage, tracking_uri, journal
        self.shown_uri = redact_uri(tracking_uri)  # for messages: its credentials redacted
        self.ref, self.parent_ref = "stage", "parent"
        self.termination = termination or Termination()  # (not installed: no signal handling)
        self.owns_parent = owns_parent  # False: an orchestrator's parent run, which it ends itself
        self.continued = False  # the run of an interrupted attempt, continued
        self._deliverer: Deliverer | None = None
        self._next_attempt = 0.0
        self._offline = False
        self._ended = False
        self._ids: dict[str, str] = {}  # local reference -> MLflow run id, as delivered so far
        self._monitor: Any = None  # mlflow's SystemMetricsMonitor, once the run exists on the store
        self._monitor_tried = False

    def ending_status(self, exc: BaseException | None) -> str:
        """The status a run ends with: FINISHED, KILLED when stopped from outside (SIGTERM, Ctrl-C), FAILED."""
        if exc is None:
            return "FINISHED"
        if self.termination.signum is not None or isinstance(exc, KeyboardInterrupt):
            return "KILLED"
        return "FAILED"

    # -- recording ----------------------------------------------------------------------------------------
    def _record(self, op: dict[str, Any]) -> None:
        with self.termination.deferred():
            self.journal.append(op)
            self.pump()

    def log_params(self, params: dict[str, Any]) -> None:
        """``params`` flattened to dotted names; secrets (:mod:`albef.tracking.redact`) as ``***``."""
        flat = {mlflow_name(k): _param_value(v) for k, v in flatten(redact(params)).items()}
        items = sorted(flat.items())
        for start in range(0, len(items), 100):
            self._record({"op": "log", "ref": self.ref, "params": dict(items[start : start + 100])})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            named = {mlflow_name(k): str(v) for k, v in redact(tags).items()}
            self._record({"op": "log", "ref": self.ref, "tags": named})

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        values = numeric_items(flatten(metrics))
        if values:
            ts = now_ms()
            rows = [[mlflow_name(k), v, ts, int(step)] for k, v in sorted(values.items())]
            self._record({"op": "log", "ref": self.ref, "metrics": rows})

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
        """``data`` as a JSON artifact called ``name``, its secrets redacted."""
        if not self.cfg.log_artifacts:
            return
        target = self.journal.files_dir / uuid.uuid4().hex[:8] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str) + "\n")
        self._record({"op": "artifact", "ref": self.ref, "path": str(target), "artifact_path": artifact_path})

    # -- delivery -----------------------------------------------------------------------------------------
    def pump(self, force: bool = False) -> bool:
        """Deliver what is pending unless the store failed less than ``retry_every`` seconds ago.
        Returns True when nothing is left to deliver."""
        if not force and time.monotonic() < self._next_attempt:
            return False
        with self.termination.deferred():
            try:
                self._deliverer = self._deliverer or Deliverer(self.uri)
                left, error = self._deliverer.deliver(self.journal)
            except Exception as exc:  # the client could not even be built (e.g. a sqlite file it cannot open)
                left, error = self.journal.pending(), exc
            self._ids = self.journal.read_state().ids
            if self.run_id:
                self._start_system_metrics()
        if left:
            self._next_attempt = time.monotonic() + self.cfg.retry_every
            if not self._offline:
                log.warning(
                    "mlflow: tracking server %s unavailable (%s); training continues, %d call(s) kept in %s and "
                    "retried every %.0f s (or run `albef mlflow sync`)",
                    self.shown_uri,
                    _short_error(error),
                    left,
                    self.journal.path,
                    self.cfg.retry_every,
                )
            self._offline = True
            return False
        if self._offline:
            log.warning("mlflow: tracking server %s is back; the kept calls were delivered", self.shown_uri)
        self._offline = False
        return True

    @property
    def run_id(self) -> str | None:
        """The MLflow id of this stage's run, once delivered."""
        return self._ids.get(self.ref)

    # -- system metrics -----------------------------------------------------------------------------------
    def _start_system_metrics(self) -> None:
        """Sample system metrics into the run from now on (once the store has the run; never twice)."""
        if self._monitor_tried or self._ended or not self.cfg.system_metrics_on():
            return
        self._monitor_tried = True
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval,
                resume_logging=self.continued,  # a continued run's samples go on from its last step
                tracking_uri=self.uri,
            )
            monitor.start()
        except Exception as exc:  # e.g. the store went away just now: the run goes on without them
            log.warning("mlflow: no system metrics for stage %s: %s", self.stage, _short_error(exc))
            return
        self._monitor = monitor

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()  # the last samples go out before the run ends
            except Exception as exc:
                log.warning("mlflow: system metrics of stage %s: %s", self.stage, _short_error(exc))

    # -- ending -------------------------------------------------------------------------------------------
    def finish(self, status: str = "FINISHED", owns_parent: bool | None = None) -> bool:
        """End the run (and mark the pipeline's parent with the same status, unless an orchestrator owns it)
        and try once more to deliver everything. Returns True when all was delivered; else the journal waits
        for `albef mlflow sync`."""
        if self._ended:
            return True
        self._ended = True
        self.termination.closing = True  # a SIGTERM now waits until the run has ended
        owns_parent = self.owns_parent if owns_parent is None else owns_parent
        self._stop_system_metrics()
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
                self.shown_uri,
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
    text = redact_text(str(error or "unknown error").splitlines()[0])
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
    termination: Termination | None = None,
) -> StageRun | None:
    """Open the MLflow run of ``stage`` (None when tracking is off or this is not the main process).

    ``pipeline_params``: the params that name the pipeline run (default ``params``), for a stage that runs on
    an adjusted copy of params.yaml (``--test-file``) and must still nest under the pipeline's parent run.
    ``termination``: the SIGTERM handling of :func:`stage_run`, which ends the run KILLED."""
    cfg = tracking_config(params)
    if not cfg.enabled or not world_info_from_env().is_main:
        return None
    uri = cfg.resolved_uri()  # a malformed URI fails here, before any work
    cfg.system_metrics_on()  # so does a malformed MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    _limit_client_waits(cfg)
    journal = Journal.create(cfg.spool_dir, stage)
    journal.lock()
    parent_id = os.environ.get(PARENT_ENV)
    run = StageRun(cfg, stage, uri, journal, termination, owns_parent=not parent_id)
    try:
        git = git_state()
        commit = {"mlflow.source.git.commit": git["commit"]} if git.get("commit") else {}
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
                "tags": redact({"albef.kind": "pipeline", **commit}),
            }
        )
        run_tags = {
            STAGE_TAG: stage,
            PIPELINE_TAG: key,
            "albef.kind": "stage",
            **{f"albef.git.{k}": v for k, v in git.items()},
            **commit,
            **{f"albef.lib.{k}": v for k, v in library_versions().items()},
            **({EXPERIMENT_TAG: os.environ[EXPERIMENT_ENV]} if os.environ.get(EXPERIMENT_ENV) else {}),
            **(tags or {}),
        }
        run.continued = bool(os.environ.get(STAGE_RUN_ENV))
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
                "tags": {k: str(v) for k, v in redact(run_tags).items()},
            }
        )
        run.log_params(log_params if log_params is not None else params)
        run.pump(force=True)
    except BaseException as exc:  # e.g. SIGTERM while the run was being created: it ends KILLED
        run.finish(run.ending_status(exc))
        raise
    if run.run_id:
        log.info("mlflow: stage %s logs to run %s at %s", stage, run.run_id, run.shown_uri)
    return run


@contextmanager
def stage_run(params: dict[str, Any], stage: str, **kwargs: Any) -> Iterator[StageRun | None]:
    """``with stage_run(params, "pretrain") as run:`` opens the run, and ends it FINISHED; KILLED when SIGTERM
    (which raises :class:`StageTerminated` in the body) or Ctrl-C stops it; FAILED when the body raises anything
    else. The exception propagates."""
    termination = Termination()
    termination.install()
    try:
        run = start_stage_run(params, stage, termination=termination, **kwargs)
        if run is None:  # no run to end: SIGTERM takes its usual course
            termination.release()
            if termination.pending():
                termination.stop()
        try:
            yield run
        except BaseException as exc:
            if run is not None:
                run.finish(run.ending_status(exc))
            raise
        if run is not None:
            run.finish("FINISHED")
    finally:
        termination.release()
    if termination.pending():  # it came while the run was ending: the stage stops now
        termination.stop()
