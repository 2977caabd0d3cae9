"""Secrets never reach MLflow, the logs or error messages: a password inside a tracking URI (params.yaml's
``mlflow.tracking_uri``, ``MLFLOW_TRACKING_URI``), params named like secrets, a token in the git remote. The real
URI is still the one the client connects with."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from albef.config import ConfigError, flatten
from albef.tracking.config import TrackingConfig, validate_tracking_uri
from albef.tracking.redact import REDACTED, is_secret_key, redact, redact_text, redact_uri

PROJECT = Path(__file__).resolve().parents[1]
SECRETS = ("s3cr3t", "xyz-api-token", "hunter2", "qwerty", "ghp_R3m0teT0ken", "zzz-auth")
SECRET_URI = "http://alice:s3cr3t@127.0.0.1:1/"


def _leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


# ----------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://alice:s3cr3t@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),
        (
            "https://x-access-token:ghp_R3m0teT0ken@github.com/o/r.git",
            "https://x-access-token:***@github.com/o/r.git",
        ),
        (
            "https://ghp_R3m0teT0ken@github.com/o/r.git",
            "https://***@github.com/o/r.git",
        ),  # a token as the user
        (
            "postgresql+psycopg2://mlflow:p@ss@db:5432/mlflow",
            "postgresql+psycopg2://mlflow:***@db:5432/mlflow",
        ),
        ("postgresql://mlflow:p%40ss%2Fw0rd@db/mlflow", "postgresql://mlflow:***@db/mlflow"),
        ("mysql://mlflow:hunter2@db/mlflow?charset=utf8", "mysql://mlflow:***@db/mlflow?charset=utf8"),
        (
            "https://h/x?token=qwerty&split=train&X-Amz-Signature=ab12",
            "https://h/x?token=***&split=train&X-Amz-Signature=***",
        ),
        (
            "https://h/x?access_key=a&secret=b&password=c",
            "https://h/x?access_key=***&secret=***&password=***",
        ),
        # malformed ones, as an error message would echo them
        ("htp://alice:s3cr3t@host:5000", "htp://alice:***@host:5000"),
        ("alice:s3cr3t@host:5000", "alice:***@host:5000"),
        ("http:/alice:s3cr3t@host", "http:/alice:***@host"),
        # nothing to hide: left exactly as it is
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("ssh://git@github.com/o/r.git", "ssh://git@github.com/o/r.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),
        ("postgresql://mlflow@db/mlflow", "postgresql://mlflow@db/mlflow"),
        ("models:/albef-retrieval@champion", "models:/albef-retrieval@champion"),
        ("https://h/x?tokenizer=bert&max_tokens=30", "https://h/x?tokenizer=bert&max_tokens=30"),
    ],
)
def test_redact_uri(uri, shown):
    assert redact_uri(uri) == shown
    assert redact_uri(shown) == shown  # redacting twice changes nothing


def test_uris_inside_an_error_message_are_redacted():
    message = (
        "API request to http://alice:s3cr3t@127.0.0.1:9/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded"
    )
    shown = redact_text(message)
    assert "s3cr3t" not in shown and "http://alice:***@127.0.0.1:9/api/2.0/mlflow/runs/create" in shown
    assert (
        redact_text("'htp://alice:s3cr3t@h' is not a tracking URI")
        == "'htp://alice:***@h' is not a tracking URI"
    )


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apiKey",
        "hub.api_token",
        "mlflow.auth_token",
        "access_token",
        "aws_secret_access_key",
        "secret_key",
        "private_key",
        "credentials",
        "db_password",
        "client_secret",
        "MLFLOW_TRACKING_PASSWORD",
        "AWS_SESSION_TOKEN",
        "override.s3.access-key",
    ],
)
def test_keys_named_like_secrets(name):
    assert is_secret_key(name)


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer",
        "max_tokens",
        "tokens",
        "cls_token_id",
        "pad_token",
        "mask_token",
        "evaluate.tokenizer",
        "vocab_size",
        "key",
        "aws_access_key_id",
        "private_key_path",
        "mlflow.tracking_uri",
        "keep_password_prompt",
    ],
)
def test_keys_that_are_not_secrets(name):
    assert not is_secret_key(name)


def test_nothing_in_the_projects_params_is_redacted():
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())

    def keys(values, prefix=""):
        if isinstance(values, dict):
            for key, value in values.items():
                yield f"{prefix}{key}"
                yield from keys(value, f"{prefix}{key}.")

    assert [key for key in keys(params) if is_secret_key(key)] == []
    assert redact(params) == params


def test_redact_a_nested_mapping():
    values = {
        "mlflow": {"tracking_uri": SECRET_URI, "experiment": "albef"},
        "hub": {"api_token": "xyz-api-token", "credentials": {"user": "u", "key": "k"}, "password": None},
        "sources": ["https://bob:hunter2@data.example.com/d", 3],
        "tokenizer": {"max_tokens": 30, "cls_token_id": 101},
    }
    assert redact(values) == {
        "mlflow": {"tracking_uri": "http://alice:***@127.0.0.1:1/", "experiment": "albef"},
        "hub": {"api_token": REDACTED, "credentials": REDACTED, "password": None},  # nothing to hide in None
        "sources": ["https://bob:***@data.example.com/d", 3],
        "tokenizer": {"max_tokens": 30, "cls_token_id": 101},
    }
    assert values["hub"]["api_token"] == "xyz-api-token"  # a copy: the caller's params are untouched


def test_a_flow_runs_request_params_are_redacted():
    from albef.orchestration.mlflow_link import request_params

    params = request_params(
        {
            "stages": ["evaluate"],
            "overrides": {
                "mlflow.tracking_uri": SECRET_URI,
                "hub.api_token": "xyz-api-token",
                "evaluate.k_test": 4,
            },
        }
    )
    assert params == {
        "stages": "evaluate",
        "override.mlflow.tracking_uri": "http://alice:***@127.0.0.1:1/",
        "override.hub.api_token": REDACTED,
        "override.evaluate.k_test": "4",
    }


# --------------------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    "uri",
    [
        "htp://alice:s3cr3t@127.0.0.1:5000",  # a scheme MLflow does not know
        "alice:s3cr3t@127.0.0.1:5000",  # no scheme
        "http://alice:s3cr3t@",  # no host
        "http:/alice:s3cr3t@127.0.0.1:5000",
        "sqlite://alice:s3cr3t@host/mlflow.db",  # two slashes
    ],
)
@pytest.mark.parametrize("source", ["MLFLOW_TRACKING_URI", "mlflow.tracking_uri"])
def test_a_malformed_tracking_uri_error_does_not_echo_its_password(uri, source, monkeypatch):
    if source == "MLFLOW_TRACKING_URI":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as raised:
        TrackingConfig(tracking_uri=uri).resolved_uri()
    message = str(raised.value)
    assert message.startswith(source) and "alice:***@" in message
    assert not _leaks(message)


def test_the_cli_error_for_a_malformed_uri_does_not_echo_its_password(tmp_path, capsys):
    from albef.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"mlflow": {"spool_dir": str(tmp_path / "spool")}}))
    bad = "htp://alice:s3cr3t@127.0.0.1:5000"
    assert main(["mlflow", "sync", "--params", str(params), "--tracking-uri", bad]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri" in err and "alice:***@" in err and not _leaks(err)


def test_a_valid_uri_is_used_as_it_is():
    assert validate_tracking_uri(SECRET_URI) == SECRET_URI  # what the client connects with keeps the password


# ------------------------------------------------------------------------------------ MLflow's store


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        timeout=30,
    )


def _artifact_texts(client, run_id: str, dest: Path) -> dict[str, str]:
    root = Path(client.download_artifacts(run_id, "", str(dest)))
    return {str(p.relative_to(root)): p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()}


def test_no_secret_reaches_params_tags_or_artifacts(mlflow_sqlite, tmp_path, caplog):
    from mlflow import MlflowClient

    from albef.tracking.run import stage_run

    # the project is a clone whose remote URL carries a token
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "init")
    _git(tmp_path, "remote", "add", "origin", "https://x-access-token:ghp_R3m0teT0ken@github.com/o/r.git")
    params = {
        # MLFLOW_TRACKING_URI (the test's sqlite store) wins over this one, which is only logged
        "mlflow": {
            "experiment": "secrets",
            "tracking_uri": SECRET_URI,
            "spool_dir": str(tmp_path / "spool"),
            "system_metrics": False,
        },
        "hub": {
            "api_token": "xyz-api-token",
            "url": "https://bob:hunter2@data.example.com/d?token=qwerty&n=1",
        },
        "tokenizer": {"max_tokens": 30, "cls_token_id": 101},
    }
    with (
        caplog.at_level(logging.DEBUG),
        stage_run(params, "pretrain", tags={"hub.auth_token": "zzz-auth"}) as run,
    ):
        run.log_dict(params, "params.json", "config")  # as tracked_train does
        run.set_tags({"albef.source": "https://bob:hunter2@data.example.com/d"})
    client = MlflowClient()
    exp = client.get_experiment_by_name("secrets")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the stage and its pipeline parent
    for stored in runs:
        shown = json.dumps({"params": stored.data.params, "tags": stored.data.tags})
        assert not _leaks(shown), stored.data.tags.get("albef.kind")
        artifacts = _artifact_texts(client, stored.info.run_id, tmp_path / "artifacts" / stored.info.run_id)
        assert not [name for name, text in artifacts.items() if _leaks(text)]
    assert not _leaks(caplog.text)

    stage = client.get_run(run.run_id).data
    assert stage.params["mlflow.tracking_uri"] == "http://alice:***@127.0.0.1:1/"
    assert stage.params["hub.api_token"] == REDACTED
    assert stage.params["hub.url"] == "https://bob:***@data.example.com/d?token=***&n=1"
    assert stage.params["tokenizer.max_tokens"] == "30" and stage.params["tokenizer.cls_token_id"] == "101"
    assert stage.tags["albef.git.remote"] == "https://x-access-token:***@github.com/o/r.git"
    assert stage.tags["hub.auth_token"] == REDACTED
    logged = json.loads(_artifact_texts(client, run.run_id, tmp_path / "config")["config/params.json"])
    assert flatten(logged) == {
        **flatten(params),
        "mlflow.tracking_uri": "http://alice:***@127.0.0.1:1/",
        "hub.api_token": REDACTED,
        "hub.url": "https://bob:***@data.example.com/d?token=***&n=1",
    }


# ------------------------------------------------------------------------ logs of an unreachable store


class _Unavailable(BaseHTTPRequestHandler):
    """A tracking server that answers 503 to everything, and records the credentials it was sent."""

    seen: ClassVar[list[str]] = []

    def _answer(self):
        self.seen.append(self.headers.get("Authorization") or "")
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable_server(monkeypatch, tmp_path):
    handler = type("Unavailable", (_Unavailable,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for name in ("ALBEF_MLFLOW_PARENT_RUN_ID", "ALBEF_MLFLOW_PIPELINE", "ALBEF_MLFLOW_STAGE_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield f"http://alice:s3cr3t@127.0.0.1:{server.server_address[1]}/", handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_logs_and_reports_of_an_unreachable_store_do_not_show_its_password(
    unavailable_server, tmp_path, monkeypatch, caplog, capsys
):
    from albef.cli import main
    from albef.orchestration import mlflow_link
    from albef.tracking.run import start_stage_run

    uri, seen = unavailable_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = {
        "mlflow": {
            "experiment": "secrets",
            "spool_dir": str(tmp_path / "spool"),
            "retry_every": 0,
            "request_retries": 0,
            "request_timeout": 5,
            "system_metrics": False,
        },
        "hub": {"api_token": "xyz-api-token"},
    }
    with caplog.at_level(logging.INFO):
        run = start_stage_run(params, "pretrain")
        run.on_log(1, {"step": 1, "loss": 1.0})
        assert run.finish() is False  # the calls wait in the journal
        assert mlflow_link.open_parent_run(mlflow_link.Tracking(uri, "secrets"), "flow-1", "pipeline") is None
    # the client did connect with the real credentials
    assert f"Basic {base64.b64encode(b'alice:s3cr3t').decode()}" in seen
    assert "unavailable" in caplog.text and "no parent run" in caplog.text
    assert "alice:***@127.0.0.1" in caplog.text
    assert not _leaks(caplog.text)
    # what waits on disk for `albef mlflow sync` holds no secret either
    spool = "".join(p.read_text(errors="replace") for p in (tmp_path / "spool").rglob("*") if p.is_file())
    assert spool and not _leaks(spool)

    params_file = tmp_path / "params.yaml"
    params_file.write_text(json.dumps(params))
    capsys.readouterr()
    assert main(["mlflow", "sync", "--params", str(params_file)]) == 1  # still pending
    out = capsys.readouterr()
    assert "pending" in out.out and "alice:***@" in out.out
    assert not _leaks(out.out + out.err)
