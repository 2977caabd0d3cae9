"""``mlflow models serve`` answering real HTTP requests for the champion that ``albef registry fetch`` checked,
and a tracking server whose artifact store is S3 (moto's server on loopback, a real HTTP endpoint)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import ServiceProcess, free_port, mlflow_env, start_mlflow_server
from moto.server import ThreadedMotoServer

from albef.tracking.register import register_stage
from albef.tracking.run import start_stage_run


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_models_serve_answers_invocations_for_the_champion(
    tiny_retrieval_model, tiny_data, tracked, mlflow_server, tmp_path
):
    name = f"albef-retrieval-{uuid.uuid4().hex[:6]}"
    metrics = tmp_path / "retrieval.json"
    metrics.write_text(json.dumps({"r_mean": 12.5, "txt_r1": 10.0, "img_r1": 15.0}))
    params = {
        "mlflow": {"experiment": tracked, "spool_dir": str(tmp_path / "spool")},
        "register": {"model_name": name, "model_dir": str(tiny_retrieval_model), "metrics": str(metrics)},
    }
    assert register_stage(params)["promoted"]

    # the README's way: fetch the champion, every file checked against its registration, and serve that copy
    # with MLflow's pickle loading off
    env = mlflow_env(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    (tmp_path / "params.yaml").write_text(json.dumps({"register": {"model_name": name}}))
    served = tmp_path / "served"
    fetched = subprocess.run(
        [str(Path(sys.executable).parent / "albef"), "registry", "fetch", "--dst", str(served)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fetched.returncode == 0 and "every file matches its registration" in fetched.stdout, fetched.stderr
    port = free_port()
    server = ServiceProcess(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            str(served),
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        f"http://127.0.0.1:{port}",
        tmp_path / "serve.log",
        env,
        ready="/ping",
    )
    try:
        images = sorted((tiny_data / "data" / "synth" / "images").rglob("*.*"))[:2]
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        status, body = _post(
            server.url + "/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "text"],
                    "data": [
                        [encoded[0], "a red circle"],
                        [encoded[1], "a blue square"],
                        ["", "a green star"],
                    ],
                }
            },
        )
        assert status == 200, body
        out = body["predictions"]
        assert len(out["itm"]) == 2 and len(out["itm"][0]) == 3
        assert sorted(out["image_to_text"][0]) == [0, 1, 2] and sorted(out["text_to_image"][2]) == [0, 1]

        status, body = _post(
            server.url + "/invocations",
            {
                "dataframe_split": {
                    "columns": ["image", "text"],
                    "data": [["bm90IGFuIGltYWdl", "a red circle"]],
                }
            },
        )
        assert status == 400, body
        assert "row 0, column 'image': not a decodable image" in body["message"]
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(monkeypatch):
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mlflow-artifacts")
    yield endpoint, creds
    moto.stop()


def test_a_tracking_server_with_an_s3_artifact_store(s3_endpoint, mlflow_template_db, tmp_path, monkeypatch):
    endpoint, creds = s3_endpoint
    env = mlflow_env(MLFLOW_S3_ENDPOINT_URL=endpoint, **creds)
    server = start_mlflow_server(tmp_path, mlflow_template_db, "s3://mlflow-artifacts/albef", env)
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        params = {"mlflow": {"experiment": "s3", "spool_dir": str(tmp_path / "spool")}, "x": 1}
        run = start_stage_run(params, "pretrain")
        run.on_log(1, {"step": 1, "loss": 2.5})
        curves = tmp_path / "curves.png"
        curves.write_bytes(b"\x89PNG fake")
        run.log_artifact(curves, "plots")
        run.log_dict({"r_mean": 1.0}, "metrics.json")
        assert run.finish() is True

        keys = [
            o["Key"]
            for o in boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket="mlflow-artifacts")[
                "Contents"
            ]
        ]
        assert any(k.endswith(f"{run.run_id}/artifacts/plots/curves.png") for k in keys), keys
        assert any(k.endswith(f"{run.run_id}/artifacts/metrics.json") for k in keys), keys
        from mlflow import MlflowClient

        local = MlflowClient().download_artifacts(run.run_id, "metrics.json", str(tmp_path))
        assert json.loads(Path(local).read_text()) == {"r_mean": 1.0}
    finally:
        server.stop()
