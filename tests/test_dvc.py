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


def test_the_whole_pipeline_repros_and_runs_as_an_experiment(project: Path):
    """Every stage of dvc.yaml (data, unimodal, pretrain, retrieval, VQA, SNLI-VE, NLVR2, the register stages) with tiny
    settings, then `dvc exp run register -S pretrain.epochs=2`, as a user runs them. (The experiment targets
    `register`, the stage the second half checks: without a target it also re-runs the 14 downstream-task
    stages, which the first repro already covers, and adds about three minutes to CI.)"""
    from conftest import shrink_pipeline

    params = yaml.safe_load((project / "params.yaml").read_text())
    tiny = {
        "batch_size": 4,
        "epochs": 1,
        "num_workers": 0,
        "checkpoint_every": 0,
        "k_test": 4,
        "log_every": 1,
    }
    shrink_pipeline(params, tiny)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _dvc("repro", cwd=project)
    for path in (
        "models/pretrain/model.safetensors",
        "models/retrieval/model.safetensors",
        "models/retrieval/tokenizer/tokenizer.json",
        "reports/zeroshot/rankings.json",
        "reports/retrieval/examples.png",
        "plots/pretrain/train.csv",
        "plots/finetune_retrieval/curves.png",
        "models/vqa/answer_list.json",
        "reports/vqa/vqa_result.json",
        "reports/ve/predictions.json",
        "reports/nlvr/predictions.json",
        "models/nlvr_ta/model.safetensors",
        "models/grounding/model.safetensors",
        "reports/grounding/results.json",
        "reports/zeroshot_shifted/rankings.json",
    ):
        assert (project / path).is_file(), path
    retrieval = json.loads((project / "metrics" / "retrieval.json").read_text())
    assert {"txt_r1", "img_r1", "r_mean", "itc"} <= set(retrieval) and retrieval["images"] == 4
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == 32 // 4
    summary = json.loads((project / "metrics" / "summary.json").read_text())  # the last stage: one screen
    assert summary["retrieval (finetuned)"]["champion"] == "v1" and summary["SNLI-VE"]["value"] is not None
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=project))
    assert "metrics/retrieval.json" in json.dumps(shown)
    _dvc("plots", "show", "-o", str(project / "plots_html"), cwd=project)
    assert (project / "plots_html" / "index.html").is_file()
    assert "up to date" in _dvc("repro", cwd=project).lower()

    first = _mlflow_state(project)
    assert len(first["parents"]) == 1
    assert sorted(first["stages"].values()) == sorted(
        [
            "unimodal",
            "pretrain",
            "finetune_retrieval",
            "evaluate_zeroshot",
            "evaluate_retrieval",
            "register",
            "finetune_vqa",
            "evaluate_vqa",
            "finetune_ve",
            "evaluate_ve",
            "pretrain_nlvr",
            "finetune_nlvr",
            "evaluate_nlvr",
            "register_vqa",
            "register_ve",
            "register_nlvr",
            "register_grounding",
            "evaluate_zeroshot_shifted",
            "finetune_grounding",
            "evaluate_grounding",
        ]
    )
    assert first["aliases"] == {"champion": "1", "challenger": "1"}
    for task in (
        "vqa",
        "ve",
        "nlvr",
        "grounding",
    ):  # every downstream task's model is registered, gated on accuracy
        outcome = json.loads((project / "metrics" / f"register_{task}.json").read_text())
        assert outcome["model_name"] == f"albef-{task}" and outcome["gate_metric"] == "accuracy", outcome
        assert outcome["version"] == 1 and outcome["promoted"], outcome

    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "tiny pipeline"], project)
    _dvc("exp", "run", "register", "-S", "pretrain.epochs=2", cwd=project)
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == 2 * 32 // 4
    experiments = _dvc("exp", "show", "--json", cwd=project)
    assert "pretrain.epochs" in experiments or '"epochs": 2' in experiments

    # other params: a second parent run; version 2 is challenger, champion only if the gate let it through
    second = _mlflow_state(project)
    assert len(second["parents"]) == 2 and second["aliases"]["challenger"] == "2"
    r_mean = second["r_mean"]
    assert second["aliases"]["champion"] == ("2" if r_mean["2"] >= r_mean["1"] else "1")
    assert second["decisions"]["2"] == ("promoted" if r_mean["2"] >= r_mean["1"] else "rejected")


def _mlflow_state(project: Path) -> dict:
    """Parent runs, stage runs (run id -> stage) and registry aliases in the project's embedded sqlite store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("albef")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags.get("albef.kind") == "pipeline"}
    latest = max(parents, key=lambda p: next(r.info.start_time for r in runs if r.info.run_id == p))
    stages = {
        r.info.run_id: r.data.tags["albef.stage"]
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == latest
    }
    versions = client.search_model_versions("name = 'albef-retrieval'")
    aliases = {
        a: str(v.version) for v in versions for a in client.get_model_version(v.name, v.version).aliases
    }
    return {
        "parents": parents,
        "stages": stages,
        "aliases": aliases,
        "r_mean": {str(v.version): float(v.tags["metric.r_mean"]) for v in versions},
        "decisions": {str(v.version): v.tags.get("promotion_decision") for v in versions},
    }
