"""MLflow tracking of the stages against a real ``mlflow server`` on loopback: nested runs, step metrics,
provenance and artifacts; an unreachable or failing server that training survives; config errors."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port, tiny_train_params

from albef.config import ConfigError
from albef.stages import tracked_evaluate, tracked_train
from albef.tracking.config import TrackingConfig, tracking_config, validate_model_name
from albef.tracking.journal import journals
from albef.tracking.run import start_stage_run


def _params(root: Path, experiment: str, **mlflow) -> dict:
    params = tiny_train_params(root, **{"pretrain.epochs": 1, "finetune_retrieval.epochs": 1})
    params["mlflow"] = {"experiment": experiment, "spool_dir": str(root / "spool"), **mlflow}
    return params


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _runs(experiment: str):
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_pipeline_stages_are_nested_runs_with_metrics_provenance_and_artifacts(tiny_data, tracked, tmp_path):
    params = _params(tiny_data, tracked)
    pre = tracked_train(params, "pretrain", "pretrain", progress=False)
    tracked_train(params, "finetune_retrieval", "retrieval", progress=False)
    tracked_evaluate(params, params["finetune_retrieval"]["out"], tmp_path / "report", progress=False)

    runs = _runs(tracked)
    parents = [r for r in runs if r.data.tags.get("albef.kind") == "pipeline"]
    stages = {r.data.tags.get("albef.stage"): r for r in runs if r.data.tags.get("albef.kind") == "stage"}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert set(stages) == {"pretrain", "finetune_retrieval", "evaluate_report"}
    for run in stages.values():
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == "FINISHED"
        assert "albef.lib.torch" in run.data.tags and "albef.lib.mlflow" in run.data.tags
        assert run.data.tags["albef.data_version"]
        assert run.data.tags.get("albef.git.commit")  # the tests run inside the project's git checkout

    client = _client()
    pretrain = stages["pretrain"]
    # flattened config as params, every loss term, lr, alpha, temperature and throughput per step
    assert (
        pretrain.data.params["pretrain.batch_size"] == "4" and pretrain.data.params["model.preset"] == "tiny"
    )
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm", "lr", "alpha", "temp", "samples_per_s"):
        history = client.get_metric_history(pretrain.info.run_id, key)
        assert len(history) == pre["steps"], key  # log_every=1: one point per optimisation step
        assert [m.step for m in history] == list(range(1, pre["steps"] + 1))
    assert client.get_metric_history(pretrain.info.run_id, "val_r_mean")
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"config", "metrics.json", "plots", "model"} <= artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(pretrain.info.run_id, "plots")}
    assert {"train.csv", "curves.png"} <= plots

    evaluate = stages["evaluate_report"]
    assert {"txt_r1", "img_r1", "r_mean", "itc.r_mean"} <= set(evaluate.data.metrics)
    report = {Path(a.path).name for a in client.list_artifacts(evaluate.info.run_id, "report")}
    assert report == {"examples.png", "rankings.json"}
    assert not list(journals(tiny_data / "spool")), "delivered journals are removed"


def test_only_rank_zero_logs(tiny_data, tracked, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert start_stage_run(_params(tiny_data, tracked), "pretrain") is None


def test_training_goes_on_without_a_server_and_sync_delivers_every_metric(
    tiny_data, tracked, monkeypatch, caplog, tmp_path
):
    """The server is unreachable for the whole stage: training finishes with a warning, every call waits
    in the journal, and `albef mlflow sync` delivers them with their original steps."""
    live = _client().tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    params = _params(tiny_data, tracked, request_timeout=2, request_retries=0)
    params["pretrain"]["run_dir"] = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="albef.tracking"):
        metrics = tracked_train(params, "pretrain", "pretrain", progress=False)
    assert metrics["steps"] > 0
    assert "unavailable" in caplog.text and "albef mlflow sync" in caplog.text
    assert len(list(journals(tiny_data / "spool"))) == 1

    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params))  # JSON is YAML
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": live}
    result = subprocess.run(
        [sys.executable, "-m", "albef", "mlflow", "sync", "--params", str(params_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "delivered 1 journal" in result.stdout
    assert not list(journals(tiny_data / "spool"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", live)
    (stage,) = [r for r in _runs(tracked) if r.data.tags.get("albef.stage") == "pretrain"]
    history = _client().get_metric_history(stage.info.run_id, "loss_itc")
    assert [m.step for m in history] == list(range(1, metrics["steps"] + 1))
    assert stage.info.status == "FINISHED"


class _Switch(BaseHTTPRequestHandler):
    """A reverse proxy in front of the tracking server that answers 503 while ``down`` is set."""

    target = ""
    down = threading.Event()

    def _forward(self):
        if self.down.is_set():
            self.send_response(503)
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        req = urllib.request.Request(self.target + self.path, data=body, method=self.command)
        for key in ("Content-Type",):
            if self.headers.get(key):
                req.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, data, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

    def log_message(self, *args):
        pass


def test_a_server_failing_mid_run_loses_nothing(tiny_data, tracked, mlflow_server, monkeypatch, caplog):
    handler = type("Switch", (_Switch,), {"target": mlflow_server.url, "down": threading.Event()})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{proxy.server_address[1]}")
        params = _params(tiny_data, tracked, retry_every=0, request_retries=0, request_timeout=5)
        run = start_stage_run(params, "pretrain")
        for step in range(1, 4):
            run.on_log(step, {"step": step, "loss": 1.0 / step})
        handler.down.set()
        with caplog.at_level(logging.WARNING, logger="albef.tracking"):
            for step in range(4, 7):
                run.on_log(step, {"step": step, "loss": 1.0 / step})
        assert "unavailable" in caplog.text and run.journal.pending() == 3
        handler.down.clear()
        run.on_log(7, {"step": 7, "loss": 1.0 / 7})
        assert "is back" in caplog.text
        assert run.finish() is True
        history = _client().get_metric_history(run.run_id, "loss")
        assert [m.step for m in history] == list(range(1, 8))
    finally:
        proxy.shutdown()


@pytest.mark.parametrize(
    "uri",
    ["htp://127.0.0.1:5000", "127.0.0.1:5000", "sqlite:/mlflow.db", "http://", ""],
)
def test_a_wrong_tracking_uri_is_a_clear_error(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri) if uri else monkeypatch.delenv(
        "MLFLOW_TRACKING_URI", raising=False
    )
    cfg = TrackingConfig(tracking_uri=uri or " ")
    with pytest.raises(ConfigError, match="tracking URI|URI"):
        cfg.resolved_uri()


def test_tracking_config_defaults_and_typos(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_config({}).enabled is False  # no section: plain stages, no database appears
    assert tracking_config({"mlflow": {}}).resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_config({"mlflow": {}}).resolved_uri() == "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match=r"mlflow: unknown key\(s\) \['tracking_url'\]"):
        tracking_config({"mlflow": {"tracking_url": "x"}})


@pytest.mark.parametrize(
    "name", ["albef/retrieval", "albef retrieval", "models:x", "albef@champion", "-x", ""]
)
def test_registry_names_with_forbidden_characters_are_refused(name):
    with pytest.raises(ConfigError, match="not a valid registered model name"):
        validate_model_name(name, "register.model_name")


def test_a_call_the_store_refuses_is_set_aside_and_the_rest_delivered(mlflow_sqlite, tmp_path):
    params = {"mlflow": {"experiment": "refused", "spool_dir": str(tmp_path / "spool")}, "lr": 0.1}
    run = start_stage_run(params, "pretrain")
    run.log_params({"lr": 0.2})  # params are immutable in MLflow: a different value is refused
    run.on_log(1, {"step": 1, "loss": 3.0})
    assert run.finish() is True
    rejected = [json.loads(line) for line in run.journal.rejected_path.read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["op"]["params"] == {"lr": "0.2"}
    stored = _client().get_run(run.run_id)
    assert stored.data.params["lr"] == "0.1" and stored.data.metrics["loss"] == 3.0


def test_an_orchestrator_given_parent_is_used_and_left_alone(mlflow_sqlite, tmp_path, monkeypatch):
    client = _client()
    exp = client.create_experiment("orchestrated")
    parent = client.create_run(exp, run_name="prefect-flow").info.run_id
    monkeypatch.setenv("ALBEF_MLFLOW_PARENT_RUN_ID", parent)
    params = {"mlflow": {"experiment": "orchestrated", "spool_dir": str(tmp_path / "spool")}}
    from albef.tracking.run import stage_run

    with stage_run(params, "pretrain") as run:
        run.on_log(1, {"step": 1, "loss": 1.0})
    assert client.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).info.status == "RUNNING"  # the orchestrator ends it


def test_names_mlflow_would_refuse_are_made_safe_and_nothing_is_set_aside(mlflow_sqlite, tmp_path):
    # params.yaml names annotation files such as refcoco+_train.json: one '+' in a key made MLflow refuse the
    # whole batch of 100 params it travelled in
    files = {"refcoco+_train.json": "grounding_train", "pretrain.json": "pretrain"}
    params = {
        "mlflow": {"experiment": "names", "spool_dir": str(tmp_path / "spool")},
        "preprocess": {"files": files},
    }
    run = start_stage_run(params, "preprocess")
    run.log_metrics({"split": {"refcoco+": {"acc": 0.5}}})
    assert run.finish() is True
    assert not run.journal.rejected_path.exists()
    stored = _client().get_run(run.run_id).data
    assert stored.params["preprocess.files.refcoco__train.json"] == "grounding_train"
    assert stored.params["preprocess.files.pretrain.json"] == "pretrain"
    assert stored.metrics["split.refcoco_.acc"] == 0.5


def test_a_stage_on_an_adjusted_copy_of_params_nests_under_the_same_pipeline_run(mlflow_sqlite, tmp_path):
    # `albef evaluate retrieval --test-file shifted_test.json` runs on a copy of params.yaml with another
    # test file; its run must join the parent of the other stages of the same `dvc repro`
    from albef.stages import with_test_file

    params = {
        "mlflow": {"experiment": "adjusted", "spool_dir": str(tmp_path / "spool")},
        "evaluate": {"test_file": "retrieval_test.json"},
    }
    first = start_stage_run(params, "evaluate_retrieval")
    assert first.finish() is True
    adjusted = with_test_file(params, "retrieval", "shifted_test.json")
    shifted = start_stage_run(adjusted, "evaluate_zeroshot_shifted", pipeline_params=params)
    assert shifted.finish() is True
    parent = {_client().get_run(r.run_id).data.tags["mlflow.parentRunId"] for r in (first, shifted)}
    assert len(parent) == 1
    alone = start_stage_run(adjusted, "evaluate_other")  # without it, the copy names another pipeline run
    assert alone.finish() is True
    assert _client().get_run(alone.run_id).data.tags["mlflow.parentRunId"] not in parent


# ------------------------------------------------------------------------------------- system metrics


@pytest.mark.parametrize(
    ("configured", "env", "sampled"),
    [(True, None, True), (False, "true", True), (True, "false", False)],
    ids=["params", "env-on", "env-off"],
)
def test_stage_runs_sample_system_metrics_unless_switched_off(
    configured, env, sampled, mlflow_sqlite, tmp_path, monkeypatch
):
    # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING, when set, wins over params (MLflow ignores it for client-made runs)
    if env is None:
        monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", env)
    params = {
        "mlflow": {
            "experiment": "system",
            "spool_dir": str(tmp_path / "spool"),
            "system_metrics": configured,
            "system_metrics_interval": 0.1,
        }
    }
    run = start_stage_run(params, "pretrain")
    names = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")
    end = time.monotonic() + (15 if sampled else 1)
    while time.monotonic() < end and not set(names) <= set(_client().get_run(run.run_id).data.metrics):
        time.sleep(0.1)
    assert run.finish() is True
    stored = _client().get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert (set(names) <= set(stored.data.metrics)) is sampled
    assert sampled or not any(name.startswith("system/") for name in stored.data.metrics)


def test_a_malformed_system_metrics_switch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "yes please")
    with pytest.raises(ConfigError, match="MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING: expected true or false"):
        tracking_config({"mlflow": {}}).system_metrics_on()
    with pytest.raises(ConfigError, match="mlflow.system_metrics_interval"):
        tracking_config({"mlflow": {"system_metrics_interval": 0}})


# -------------------------------------------------------------------------------- a stage stopped by SIGTERM

_STOPPED_STAGE = """
import json, os, signal, sys, time
from albef.tracking import journal
from albef.tracking.run import stage_run

params, when = json.loads(sys.argv[1]), sys.argv[2]
if when == "delivering":
    # SIGTERM right after the store created the stage's run, before the journal has recorded its id
    apply = journal.Deliverer._apply

    def apply_then_signal(self, op, state, jrnl):
        apply(self, op, state, jrnl)
        if op.get("op") == "run":
            os.kill(os.getpid(), signal.SIGTERM)

    journal.Deliverer._apply = apply_then_signal
with stage_run(params, "pretrain") as run:
    print("training", flush=True)
    step = 0
    while True:
        step += 1
        run.on_log(step, {"step": step, "loss": 1.0 / step})
        time.sleep(0.02)
"""


@pytest.mark.parametrize("when", ["training", "delivering"])
def test_a_stage_stopped_by_sigterm_ends_its_run_and_the_pipeline_run_killed(when, mlflow_sqlite, tmp_path):
    """SIGTERM is how a cancelled flow run, a passed deadline or `kill` stop a stage: its run and the parent it
    owns end KILLED (not RUNNING for ever); arriving mid-delivery, it waits until the call is recorded, so the
    run is not created twice."""
    params = {"mlflow": {"experiment": f"stopped-{when}", "spool_dir": str(tmp_path / "spool")}, "lr": 0.1}
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_STAGE, json.dumps(params), when],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if when == "training":
            assert proc.stdout.readline().strip() == "training", proc.stderr.read()
            time.sleep(0.3)  # a few steps
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "training" not in out  # mid-delivery: the stage stopped while opening its run, before its body
    runs = _client().search_runs([_client().get_experiment_by_name(f"stopped-{when}").experiment_id])
    stages = [r for r in runs if r.data.tags.get("albef.kind") == "stage"]
    (parent,) = [r for r in runs if r.data.tags.get("albef.kind") == "pipeline"]
    assert len(stages) == 1, [(r.info.run_id, r.info.status) for r in stages]
    assert stages[0].info.status == "KILLED" and parent.info.status == "KILLED"
    assert stages[0].data.params["lr"] == "0.1"
    assert not list(journals(tmp_path / "spool")), "every call was delivered before the stage stopped"
