"""The Prefect flows with the real thing: ``prefect server start`` on loopback with its own database and
home folder, the ``albef-gpu`` process work pool, ``prefect deploy --all`` from prefect.yaml, a
``prefect worker``, and flow runs triggered through the API on a fresh clone with tiny settings.

* ``full_pipeline`` completes with one Completed task run per DVC stage, the stages' artifacts, overrides
  written into params.yaml and recorded by dvc.lock, and DVC up to date afterwards;
* the training process killed mid-run is retried by Prefect and resumes from its checkpoint (step > 0);
* a stage that fails marks its task Failed with the stage's own error in the Prefect logs, without retries;
* unknown stages, unknown params keys and missing GPUs fail at flow start, naming the culprit;
* a cancelled flow run stops the stage's processes and ends its MLflow runs (stage, parent) KILLED.

Everything runs offline: telemetry is off (server and client), the UI is not served, and no step installs
anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
from conftest import TINY_SYNTH

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
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
        PREFECT_UI_ENABLED="false",  # not needed by the API; saves a second of start-up
        PREFECT_SERVER_API_HOST="127.0.0.1",
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


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect) -> Path:
    """A fresh clone of this repository (with the working tree's pipeline files) on tiny settings."""
    from conftest import shrink_pipeline

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
    params["finetune_retrieval"].update(epochs=1)
    for name in ("finetune_vqa", "finetune_ve", "pretrain_nlvr", "finetune_nlvr"):
        params[name].update(epochs=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def deployments(project, prefect):
    """The albef-gpu process pool and every deployment of prefect.yaml, created as the README says."""
    prefect_cli = str(BIN / "prefect")
    _run([prefect_cli, "work-pool", "create", "albef-gpu", "--type", "process"], project, prefect)
    out = _run([prefect_cli, "--no-prompt", "deploy", "--all"], project, prefect, timeout=600)
    return out


@pytest.fixture(scope="module")
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


# --------------------------------------------------------------------------------------------- tests


def test_prefect_deploy_creates_a_deployment_for_every_flow_in_the_gpu_pool(deployments, settings):
    from flows.stages import STAGE_FLOWS

    with _client() as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        pool = client.read_work_pool("albef-gpu")
    assert pool.type == "process"
    assert set(found) == {f"{name}/albef" for name in [*STAGE_FLOWS, "full_pipeline"]}
    for name, deployment in found.items():
        assert deployment.work_pool_name == "albef-gpu", name
        assert deployment.schedules and not any(s.active for s in deployment.schedules), name
        assert deployment.parameters["gpus"] == 0, name
        assert deployment.pull_steps and "set_working_directory" in json.dumps(deployment.pull_steps), name


def test_full_pipeline_through_a_worker_completes_with_task_runs_and_artifacts(
    project, prefect, worker, settings
):
    from albef.orchestration.pipeline import dvc_stages, flow_of, select_stages

    flow_run_id = _trigger(
        "full_pipeline/albef",
        {"overrides": {"pretrain.epochs": 1}, "retries": 1, "retry_delay_seconds": 1},
    )
    run = _wait(flow_run_id, worker)
    runs = _flow_runs_under(flow_run_id)
    assert run.state.type.value == "COMPLETED", f"{run.state.message}\n{worker.read_text()[-4000:]}"
    # every stage dvc.yaml declares (VQA and register included), each in its flow
    stages = select_stages(project)
    assert {
        "synth",
        "preprocess",
        "unimodal",
        "pretrain",
        "finetune_retrieval",
        "evaluate_zeroshot",
        "evaluate_retrieval",
    } <= set(stages)
    with _client() as client:
        subflows = sorted(client.read_flow(r.flow_id).name for r in runs[1:])
    assert subflows == sorted({flow_of(s, dvc_stages(project)) for s in stages})
    assert all(r.state.type.value == "COMPLETED" for r in runs)

    tasks = _task_runs([r.id for r in runs])
    states = [(t.name, t.state.name) for t in tasks]
    assert tasks and all(t.state.type.value == "COMPLETED" for t in tasks), states
    repros = sorted(t.name for t in tasks if t.name.startswith("dvc repro "))
    assert repros == sorted(f"dvc repro {s}" for s in stages)

    artifacts = _artifacts([r.id for r in runs])
    for key in [f"{s.replace('_', '-')}-metrics" for s in stages] + [
        "evaluate-retrieval-examples",
        "evaluate-zeroshot-examples",
        "pretrain-curves",
        "full-pipeline-summary",
    ]:
        assert key in artifacts, f"{key} not in {sorted(artifacts)}"
    assert "| r_mean |" in artifacts["evaluate-retrieval-metrics"].data
    assert "| steps | 8 |" in artifacts["pretrain-metrics"].data  # 32 pairs / batch 4, one epoch
    assert "data:image/png;base64," in artifacts["evaluate-retrieval-examples"].data
    assert "finetune_retrieval" in artifacts["full-pipeline-summary"].data
    if _tracking_on(project):  # the flow's parent run holds one finished run per tracked stage, each linked
        parent, nested = _mlflow_runs(project, flow_run_id)
        assert parent.info.status == "FINISHED"
        # the data stages and the summary (it reads metrics files only) open no MLflow run
        tracked = [s for s in stages if s not in ("synth", "preprocess", "summary")]
        assert sorted(r.data.tags["albef.stage"] for r in nested) == sorted(tracked)
        assert all(r.info.status == "FINISHED" for r in nested)
        for r in nested:
            link = artifacts[f"{r.data.tags['albef.stage'].replace('_', '-')}-mlflow-run"].data
            assert r.info.run_id in json.dumps(link)

    # The override went where DVC reads it, DVC recorded it, and DVC agrees that everything is up to date.
    assert yaml.safe_load((project / "params.yaml").read_text())["pretrain"]["epochs"] == 1
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["epochs"] == 1
    assert "up to date" in _dvc(project, prefect, "status").lower()


def _training_processes(project: Path, stage_cmd: str = "pretrain") -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if (
            len(cmd) >= 3
            and any(Path(c).name == "albef" for c in cmd[:2])
            and stage_cmd in cmd
            and proc.info.get("cwd") == str(project)
        ):
            found.append(proc)
    return found


def test_a_killed_training_process_is_retried_and_resumes_from_its_checkpoint(
    project, prefect, worker, settings
):
    from albef.train.checkpointing import list_checkpoints

    shutil.rmtree(project / "runs" / "pretrain", ignore_errors=True)
    ckpts = project / "runs" / "pretrain" / "checkpoints"
    killed: list[int] = []

    def kill_once_mid_run() -> None:
        if killed:
            return
        done = list_checkpoints(ckpts) if ckpts.is_dir() else []
        if done and int(done[-1].stem.split("-")[1]) >= 3:
            for proc in _training_processes(project):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)

    flow_run_id = _trigger(
        "pretrain/albef",
        {
            "overrides": {"pretrain.epochs": 3, "pretrain.checkpoint_every": 1, "pretrain.val_file": None},
            "retries": 2,
            "retry_delay_seconds": 1,
        },
    )
    end = time.monotonic() + 300
    with _client() as client:
        while not killed and time.monotonic() < end:
            kill_once_mid_run()
            if client.read_flow_run(flow_run_id).state.is_final():
                break
            time.sleep(0.02)
    assert killed, "the training finished before it could be killed"
    run = _wait(flow_run_id, worker)
    assert run.state.type.value == "COMPLETED", run.state.message

    (task,) = [t for t in _task_runs([flow_run_id]) if t.name == "dvc repro pretrain"]
    assert task.state.type.value == "COMPLETED" and task.run_count == 2

    # The evidence comes from the artifact the successful attempt published, not from log lines: Prefect
    # ships logs in the background and, on a loaded machine, has dropped the first attempt's batch.
    artifact = _artifacts([flow_run_id])["pretrain-metrics"].data
    assert "**attempt**: 2" in artifact, artifact[:600]
    (failures,) = [line for line in artifact.splitlines() if line.startswith("- **earlier_failures**")]
    # DVC reports the SIGKILL as -9 when its shell exec'd the stage command, and as 137 (128 + 9) when the
    # shell stayed in between (as on CI): either way it was the kill.
    assert "attempt 1:" in failures and re.search(r"exited with (-9|137)\b", failures), failures
    assert "killed by SIGKILL, as the kernel's out-of-memory killer does" in failures, failures
    first_step = int(artifact.split("**resumed_from_step**: ")[1].split()[0])
    assert first_step >= 3  # the retry's first step continues the killed run's checkpoint
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == 24
    history = (project / "runs" / "pretrain" / "history.csv").read_text().splitlines()
    steps = [int(float(row.split(",")[0])) for row in history[1:]]
    assert steps == list(range(1, 25))  # resumed, not restarted: one row per step, no gap, no repeat
    if _tracking_on(project):  # the retry continued the killed attempt's MLflow run: one run, finished
        _, nested = _mlflow_runs(project, flow_run_id)
        # (the flow also runs unimodal, which is up to date unless this test runs alone)
        pretrain_runs = [r for r in nested if r.data.tags["albef.stage"] == "pretrain"]
        assert len(pretrain_runs) == 1 and pretrain_runs[0].info.status == "FINISHED"


def test_a_failing_stage_fails_its_task_with_the_stage_error_in_the_logs(project, settings):
    """Run in this process (no worker: the point is the task's state and logs, not the dispatch)."""
    from albef.orchestration.process import StageFailed
    from flows.stages import pretrain

    # valid as a setting, impossible for the data: the stage itself refuses it
    overrides = {"pretrain.batch_size": 64, "mlflow.enabled": False}
    with pytest.raises(StageFailed, match="albef pretrain: error:"):
        pretrain(project_dir=str(project), overrides=overrides, retries=2, retry_delay_seconds=1)
    with _client() as client:
        (run,) = client.read_flow_runs(limit=1, sort="EXPECTED_START_TIME_DESC")
    assert run.state.type.value == "FAILED" and not run.deployment_id
    (task,) = [t for t in _task_runs([run.id]) if t.name == "dvc repro pretrain"]
    assert task.state.type.value == "FAILED" and task.run_count == 1  # reported by the stage: not retried
    assert "albef pretrain: error:" in task.state.message
    logs = _logs_when(task.id, lambda line: "stage pretrain failed" in line)
    assert any("albef pretrain: error:" in line for line in logs), logs[-20:]
    assert any("stage pretrain failed" in line for line in logs), logs[-20:]


def test_bad_input_fails_at_flow_start_naming_the_culprit(project, settings):
    """Run in this process: the flow run fails before any task run exists and params.yaml is untouched."""
    import torch

    from albef.orchestration.pipeline import PlanError
    from flows.pipeline import full_pipeline

    cases = [
        ({"stages": ["data", "pretrian"]}, "unknown stage 'pretrian'"),
        ({"overrides": {"pretrain.epochz": 1}}, "override 'pretrain.epochz'.*unknown key"),
    ]
    if torch.cuda.device_count() == 0:
        cases.append(({"gpus": 1}, r"requested 1 GPU\(s\) per node, but this worker sees 0"))
    before = (project / "params.yaml").read_bytes()
    for parameters, pattern in cases:
        state = full_pipeline(project_dir=str(project), **parameters, return_state=True)
        assert state.is_failed()
        with pytest.raises(PlanError, match=pattern):
            state.result()
        flow_run_id = state.state_details.flow_run_id
        with _client() as client:
            assert client.read_flow_run(flow_run_id).state.is_failed()
        assert _task_runs([flow_run_id]) == []  # refused before any task ran
    assert (project / "params.yaml").read_bytes() == before


def _stage_run_status(project: Path, flow_run_id: UUID, stage: str) -> tuple[str | None, str | None]:
    """(the flow run's MLflow parent run status, its stage run's status); None for one that does not exist yet."""
    try:
        parent, nested = _mlflow_runs(project, flow_run_id)
    except Exception:  # no database, experiment or parent run yet
        return None, None
    runs = [r.info.status for r in nested if r.data.tags.get("albef.stage") == stage]
    return parent.info.status, (runs[0] if runs else None)


def test_cancelling_a_flow_run_stops_the_stage_processes_and_ends_their_runs_killed(
    project, prefect, worker, settings
):
    from prefect.states import Cancelling

    shutil.rmtree(project / "runs" / "pretrain", ignore_errors=True)
    flow_run_id = _trigger(
        "pretrain/albef",
        {
            "overrides": {
                "pretrain.epochs": 200,
                "pretrain.batch_size": 4,
                "pretrain.val_file": None,
                "mlflow.enabled": True,
            },
            "retries": 0,
        },
    )
    end = time.monotonic() + 300
    while not _training_processes(project) and time.monotonic() < end:
        time.sleep(0.1)
    training = _training_processes(project)
    assert training, "training never started"
    # (the flow created and migrated the store before it started the stage) until the stage's run is open
    while time.monotonic() < end and _stage_run_status(project, flow_run_id, "pretrain")[1] != "RUNNING":
        time.sleep(0.2)
    assert _stage_run_status(project, flow_run_id, "pretrain") == ("RUNNING", "RUNNING")
    with _client() as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    run = _wait(flow_run_id, worker, timeout=120)
    assert run.state.type.value == "CANCELLED", run.state
    _, alive = psutil.wait_procs(training, timeout=30)
    for proc in alive:
        proc.kill()
    assert not alive, "the training process outlived its cancelled flow run"
    # the stage ended its own run on SIGTERM; the flow its parent run: cancelled is KILLED, not RUNNING or FAILED
    end = time.monotonic() + 30
    while time.monotonic() < end and _stage_run_status(project, flow_run_id, "pretrain") != (
        "KILLED",
        "KILLED",
    ):
        time.sleep(0.5)
    assert _stage_run_status(project, flow_run_id, "pretrain") == ("KILLED", "KILLED")
