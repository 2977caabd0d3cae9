"""The Prefect harness shared by the tests that need the real thing (session fixtures, imported by
conftest.py): ``prefect server start`` on loopback with its own database and home folder (UI served), the
``albef-gpu`` process work pool, ``prefect deploy --all`` from prefect.yaml, a ``prefect worker``, a fresh
clone of the repository on tiny settings, one finished ``full_pipeline`` flow run, and helpers that trigger
flow runs through the API and read back their states, task runs, artifacts, logs and MLflow runs.

Everything runs offline: telemetry is off (server and client) and no step installs anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_TRAIN = {
    "batch_size": 4,
    "epochs": 2,
    "num_workers": 0,
    "checkpoint_every": 0,
    "k_test": 4,
    "log_every": 1,
}
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen, signals=(signal.SIGTERM,), wait: float = 15) -> None:
    """Stop a service started in its own session: the given signals in turn, then SIGKILL."""
    for sig in signals:
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def prefect(tmp_path_factory):
    """A Prefect server on loopback with its own sqlite database and PREFECT_HOME; yields the environment
    clients use (PREFECT_API_URL set)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",  # the server's telemetry (a DNS lookup, then an error)
        DO_NOT_TRACK="1",  # the client's telemetry
        # the UI is served: tests/test_ui_browser.py opens its pages in headless Chromium
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),  # the API URL the UI is told (--port alone leaves it at 4200)
        PREFECT_WORKER_QUERY_SECONDS="1",  # the worker picks a triggered run up at once (default 15 s)
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@localhost",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@localhost",
    )
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited:\n{(home / 'server.log').read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server not healthy in 180 s:\n{(home / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        env["PREFECT_API_URL"] = url
        yield env
    finally:
        _stop_group(server)
        log.close()


@pytest.fixture(scope="session")
def settings(prefect):
    """This process's Prefect client, and the flows it runs in-process, pointed at the test server."""
    from prefect import context
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    updates = {PREFECT_API_URL: prefect["PREFECT_API_URL"], PREFECT_HOME: prefect["PREFECT_HOME"]}
    # Threads (Prefect's log and event workers, the stage-output reader) read the process-global settings,
    # not this context: without the second context their client would start an ephemeral server of its own.
    # prefect_test_harness does the same.
    with (
        temporary_settings(updates),
        context._temporary_global_settings_context(context.get_settings_context()),
    ):
        yield
        with contextlib.suppress(Exception):
            APILogWorker.drain_all()


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def project(tmp_path_factory, prefect) -> Path:
    """A fresh clone of this repository (with the working tree's pipeline files) on tiny settings."""
    from conftest import TINY_SYNTH, shrink_pipeline

    root = tmp_path_factory.mktemp("clone") / "albef"
    _run(["git", "clone", "-q", str(REPO), str(root)], REPO, prefect)
    for name in ("dvc.yaml", "params.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    for folder in ("albef", "flows"):
        shutil.copytree(
            REPO / folder, root / folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"].update(TINY_SYNTH)
    params["preprocess"].update(max_side=64, shard_size=16)
    shrink_pipeline(params, TINY_TRAIN)
    params["pretrain"].update(epochs=1)
    params["finetune_retrieval"].update(epochs=1)
    for name in ("finetune_vqa", "finetune_ve", "pretrain_nlvr", "finetune_nlvr"):
        params[name].update(epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def deployments(project, prefect):
    """The albef-gpu process pool and every deployment of prefect.yaml, created as the README says."""
    prefect_cli = str(BIN / "prefect")
    _run([prefect_cli, "work-pool", "create", "albef-gpu", "--type", "process"], project, prefect)
    out = _run([prefect_cli, "--no-prompt", "deploy", "--all"], project, prefect, timeout=600)
    return out


@pytest.fixture(scope="session")
def worker(deployments, project, prefect, tmp_path_factory):
    """``prefect worker start --pool albef-gpu``, started elsewhere than the project (the deployments' pull
    step moves each flow run into the checkout)."""
    where = tmp_path_factory.mktemp("worker")
    log = open(where / "worker.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "albef-gpu", "--name", "test-worker"],
        cwd=where,
        env=prefect,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield where / "worker.log"
    finally:
        # the process worker ignores one SIGTERM: SIGINT twice (the second escalates), then SIGKILL
        _stop_group(proc, signals=(signal.SIGINT, signal.SIGINT), wait=10)
        log.close()
        # flow runs live in sessions of their own: none may outlive the test (they work in the project)
        for leftover in psutil.process_iter(["cwd"]):
            if str(leftover.info.get("cwd") or "").startswith(str(project)):
                with contextlib.suppress(psutil.Error):
                    leftover.kill()


# ------------------------------------------------------------------------------------------- helpers


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _trigger(name: str, parameters: dict) -> UUID:
    with _client() as client:
        deployment = client.read_deployment_by_name(name)
        return client.create_flow_run_from_deployment(deployment.id, parameters=parameters).id


def _wait(flow_run_id: UUID, worker_log: Path, timeout: float = 540, on_poll=None):
    end = time.monotonic() + timeout
    with _client() as client:
        while time.monotonic() < end:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.type.value in FINAL:
                return run
            if on_poll is not None:
                on_poll()
            time.sleep(0.5)
    pytest.fail(
        f"flow run {flow_run_id} not finished in {timeout} s; worker log:\n{worker_log.read_text()[-4000:]}"
    )


def _flow_runs_under(root: UUID) -> list:
    """The flow run and its subflow runs."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[root]))
        )
        return [client.read_flow_run(root), *children]


def _task_runs(flow_run_ids: list[UUID]) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))


def _artifacts(flow_run_ids: list[UUID]) -> dict:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
    return {a.key: a for a in found if a.key}


def _logs(task_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    lines, offset = [], 0
    with _client() as client:
        while True:
            page = client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])),
                limit=200,
                offset=offset,
            )
            lines += [log.message for log in page]
            if len(page) < 200:
                return lines
            offset += 200


def _logs_when(task_run_id: UUID, *wanted, timeout_s: float = 30) -> list[str]:
    """The task run's logs once every predicate in ``wanted`` holds for some line, or whatever has arrived
    when ``timeout_s`` runs out: Prefect ships logs in the background, so on a loaded machine the last lines
    land a while after the run's final state."""
    deadline = time.monotonic() + timeout_s
    while True:
        logs = _logs(task_run_id)
        if all(any(want(line) for line in logs) for want in wanted) or time.monotonic() > deadline:
            return logs
        time.sleep(1)


def _tracking_on(project: Path) -> bool:
    mlflow = yaml.safe_load((project / "params.yaml").read_text()).get("mlflow")
    return isinstance(mlflow, dict) and bool(mlflow.get("enabled", True))


def _mlflow_runs(project: Path, flow_run_id: UUID):
    """The MLflow parent run a flow run opened (in the project's embedded sqlite store) and its nested runs."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(
        yaml.safe_load((project / "params.yaml").read_text())["mlflow"]["experiment"]
    )
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`albef.prefect.flow_run_id` = '{flow_run_id}'")
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, nested


def _dvc(project: Path, env: dict, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], project, env)


FULL_PIPELINE_PARAMETERS = {"retries": 1, "retry_delay_seconds": 1}


@pytest.fixture(scope="session")
def full_pipeline_run(project, prefect, worker, settings):
    """One ``full_pipeline`` flow run through the worker, in the project's checkout (no overrides: the
    checkout's own params.yaml, which the project fixture shrank), finished; shared by the tests that look at
    what it left (task runs, artifacts, MLflow runs, the UIs)."""
    flow_run_id = _trigger("full_pipeline/albef", FULL_PIPELINE_PARAMETERS)
    return _wait(
        flow_run_id, worker, timeout=2400
    )  # ~6 min on an idle 2-core machine, 12-20 beside another test worker
