"""``dvc repro`` of the data stages from a fresh clone, and ``dvc push``/``pull`` to a local folder remote and
to an S3 remote served on loopback (moto's server, a real HTTP endpoint)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SYNTH

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@localhost",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@localhost",
    )
    return env


def _run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _dvc(*args: str, cwd: Path, env: dict | None = None) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd, env)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone of this repository with tiny synthetic sizes, after `dvc repro preprocess`."""
    root = tmp_path_factory.mktemp("clone") / "albef"
    _run(["git", "clone", "-q", str(REPO), str(root)], REPO)
    # the working tree may hold uncommitted changes to the pipeline files during development
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(
        REPO / "albef", root / "albef", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["synth"].update(TINY_SYNTH)
    params["preprocess"].update(max_side=64, shard_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc("repro", "preprocess", cwd=root)
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    out = root / "data" / "processed"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_repro_from_a_fresh_clone_makes_every_output(project: Path):
    processed = project / "data" / "processed"
    for name in (
        "manifest.json",
        "report.json",
        "report.md",
        "tokenizer/tokenizer.json",
        "data_card.md",
        "samples.png",
        "retrieval_test.json",
        "answer_list.json",
        "refcoco+/dets.json",
    ):
        assert (processed / name).is_file(), name
    metrics = json.loads((project / "metrics" / "preprocess.json").read_text())
    assert metrics["records_dropped"] == 0 and metrics["images_kept"] > 50
    assert "up to date" in _dvc("repro", "preprocess", cwd=project).lower() or "didn't change" in _dvc(
        "status", cwd=project
    )
    shown = _dvc("metrics", "show", "--json", cwd=project)
    assert "images_kept" in shown


def _roundtrip(project: Path, remote: str, env: dict | None = None) -> None:
    before = _snapshot(project)
    _dvc("push", "-r", remote, "preprocess", cwd=project, env=env)
    shutil.rmtree(project / "data" / "processed")
    shutil.rmtree(project / ".dvc" / "cache")
    _dvc("pull", "-r", remote, "preprocess", cwd=project, env=env)
    assert _snapshot(project) == before


def test_push_and_pull_with_a_local_remote(project: Path, tmp_path: Path):
    _dvc("remote", "add", "localstore", str(tmp_path / "store"), cwd=project)
    _roundtrip(project, "localstore")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_and_pull_with_an_s3_remote_on_loopback(project: Path):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        env = _env()
        env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket="dvc-store")
        _dvc("remote", "add", "s3store", "s3://dvc-store/albef", cwd=project, env=env)
        _dvc("remote", "modify", "s3store", "endpointurl", endpoint, cwd=project, env=env)
        _roundtrip(project, "s3store", env)
    finally:
        server.stop()
