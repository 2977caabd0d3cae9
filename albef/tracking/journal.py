"""A write-ahead journal of tracking calls, and the code that delivers it to an MLflow tracking store.

Every call a stage makes (create a run, log metrics, upload an artifact, end the run) is first appended to
a JSON-lines journal on local disk, then delivered. Delivery stops at the first call the store cannot take
for a transient reason (server down, timeout, 5xx) and resumes where it stopped, at the next attempt in the
same process or later from ``albef mlflow sync``; its progress (calls delivered, local run references ->
MLflow run ids) sits in a small state file beside the journal. Metrics keep the timestamp and step they
were recorded with, so late delivery changes nothing in the UI. A call the store refuses for good (an
invalid value) is set aside in ``<journal>.rejected.jsonl`` with the reason instead of blocking the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from albef.io import atomic_write_text
from albef.tracking.redact import redact_text
from albef.tracking.store import ensure_experiment, is_permanent

log = logging.getLogger(__name__)

PIPELINE_TAG = "albef.pipeline"
STAGE_TAG = "albef.stage"
KIND_TAG = "albef.kind"  # pipeline | stage
PARENT_TAG = "mlflow.parentRunId"
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class JournalState:
    done: int = 0  # calls delivered or set aside, counted from the journal's first line
    ids: dict[str, str] = field(default_factory=dict)  # local run reference -> MLflow run id


class Journal:
    """One stage run's journal: ``<dir>/<name>.jsonl``, its ``.state.json`` and ``.files/`` snapshots."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path.with_suffix(".state.json")
        self.files_dir = self.path.with_suffix(".files")
        self.rejected_path = self.path.with_suffix(".rejected.jsonl")
        self._lock_fh = None

    @classmethod
    def create(cls, spool_dir: str | Path, stage: str) -> Journal:
        directory = Path(spool_dir)
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in stage)
        return cls(directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{uuid.uuid4().hex[:8]}.jsonl")

    # -- writing ------------------------------------------------------------------------------------------
    def lock(self, wait: bool = True) -> bool:
        """Hold an exclusive lock while a stage writes, so ``albef mlflow sync`` leaves a live journal alone.
        ``wait=False``: False at once when someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.path.with_suffix(".lock"), "w")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            return False
        return True

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def append(self, op: dict[str, Any]) -> None:
        # One line per call, flushed at once: a crash loses at most the call being written.
        with open(self.path, "a") as fh:
            fh.write(json.dumps(op, sort_keys=True) + "\n")
            fh.flush()

    def snapshot(self, source: str | Path) -> Path:
        """A private copy of an artifact, so a later stage rewriting the original cannot change what is
        delivered."""
        source = Path(source)
        target = self.files_dir / uuid.uuid4().hex[:8] / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target

    # -- reading ------------------------------------------------------------------------------------------
    def ops(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a torn line (the writer was killed mid-write)", self.path)
                out.append({"op": "noop"})
        return out

    def read_state(self) -> JournalState:
        if not self.state_path.is_file():
            return JournalState()
        data = json.loads(self.state_path.read_text())
        return JournalState(done=int(data.get("done", 0)), ids=dict(data.get("ids", {})))

    def write_state(self, state: JournalState) -> None:
        atomic_write_text(self.state_path, json.dumps({"done": state.done, "ids": state.ids}, sort_keys=True))

    def pending(self) -> int:
        return max(len(self.ops()) - self.read_state().done, 0)

    def reject(self, op: dict[str, Any], reason: str) -> None:
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps({"op": op, "reason": reason}, sort_keys=True) + "\n")

    def remove(self) -> None:
        """Delete a fully delivered journal (a rejected-calls file, if any, stays for inspection)."""
        for path in (self.path, self.state_path, self.path.with_suffix(".lock")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.files_dir, ignore_errors=True)


class Deliverer:
    """Replays journal calls against one tracking store through ``MlflowClient``."""

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiments: dict[str, str] = {}

    def deliver(self, journal: Journal) -> tuple[int, BaseException | None]:
        """Deliver ``journal``'s pending calls in order. Returns (calls still pending, the transient error
        that stopped delivery or None)."""
        ops = journal.ops()
        state = journal.read_state()
        try:
            while state.done < len(ops):
                batch_end = self._batch_end(ops, state.done)
                op = self._merge(ops[state.done : batch_end])
                try:
                    self._apply(op, state, journal)
                except Exception as exc:
                    if not is_permanent(exc) and not isinstance(exc, _Unresolved):
                        return len(ops) - state.done, exc
                    reason = redact_text(str(exc))
                    log.warning(
                        "mlflow refused a %s call (%s); kept in %s",
                        op.get("op"),
                        reason,
                        journal.rejected_path,
                    )
                    journal.reject(op, reason)
                state.done = batch_end
        finally:
            journal.write_state(state)
        return 0, None

    @staticmethod
    def _batch_end(ops: list[dict[str, Any]], start: int) -> int:
        """Consecutive metric logs of one run travel as one ``log_batch`` call (replays after an outage)."""
        first = ops[start]
        end, count = start + 1, len(first.get("metrics", []))
        if first.get("op") != "log" or first.get("params") or first.get("tags"):
            return end
        while end < len(ops):
            op = ops[end]
            same_run = op.get("op") == "log" and op.get("ref") == first["ref"]
            count += len(op.get("metrics", []))
            if not same_run or op.get("params") or op.get("tags") or count > MAX_METRICS_PER_BATCH:
                break
            end += 1
        return end

    @staticmethod
    def _merge(ops: list[dict[str, Any]]) -> dict[str, Any]:
        if len(ops) == 1:
            return ops[0]
        return {"op": "log", "ref": ops[0]["ref"], "metrics": [m for op in ops for m in op["metrics"]]}

    # -- calls --------------------------------------------------------------------------------------------
    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        if name not in self._experiments:
            self._experiments[name] = ensure_experiment(self.client, self.uri, name, artifact_location)
        return self._experiments[name]

    def _run_id(self, state: JournalState, ref: str) -> str:
        if ref not in state.ids:
            raise _Unresolved(f"run {ref!r} was never created (its creation was refused)")
        return state.ids[ref]

    def _apply(self, op: dict[str, Any], state: JournalState, journal: Journal) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op.get("op")
        if kind == "parent":
            state.ids[op["ref"]] = op.get("run_id") or self._find_or_create_parent(op)
            if not op.get("run_id"):
                self.client.update_run(state.ids[op["ref"]], status="RUNNING")
        elif kind == "run" and op.get("run_id"):  # a retry continues the run of the attempt it retries
            state.ids[op["ref"]] = op["run_id"]
            self.client.update_run(op["run_id"], status="RUNNING")
        elif kind == "run":
            exp_id = self.experiment_id(op["experiment"], op.get("artifact_location"))
            tags = dict(op.get("tags", {}))
            if op.get("parent"):
                tags[PARENT_TAG] = self._run_id(state, op["parent"])
            run = self.client.create_run(
                exp_id, start_time=op.get("start_time"), tags=tags, run_name=op.get("name")
            )
            state.ids[op["ref"]] = run.info.run_id
        elif kind == "log":
            run_id = self._run_id(state, op["ref"])
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op.get("metrics", [])],
                params=[Param(k, str(v)) for k, v in op.get("params", {}).items()],
                tags=[RunTag(k, str(v)) for k, v in op.get("tags", {}).items()],
                synchronous=True,
            )
        elif kind == "artifact":
            run_id = self._run_id(state, op["ref"])
            path = Path(op["path"])
            if not path.exists():
                raise _Unresolved(f"artifact {path} is gone")
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), op.get("artifact_path"))
            else:
                self.client.log_artifact(run_id, str(path), op.get("artifact_path"))
        elif kind in ("end", "parent_status"):  # a parent run's status only when the stage owns it
            if kind == "end" or op.get("owned"):
                run_id = self._run_id(state, op["ref"])
                self.client.set_terminated(run_id, op.get("status", "FINISHED"), op.get("end_time"))
        elif kind != "noop":
            raise _Unresolved(f"unknown journal call {kind!r}")

    def _find_or_create_parent(self, op: dict[str, Any]) -> str:
        exp_id = self.experiment_id(op["experiment"], op.get("artifact_location"))
        found = self.client.search_runs(
            [exp_id],
            # stage runs carry the key too; the parent is the one of kind "pipeline"
            filter_string=f"tags.`{PIPELINE_TAG}` = '{op['key']}' and tags.`{KIND_TAG}` = 'pipeline'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            return found[0].info.run_id
        tags = {PIPELINE_TAG: op["key"], KIND_TAG: "pipeline", **op.get("tags", {})}
        return self.client.create_run(
            exp_id, start_time=op.get("start_time"), tags=tags, run_name=op.get("name")
        ).info.run_id


class _Unresolved(RuntimeError):
    """A call that can never be delivered (it refers to something that was refused or is gone)."""


def journals(spool_dir: str | Path) -> Iterator[Journal]:
    directory = Path(spool_dir)
    if directory.is_dir():
        for path in sorted(directory.glob("*.jsonl")):
            if not path.name.endswith(".rejected.jsonl"):
                yield Journal(path)


@dataclass
class SyncReport:
    delivered: int = 0  # journals now complete (and removed)
    pending: int = 0  # journals with calls still undelivered
    busy: int = 0  # journals a running stage still writes
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"delivered {self.delivered} journal(s); {self.pending} still pending; {self.busy} in use"
        return text + "".join(f"\n  {e}" for e in self.errors)


def sync_spool(spool_dir: str | Path, tracking_uri: str) -> SyncReport:
    """Deliver every finished journal under ``spool_dir`` (``albef mlflow sync``)."""
    report = SyncReport()
    deliverer: Deliverer | None = None
    for journal in journals(spool_dir):
        if not journal.lock(wait=False):
            report.busy += 1
            continue
        try:
            deliverer = deliverer or Deliverer(tracking_uri)
            left, error = deliverer.deliver(journal)
            if left:
                report.pending += 1
                report.errors.append(
                    f"{journal.path.name}: {left} call(s) pending: {redact_text(str(error))}"
                )
            else:
                report.delivered += 1
                journal.unlock()
                journal.remove()
        finally:
            journal.unlock()
    return report
