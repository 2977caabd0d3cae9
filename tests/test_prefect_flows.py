"""The Prefect flows with the real thing (the server, the work pool, the deployments, the worker and the
project clone come from tests/prefect_harness.py, shared by every test that needs them):

* ``full_pipeline`` completes with one Completed task run per DVC stage, the stages' artifacts, and DVC up to
  date afterwards in the checkout it ran in;
* the training process killed mid-run is retried by Prefect and resumes from its checkpoint (step > 0);
* a stage that fails marks its task Failed with the stage's own error in the Prefect logs, without retries;
* unknown stages, unknown params keys and missing GPUs fail at flow start, naming the culprit;
* a cancelled flow run stops the stage's processes and ends its MLflow runs (stage, parent) KILLED.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from pathlib import Path
from uuid import UUID

import psutil
import pytest
import yaml
from prefect_harness import (
    _artifacts,
    _client,
    _dvc,
    _flow_runs_under,
    _logs_when,
    _mlflow_runs,
    _run,
    _task_runs,
    _tracking_on,
    _trigger,
    _wait,
)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------- tests


def test_prefect_deploy_creates_a_deployment_for_every_flow_in_the_gpu_pool(deployments, settings):
    from flows.stages import STAGE_FLOWS

    with _client() as client:
        found = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        pool = client.read_work_pool("albef-gpu")
    assert pool.type == "process"
    assert set(found) == {f"{name}/albef" for name in [*STAGE_FLOWS, "full_pipeline", "sweep"]}
    for name, deployment in found.items():
        assert deployment.work_pool_name == "albef-gpu", name
        if name != "sweep/albef":  # (a sweep is started by hand)
            assert deployment.schedules and not any(s.active for s in deployment.schedules), name
        assert deployment.parameters["gpus"] == 0, name
        assert deployment.pull_steps and "set_working_directory" in json.dumps(deployment.pull_steps), name
        # the run form: every parameter described, the stage names offered as a list
        schema = deployment.parameter_openapi_schema["properties"]
        undescribed = [key for key, spec in schema.items() if not spec.get("description")]
        assert not undescribed, (name, undescribed)
        stage_names = schema["stages"]["anyOf"][0]["items"]["enum"]
        assert {"register", "flow:register", "evaluate_retrieval", "evaluate"} <= set(stage_names), name
        if "workspace" in schema:
            assert schema["workspace"]["enum"] == ["auto", "checkout", "experiment"], name


def test_full_pipeline_through_a_worker_completes_with_task_runs_and_artifacts(
    project, prefect, full_pipeline_run
):
    from albef.orchestration.pipeline import dvc_stages, flow_of, select_stages

    run = full_pipeline_run
    flow_run_id = run.id
    runs = _flow_runs_under(flow_run_id)
    assert run.state.type.value == "COMPLETED", run.state.message
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

    # Without overrides the run works in the checkout: dvc.lock records its params.yaml, and DVC agrees that
    # everything is up to date.
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
            and str(proc.info.get("cwd") or "").startswith(str(project))  # the checkout, or a workspace in it
        ):
            found.append(proc)
    return found


def test_a_killed_training_process_is_retried_and_resumes_from_its_checkpoint(
    project, prefect, worker, settings
):
    from albef.orchestration.workspace import experiment_name, workspace_path
    from albef.train.checkpointing import list_checkpoints

    killed: list[int] = []

    def kill_once_mid_run() -> None:
        if killed:
            return
        # this run's checkpoints (the workspace starts with copies of the checkout's, which the run moves aside)
        done = []
        for ckpt in list_checkpoints(ckpts):
            with contextlib.suppress(FileNotFoundError):  # (moved aside in between)
                if ckpt.stat().st_mtime >= started:
                    done.append(ckpt)
        if done and int(done[-1].stem.split("-")[1]) >= 3:
            for proc in _training_processes(here):
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.pid)

    started = time.time()
    flow_run_id = _trigger(
        "pretrain/albef",
        {
            "overrides": {"pretrain.epochs": 3, "pretrain.checkpoint_every": 1, "pretrain.val_file": None},
            "keep_workspace": True,  # to read the training's history afterwards
            "retries": 2,
            "retry_delay_seconds": 1,
        },
    )
    # with overrides the run works in a workspace of its own, named after the flow run
    with _client() as client:
        name = client.read_flow_run(flow_run_id).name
    here = workspace_path(project, experiment_name(name, str(flow_run_id)))
    ckpts = here / "runs" / "pretrain" / "checkpoints"
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
    assert json.loads((here / "metrics" / "pretrain.json").read_text())["steps"] == 24
    history = (here / "runs" / "pretrain" / "history.csv").read_text().splitlines()
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
    from prefect.exceptions import ParameterTypeError

    from albef.orchestration.pipeline import PlanError
    from flows.pipeline import full_pipeline

    # a stage name the form does not offer is refused by the flow's parameter schema, naming what it offers
    state = full_pipeline(project_dir=str(project), stages=["data", "pretrian"], return_state=True)
    assert state.is_failed()
    with pytest.raises(ParameterTypeError, match=r"stages.1: Input should be 'synth', 'preprocess'"):
        state.result()
    cases = [
        ({"overrides": {"pretrain.epochz": 1}}, "override 'pretrain.epochz'.*unknown key"),
        (
            {"overrides": {"pretrain.epochs": 1}, "workspace": "checkout"},
            "never writes the checkout's params.yaml",
        ),
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


def test_a_sweep_runs_two_experiments_at_once_each_with_its_own_settings_and_registers_the_best(
    project, prefect, worker, settings, full_pipeline_run
):
    """The issue's scenario (two runs with different evaluate.k_test at once), through the sweep deployment:
    both finish, at the same time, each as its own DVC experiment with its own settings in `dvc exp show`, in
    its MLflow parent run and stage run; the checkout's params.yaml and dvc.lock are untouched; the best
    experiment is registered through the gate."""
    from albef.orchestration.workspace import experiment_name, experiment_ref

    before = {name: (project / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    sweep_id = _trigger(
        "sweep/albef",
        {
            "runs": [{"evaluate.k_test": 2}, {"evaluate.k_test": 8}],
            "stages": ["evaluate_retrieval"],
            "metric": "metrics/retrieval.json:r_mean",
            "max_concurrent": 2,
            "register_best": True,
            "retries": 1,
            "retry_delay_seconds": 1,
        },
    )
    run = _wait(sweep_id, worker, timeout=600)
    assert run.state.type.value == "COMPLETED", f"{run.state.message}\n{worker.read_text()[-4000:]}"
    with _client() as client:
        children = [
            r for r in _flow_runs_under(sweep_id)[1:] if client.read_flow(r.flow_id).name == "full_pipeline"
        ]
        limit = client.read_global_concurrency_limit_by_name("albef-experiments")
    assert limit.limit == 2
    assert len(children) == 2 and all(c.state.type.value == "COMPLETED" for c in children)
    # at the same time: each started before the other ended
    assert max(c.start_time for c in children) < min(c.end_time for c in children), [
        (c.start_time, c.end_time) for c in children
    ]
    by_k = {}
    for child in children:
        name = experiment_name(child.name, str(child.id))
        ref = experiment_ref(project, name)
        params = yaml.safe_load(_run(["git", "show", f"{ref}:params.yaml"], project, prefect))
        metrics = json.loads(_run(["git", "show", f"{ref}:metrics/retrieval.json"], project, prefect))
        by_k[params["evaluate"]["k_test"]] = (child, name, metrics)
    assert sorted(by_k) == [2, 8]
    shown = _dvc(project, prefect, "exp", "show", "--json")  # (HEAD's experiments: -A would walk all history)
    for k, (child, name, metrics) in by_k.items():
        assert name in shown and "r_mean" in metrics
        if _tracking_on(
            project
        ):  # the parent run records the overrides and the experiment; the stage its params
            parent, nested = _mlflow_runs(project, child.id)
            assert parent.data.params["override.evaluate.k_test"] == str(k)
            assert parent.data.tags["albef.dvc_experiment"] == name
            (stage_run,) = [r for r in nested if r.data.tags["albef.stage"] == "evaluate_retrieval"]
            assert stage_run.data.tags["albef.dvc_experiment"] == name
            assert stage_run.data.params["evaluate.k_test"] == str(k)
    table = _artifacts([sweep_id])["sweep"].data
    assert all(name in table for _, name, _ in by_k.values())
    # the checkout is as it was, and no workspace is left behind
    assert {name: (project / name).read_bytes() for name in before} == before
    assert len(_run(["git", "worktree", "list"], project, prefect).splitlines()) == 1 + len(
        list((project / ".dvc" / "tmp" / "albef-workspaces").glob("*"))
    )
    if _tracking_on(project):  # the best experiment's model went through the gate as a registry version
        from mlflow import MlflowClient

        best = max(by_k.values(), key=lambda v: v[2]["r_mean"])[1]
        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        registered = client.search_runs(
            [client.get_experiment_by_name("albef").experiment_id],
            f"tags.`albef.stage` = 'register' and tags.`albef.dvc_experiment` = '{best}'",
        )
        assert registered and registered[0].info.status == "FINISHED"


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


def test_a_parent_run_left_running_by_a_killed_flow_run_ends_killed(project, settings):
    """A flow run killed outright (SIGKILL: it ends nothing itself) leaves its MLflow parent run RUNNING; the
    next flow run ends it KILLED once Prefect has the flow run in a final state (CRASHED), and leaves the
    parent run of a flow run still running alone."""
    import logging

    from mlflow import MlflowClient
    from prefect.states import Crashed, Running

    from albef.orchestration import mlflow_link
    from flows.stages import data
    from flows.tasks import end_runs_of_dead_flow_runs

    cfg = mlflow_link.tracking({"mlflow": {"experiment": "albef-reaper"}}, project)
    with _client() as client:
        killed = client.create_flow_run(data, state=Running())
        alive = client.create_flow_run(data, state=Running())
        client.set_flow_run_state(killed.id, Crashed(message="the process was killed"), force=True)
    killed_run = mlflow_link.open_parent_run(cfg, str(killed.id), "killed")
    alive_run = mlflow_link.open_parent_run(cfg, str(alive.id), "alive")
    assert end_runs_of_dead_flow_runs(cfg, logging.getLogger("test")) == [killed_run]
    store = MlflowClient(cfg.uri)
    assert store.get_run(killed_run).info.status == "KILLED"
    assert store.get_run(alive_run).info.status == "RUNNING"
