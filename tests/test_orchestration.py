"""The pieces the Prefect flows stand on, without a Prefect server: stage selection, params.yaml overrides,
GPU checks, the torchrun relaunch, the supervised process group (deadline, cancellation, a killed parent),
failure messages, the artifacts' Markdown, and prefect.yaml / serve declaring every flow."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from albef.orchestration import launch, report
from albef.orchestration.pipeline import (
    FLOW_STAGES,
    PlanError,
    apply_overrides,
    check_resources,
    flow_of,
    launch_env,
    merge_overrides,
    prepare,
    select_stages,
)
from albef.orchestration.process import StageRun, failure, run_supervised

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


# ------------------------------------------------------------------------------------------- stages


def test_stages_follow_dvc_yaml_order_whatever_the_order_asked(project: Path):
    declared = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert select_stages(project) == declared  # every stage has a flow
    evaluations = [s for s in declared if s.startswith("evaluate_")]
    assert {"evaluate_zeroshot", "evaluate_retrieval"} <= set(evaluations)
    assert select_stages(project, ["evaluate", "data"]) == ["synth", *evaluations]
    # a DVC stage name is that stage (dvc repro runs what it needs); flow:<name> is the flow's stages
    assert select_stages(project, ["evaluate_zeroshot", "pretrain"]) == ["pretrain", "evaluate_zeroshot"]
    assert select_stages(project, ["evaluate_zeroshot", "flow:pretrain"]) == [
        s for s in declared if s in ("unimodal", "pretrain", "evaluate_zeroshot")
    ]


def test_a_name_that_is_both_a_stage_and_a_flow_means_the_stage(project: Path):
    """`register` is the retrieval model's registration, not the register flow, which would train and
    register every task's model; the register flow is flow:register. Every accepted name is offered."""
    from albef.orchestration.pipeline import stage_choices

    declared = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert select_stages(project, ["register"]) == ["register"]
    register_flow = select_stages(project, ["flow:register"])
    assert {"register", "register_vqa", "register_ve", "register_nlvr", "summary"} <= set(register_flow)
    assert select_stages(project, ["preprocess"]) == select_stages(project, ["flow:preprocess"])
    choices = stage_choices(declared)
    assert choices[: len(declared)] == declared
    assert {"data", "finetune", "evaluate"} <= set(choices) and "register" in choices
    assert [c for c in choices if c.startswith("flow:")] == [
        "flow:data",
        "flow:preprocess",
        "flow:pretrain",
        "flow:finetune",
        "flow:evaluate",
        "flow:register",
    ]
    for name in choices:  # every name offered is accepted
        assert select_stages(project, [name])
    with pytest.raises(PlanError, match="unknown stage 'flow:nope'"):
        select_stages(project, ["flow:nope"])


def test_grounding_and_shifted_retrieval_stages_are_declared_with_valid_sections():
    """dvc.yaml declares weakly supervised grounding (finetune + evaluate) and the cross-dataset zero-shot
    retrieval evaluation; each names a params.yaml section the flows validate, and reads files preprocess
    validates with the right schema."""
    from albef.config import read_params

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = read_params(REPO / "params.yaml")
    declared = list(spec)
    expected = {
        "finetune_grounding": ("finetune_grounding", "finetune"),
        "evaluate_grounding": ("evaluate_grounding", "evaluate"),
        "evaluate_zeroshot_shifted": ("evaluate", "evaluate"),
    }
    for stage, (section, flow) in expected.items():
        assert spec[stage]["params"] == [section] and isinstance(params[section], dict), stage
        assert flow_of(stage, declared) == flow, stage
        assert declared.index(stage) > declared.index("pretrain"), stage
    assert declared.index("finetune_grounding") < declared.index("evaluate_grounding")
    assert "models/grounding" in spec["evaluate_grounding"]["deps"]
    assert spec["evaluate_grounding"]["outs"] == ["reports/grounding"]  # metrics, results, heat-map PNGs
    assert [next(iter(m)) for m in spec["evaluate_grounding"]["metrics"]] == ["metrics/grounding.json"]
    files = params["preprocess"]["files"]
    assert files[params["finetune_grounding"]["train_file"]] == "grounding_train"
    assert params["finetune_grounding"]["init"] == "models/pretrain"
    cmd = spec["evaluate_zeroshot_shifted"]["cmd"].split()
    assert cmd[cmd.index("--model") + 1] == "models/retrieval"
    assert files[cmd[cmd.index("--test-file") + 1]] == "retrieval_eval"
    # the flows check overrides of both new sections with the loaders the stages use
    merge_overrides(params, {"finetune_grounding.max_steps": 5, "evaluate_grounding.iou_threshold": 0.7})
    for key, value in (
        ("finetune_grounding.nope", 1),
        ("finetune_grounding.epochs", 0),
        ("evaluate_grounding.iou_threshold", 2),
    ):
        with pytest.raises(PlanError, match=key.split(".")[1]):
            merge_overrides(params, {key: value})


def test_a_stage_no_flow_names_runs_with_the_flow_it_prepares(tmp_path: Path):
    spec = {"stages": {name: {"cmd": "true"} for name in ("synth", "warm_start", "pretrain", "export_onnx")}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    declared = list(spec["stages"])
    assert [flow_of(s, declared) for s in declared] == ["data", "pretrain", "pretrain", "pretrain"]
    assert select_stages(tmp_path) == declared
    assert select_stages(tmp_path, ["flow:pretrain"]) == ["warm_start", "pretrain", "export_onnx"]


def test_unknown_stage_names_fail_naming_them(project: Path):
    with pytest.raises(PlanError, match="unknown stage 'pretrian'.*a flow \\(data, preprocess"):
        select_stages(project, ["pretrain", "pretrian"])
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    for name in [s for s in spec["stages"] if s in ("register", "summary") or s.startswith("register_")]:
        spec["stages"].pop(name)
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(PlanError, match="stage 'register': dvc.yaml declares none"):
        select_stages(project, ["register"])
    assert "register" not in select_stages(project)  # by default: the stages there are


# ---------------------------------------------------------------------------------------- overrides


def test_overrides_for_unknown_keys_fail_naming_the_key_and_leave_params_alone(project: Path):
    before = (project / "params.yaml").read_bytes()
    cases = {
        "pretrain.epochz": "override 'pretrain.epochz'.*unknown key.*epochz",
        "nosuch.key": "params.yaml has no section 'nosuch'",
        "tokenizer.vocab": "params.yaml has no key tokenizer.vocab",
        "model.vision.widht": "model.vision.widht",
        "pretrain.epochs.x": "pretrain.epochs is a value",
    }
    for key, pattern in cases.items():
        with pytest.raises(PlanError, match=pattern):
            apply_overrides(project, {key: 1})
    with pytest.raises(PlanError, match="pretrain.batch_size"):
        apply_overrides(project, {"pretrain": {"batch_size": 0}})  # the stage's own loader refuses it
    with pytest.raises(PlanError, match="unknown stage"):  # a bad stage name stops before any write
        prepare(project, ["nope"], {"pretrain.epochs": 7})
    assert (project / "params.yaml").read_bytes() == before


def test_overrides_are_written_into_params_yaml_keeping_its_comments(project: Path):
    original = yaml.safe_load((project / "params.yaml").read_text())
    result = apply_overrides(
        project,
        {
            "pretrain.epochs": 1,
            "finetune_retrieval": {"lr": 5.0e-5},
            "pretrain.prefetch_factor": 3,  # not in params.yaml, but a key of the training config
            "preprocess": {"files": {"retrieval_test.json": "retrieval_eval"}},  # a dotted name, unchanged
        },
    )
    assert original["pretrain"]["epochs"] != 1 and "prefetch_factor" not in original["pretrain"]
    assert result.changed == {
        "pretrain.epochs": (original["pretrain"]["epochs"], 1),
        "finetune_retrieval.lr": (original["finetune_retrieval"]["lr"], 5.0e-5),
        "pretrain.prefetch_factor": (None, 3),
    }
    text = (project / "params.yaml").read_text()
    assert "# albef pipeline parameters" in text and "# zero-shot retrieval after each epoch" in text
    params = yaml.safe_load(text)
    assert params["pretrain"]["epochs"] == 1 and params["pretrain"]["prefetch_factor"] == 3
    assert params["finetune_retrieval"]["lr"] == 5.0e-5
    assert params["model"] == yaml.safe_load((REPO / "params.yaml").read_text())["model"]
    again = apply_overrides(project, {"pretrain.epochs": 1})
    assert again.changed == {}


def test_merge_without_overrides_is_a_copy():
    params = {"pretrain": {"epochs": 3}}
    result = merge_overrides(params, None)
    assert result.params == params and result.params is not params and result.changed == {}


# ---------------------------------------------------------------------------------------- resources


def test_a_gpu_request_on_a_machine_without_enough_gpus_fails_at_once():
    import torch

    have = torch.cuda.device_count()
    with pytest.raises(
        PlanError, match=rf"requested {have + 1} GPU\(s\) per node, but this worker sees {have}"
    ):
        check_resources(have + 1)
    with pytest.raises(PlanError, match="rdzv_endpoint"):
        check_resources(1, nodes=2)
    check_resources(0)


def test_several_processes_relaunch_the_training_commands_under_torchrun():
    assert launch_env(0) == {} and launch_env(1) == {}
    env = launch_env(4)
    assert env[launch.ENV_NPROC] == "4"
    argv = launch.torchrun_argv(["pretrain", "--params", "params.yaml", "--quiet"], env)
    assert argv[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone"]
    assert argv[-6:] == ["-m", "albef", "pretrain", "--params", "params.yaml", "--quiet"]
    multi = launch.torchrun_argv(["-v", "finetune", "retrieval"], launch_env(8, 2, "node0:29500"))
    assert "--standalone" not in multi and multi[multi.index("--nnodes") + 1] == "2"
    assert multi[multi.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert launch.torchrun_argv(["preprocess"], env) is None  # data stages stay one process
    assert launch.torchrun_argv(["pretrain"], {**env, "RANK": "0", "WORLD_SIZE": "4"}) is None
    assert launch.torchrun_argv(["pretrain"], {}) is None


def test_the_cli_execs_torchrun_when_asked(monkeypatch):
    from albef import cli

    seen = {}

    def fake_execv(path, args):
        seen["args"] = args
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    monkeypatch.setenv(launch.ENV_NPROC, "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--params", "params.yaml"])
    assert "torch.distributed.run" in seen["args"] and seen["args"][-3:] == [
        "pretrain",
        "--params",
        "params.yaml",
    ]


# --------------------------------------------------------------------------------- process groups

# A stage stand-in: a child in the group, a grandchild that leaves it (as torchrun's workers do), all pids
# written to a file, then sleep.
_TREE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]),
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)]
    with open(sys.argv[1], "w") as fh:
        fh.write(" ".join(str(p) for p in [os.getpid()] + [k.pid for k in kids]))
    print("tree up", flush=True)
    time.sleep(300)
    """
)


def _tree_command(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    return [sys.executable, str(script), str(tmp_path / "pids")], tmp_path / "pids"


def _pids(path: Path, timeout: float = 30) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and path.read_text().strip():
            return [int(p) for p in path.read_text().split()]
        time.sleep(0.05)
    raise AssertionError("the process tree did not start")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _assert_all_gone(pids: list[int], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.05)
    survivors = [p for p in pids if _alive(p)]
    for pid in survivors:  # never leave them behind, even when the test fails
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    assert not survivors, "processes of the stage outlived it"


def test_the_deadline_stops_every_process_of_the_stage(tmp_path: Path):
    command, pid_file = _tree_command(tmp_path)
    lines: list[str] = []
    started = time.monotonic()
    run = run_supervised(command, cwd=tmp_path, deadline_s=2, grace_s=2, on_line=lines.append)
    assert run.status == 124 and time.monotonic() - started < 30
    assert "tree up" in lines and any("deadline of 2 s passed" in line for line in lines)
    _assert_all_gone(_pids(pid_file))
    error = failure("pretrain", run, 2)
    assert error.retryable and "passed its deadline of 2 s" in str(error)


def test_cancelling_the_caller_stops_every_process_of_the_stage(tmp_path: Path):
    """Prefect cancels a flow run by SIGTERM, which its engine raises in the main thread: here an alarm
    raises in the middle of the wait."""

    class Cancelled(Exception):
        pass

    def cancel(signum, frame):
        raise Cancelled

    command, pid_file = _tree_command(tmp_path)
    previous = signal.signal(signal.SIGALRM, cancel)
    try:
        signal.setitimer(signal.ITIMER_REAL, 4.0)
        with pytest.raises(Cancelled):
            run_supervised(command, cwd=tmp_path, grace_s=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _assert_all_gone(_pids(pid_file))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_killed_flow_process_takes_the_stage_down_with_it(tmp_path: Path):
    command, pid_file = _tree_command(tmp_path)
    flow_process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from albef.orchestration.process import run_supervised; "
            f"run_supervised({command!r}, cwd={str(tmp_path)!r}, grace_s=2)",
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )
    pids = _pids(pid_file)
    flow_process.send_signal(signal.SIGKILL)  # no handler runs: only the supervisor can clean up
    flow_process.wait(timeout=10)
    _assert_all_gone(pids)


def test_a_failed_stage_reports_its_own_error_and_is_final():
    run = StageRun(
        255,
        1.0,
        [
            "INFO pretrain: step 4",
            "albef pretrain: error: pretrain: data/processed/pretrain.json has 32 samples, fewer than one global batch",
            "ERROR: failed to reproduce 'pretrain': failed to run: albef pretrain --params params.yaml, exited with 2",
        ],
    )
    error = failure("pretrain", run, None)
    assert "fewer than one global batch" in str(error) and "exit status 255" in str(error)
    assert not error.retryable
    for status in ("-9", "137"):  # the stage killed directly, or under a shell that stayed in between
        killed = failure(
            "pretrain", StageRun(255, 1.0, [f"ERROR: failed to run: ... exited with {status}"]), None
        )
        assert killed.retryable and f"exited with {status}" in str(killed)
        last_line = str(killed).splitlines()[-1]  # what the Prefect task records for a retried attempt
        assert (
            f"exited with {status} (the stage's process was killed by SIGKILL, as the kernel's" in last_line
        )
    crashed = failure("pretrain", StageRun(255, 1.0, ["ERROR: failed to run: ... exited with 139"]), None)
    assert "killed by SIGSEGV; a retry resumes a training stage" in str(crashed)
    plain = failure("pretrain", StageRun(255, 1.0, ["ERROR: failed to run: ... exited with 1"]), None)
    assert "killed by" not in str(plain)


def test_resume_step_is_read_from_the_engine_log_as_it_streams(tmp_path: Path):
    line = (
        "INFO pretrain: resumed from runs/pretrain/checkpoints/step-000000006.pt (step 6, epoch 0, batch 6)"
    )
    script = f"print({line!r}); [print('INFO step', i) for i in range(50)]"
    run = run_supervised([sys.executable, "-c", script], cwd=tmp_path, keep_lines=10)
    assert run.status == 0 and line not in run.tail and run.resumed_from_step == 6
    assert run_supervised([sys.executable, "-c", "print('fresh')"], cwd=tmp_path).resumed_from_step is None


# ---------------------------------------------------------------------------------------- artifacts


def test_stage_files_come_from_dvc_yaml_and_metrics_render_as_a_table(tmp_path: Path):
    files = report.stage_files(REPO, "evaluate_retrieval")
    assert files.metrics == ["metrics/retrieval.json"] and files.images == ["reports/retrieval/examples.png"]
    assert report.stage_files(REPO, "pretrain").images == ["plots/pretrain/curves.png"]
    assert report.stage_files(REPO, "synth").images == []
    assert report.stage_files(REPO, "evaluate_grounding").images == ["reports/grounding/examples.png"]
    (tmp_path / "m.json").write_text(json.dumps({"r_mean": 12.5, "itc": {"txt_r1": 3.0}, "steps": 8}))
    markdown = report.metrics_markdown(
        "evaluate_retrieval", report.read_metrics(tmp_path, ["m.json", "gone.json"])
    )
    assert "| itc.txt_r1 | 3 |" in markdown and "| r_mean | 12.5 |" in markdown
    assert report.artifact_key("evaluate_retrieval", "examples") == "evaluate-retrieval-examples"
    png = tmp_path / "x.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 10)
    assert "data:image/png;base64," in report.image_markdown(tmp_path, "x.png", "x")
    assert report.image_markdown(tmp_path, "missing.png", "x") is None


# --------------------------------------------------------------------------------------- deployments


def test_prefect_yaml_deploys_every_flow_to_the_gpu_pool_with_schedules_off():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = spec["deployments"]
    entrypoints = {d["entrypoint"] for d in deployments}
    expected = {f"flows/stages.py:{name}" for name in FLOW_STAGES} | {
        "flows/pipeline.py:full_pipeline",
        "flows/sweep.py:sweep",
    }
    assert entrypoints == expected
    for d in deployments:
        assert d["work_pool"]["name"] == "albef-gpu", d["entrypoint"]
        assert all(s["active"] is False for s in d.get("schedules") or []), d["entrypoint"]
        assert d.get("schedules") or d["entrypoint"] == "flows/sweep.py:sweep"  # (a sweep is started by hand)
        assert d["parameters"]["gpus"] == 0 and d["parameters"]["retries"] >= 1


def test_serve_offers_the_deployments_of_prefect_yaml():
    from flows.serve import build_deployments
    from flows.stages import STAGE_FLOWS

    built = build_deployments()
    assert sorted(d.flow_name for d in built) == sorted([*STAGE_FLOWS, "full_pipeline", "sweep"])
    for d in built:
        assert d.name == "albef" and not any(s.active for s in d.schedules or [])
        assert d.schedules or d.flow_name == "sweep"  # (a sweep is started by hand)


# -------------------------------------------------------------------------------------------- mlflow


@pytest.mark.slow
def test_the_mlflow_parent_run_is_continued_on_retry_and_each_stage_run_is_found(tmp_path: Path, monkeypatch):
    """Against a real sqlite store: the flow's parent run, the stages' runs nested under it
    (albef.tracking), a retried stage continuing its interrupted run, the link lookup."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from albef.orchestration import mlflow_link as ml

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = {
        "mlflow": {
            "enabled": True,
            "tracking_uri": "sqlite:///mlflow.db",
            "experiment": "albef-flows",
            "spool_dir": str(tmp_path / "spool"),
        }
    }
    assert ml.tracking({}, tmp_path) is None
    assert ml.tracking({"mlflow": {"enabled": False}}, tmp_path) is None
    assert ml.open_parent_run(None, "x", "y") is None and ml.find_stage_run(None, "p", "pretrain") is None
    cfg = ml.tracking(params, tmp_path)
    assert cfg.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"

    parent = ml.open_parent_run(cfg, "flow-run-1", "prefect-test")
    assert parent and ml.open_parent_run(cfg, "flow-run-1", "prefect-test") == parent  # a retry continues it
    assert ml.open_parent_run(cfg, "flow-run-2", "prefect-other") != parent

    from albef.tracking.run import PARENT_ENV, STAGE_RUN_ENV, stage_run, start_stage_run

    # a first attempt killed mid-run: its stage run stays RUNNING (nothing ended it)
    monkeypatch.setenv(PARENT_ENV, parent)
    killed = start_stage_run(params, "pretrain")
    killed.log_metrics({"loss": 2.0}, step=1)
    killed.pump(force=True)
    killed.journal.unlock()
    assert ml.find_stage_run(cfg, parent, "pretrain").status == "RUNNING"
    # the flow sees the stage process end without success and its run still RUNNING: it was killed outright
    assert ml.end_orphaned_stage_run(cfg, parent, "pretrain") == killed.run_id
    assert ml.end_orphaned_stage_run(cfg, parent, "pretrain") is None  # a run already ended is left alone
    interrupted = ml.find_stage_run(cfg, parent, "pretrain")
    assert interrupted.run_id == killed.run_id and interrupted.status == "KILLED"
    # the retry, told which run to continue (as the flow's task does), logs into the same run
    monkeypatch.setenv(STAGE_RUN_ENV, interrupted.run_id)
    with stage_run(params, "pretrain") as run:
        run.log_metrics({"loss": 1.0}, step=2)
    stage_id = run.run_id
    assert stage_id == killed.run_id
    client = MlflowClient(cfg.uri)
    exp = client.get_experiment_by_name("albef-flows")
    assert (
        exp.artifact_location == f"mlruns/{exp.experiment_id}"
    )  # created by the flow, portable all the same
    nested = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ml.PARENT_TAG}` = '{parent}'")
    assert [r.info.run_id for r in nested] == [stage_id]  # one run for the stage, not one per attempt
    assert [m.step for m in client.get_metric_history(stage_id, "loss")] == [1, 2]
    ref = ml.find_stage_run(cfg, parent, "pretrain")
    assert ref.run_id == stage_id and ref.status == "FINISHED" and ref.url is None  # sqlite: no web address
    assert ml.find_stage_run(cfg, parent, "finetune_retrieval") is None
    with_ui = ml.Tracking(cfg.uri, cfg.experiment, ui_url="http://mlflow.example:5000/")
    assert with_ui.run_url("1", stage_id) == f"http://mlflow.example:5000/#/experiments/1/runs/{stage_id}"
    ml.close_parent_run(cfg, parent, "FINISHED")
    assert MlflowClient(cfg.uri).get_run(parent).info.status == "FINISHED"


def test_a_cancelled_flow_run_ends_its_parent_run_killed_and_a_failed_one_failed():
    pytest.importorskip("prefect")
    from prefect.exceptions import CancelledRun, TerminationSignal

    from albef.orchestration.mlflow_link import ending_status
    from albef.orchestration.process import StageFailed

    stopped = [TerminationSignal(signal.SIGTERM), CancelledRun(), KeyboardInterrupt()]
    stopped.append(StageFailed("stage pretrain was stopped (cancelled)", 143, retryable=False))
    assert [ending_status(exc) for exc in stopped] == ["KILLED"] * 4
    failed = [StageFailed("stage pretrain failed (exit status 1)", 1, retryable=False), RuntimeError("x")]
    assert [ending_status(exc) for exc in failed] == ["FAILED"] * 2


@pytest.mark.slow
def test_an_unreachable_tracking_server_costs_no_pipeline(tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow")
    from albef.orchestration import mlflow_link as ml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    cfg = ml.tracking({"mlflow": {"enabled": True}}, tmp_path)
    started = time.monotonic()
    assert ml.open_parent_run(cfg, "flow-run-1", "prefect-test") is None
    assert ml.find_stage_run(cfg, "parent", "pretrain") is None
    assert time.monotonic() - started < 60


def test_overrides_of_the_downstream_task_sections_are_checked_by_the_stages_own_readers():
    from albef.config import read_params
    from albef.orchestration.pipeline import merge_overrides

    params = read_params(Path(__file__).resolve().parents[1] / "params.yaml")
    merged = merge_overrides(
        params,
        {
            "finetune_vqa.epochs": 3,
            "evaluate_vqa.k_test": 8,
            "finetune_ve.max_words": 20,  # a key the section does not spell out but the stage reads
            "pretrain_nlvr.max_steps": 10,
            "evaluate_nlvr.batch_size": 8,
        },
    )
    assert merged.params["finetune_vqa"]["epochs"] == 3 and merged.params["finetune_ve"]["max_words"] == 20
    for key, value, named in (
        ("finetune_vqa.batch_size", "big", "finetune_vqa.batch_size"),
        ("finetune_vqa.val_file", "vqa_test.json", "finetune_vqa.val_file"),
        ("evaluate_vqa.k_tset", 8, "k_tset"),
        ("finetune_ve.epochs", 0, "finetune_ve.epochs"),
        ("pretrain_nlvr.batch_size", 2, "pretrain_nlvr.batch_size"),
        ("evaluate_nlvr.bacth_size", 8, "bacth_size"),
    ):
        with pytest.raises(PlanError, match=named):
            merge_overrides(params, {key: value})
