"""The commands a bare GPU machine runs (model libraries only: torch, transformers, timm, tokenizers, safetensors,
Pillow, numpy, PyYAML) never import the pipeline services or their helpers.

Each command runs in a fresh interpreter whose ``sitecustomize`` hides :data:`BLOCKED` from the import system:
``import mlflow`` fails as if it were not installed, and ``importlib.util.find_spec`` answers ``None``, so the
optional-dependency checks of other libraries see them as absent too. tqdm is not blocked: transformers
depends on it (and on huggingface_hub), so every machine that runs albef has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import THREADS

REPO = Path(__file__).resolve().parents[1]

# The pipeline services (MLflow, Prefect, DVC), S3 (boto3 and its parts) and what only they or the figures need.
BLOCKED = ("mlflow", "prefect", "dvc", "boto3", "botocore", "s3transfer", "pandas", "matplotlib", "psutil")

_SITECUSTOMIZE = """\
import sys

BLOCKED = frozenset({blocked!r})
_early = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
if _early:
    raise SystemExit(f"imported before sitecustomize could hide them: {{_early}}")


class _Hidden:
    \"\"\"A meta path finder that finds nothing of BLOCKED and delegates everything else.\"\"\"

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find is not None else None

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
"""

# Runs each command line through albef's CLI entry point in one interpreter (each one re-importing nothing it
# already has: a hidden package fails to import the same in a fresh process or here), then reports what of
# BLOCKED got into sys.modules (nothing can: the check is that the finder did its job).
_CHAIN = """\
import json, sys
from albef.cli import main

for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    if rc:
        sys.exit(f"albef {' '.join(argv)} exited with {rc}")
print("BLOCKED LOADED", json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in json.loads(sys.argv[2]))))
"""


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory) -> dict[str, str]:
    """The environment of a machine without :data:`BLOCKED`."""
    folder = tmp_path_factory.mktemp("bare_site")
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=BLOCKED))
    path = os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(THREADS)}
    for key in ("MLFLOW_TRACKING_URI", "ALBEF_MLFLOW_PARENT_RUN_ID", "ALBEF_MLFLOW_PIPELINE"):
        env.pop(key, None)
    return env


def run_bare(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: int = 240) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)}:\n{log[-4000:]}"
    return log


def test_the_blocked_packages_are_hidden(bare_env):
    """Without this, every other test here would pass vacuously."""
    code = (
        "import importlib.util, json, sys\n"
        f"names = {list(BLOCKED)!r}\n"
        "print(json.dumps([n for n in names if importlib.util.find_spec(n) is not None]))\n"
        "try:\n    import mlflow\nexcept ModuleNotFoundError:\n    print('hidden')\n"
    )
    out = run_bare(["-c", code], bare_env).splitlines()
    assert out == ["[]", "hidden"]


def test_albef_help_runs_without_the_pipeline_services(bare_env):
    run_bare(["-m", "albef", "--help"], bare_env)


# torch and what imports it: a stage without a model must not pay for importing them (5-9 s a process on two
# cores, once per stage and pipeline run). (transformers' tokenizers stay: preprocessing trains the vocabulary.)
MODEL_LIBRARIES = ("torch", "torchvision", "timm", "safetensors")


def test_the_stages_without_a_model_run_without_torch(tmp_path):
    """``albef data synth``, ``albef preprocess`` and ``albef report`` (the summary stage) in an interpreter where
    torch, torchvision and timm cannot be imported at all."""
    from conftest import TINY_SYNTH

    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=(*BLOCKED, *MODEL_LIBRARIES)))
    path = os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(TINY_SYNTH)
    params["preprocess"].update(max_side=64, shard_size=16)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for command in ("data synth", "preprocess"):
        run_bare(["-m", "albef", *command.split(), "--params", "params.yaml", "--quiet"], env, cwd=project)
    assert json.loads((project / "metrics" / "preprocess.json").read_text())["records_kept"] > 0
    table = run_bare(["-m", "albef", "report", "--out", "metrics/summary.json"], env, cwd=project)
    assert "retrieval" in table and (project / "metrics" / "summary.json").is_file()


def test_the_gpu_check_smoke_runs_every_part_without_the_pipeline_services(bare_env, tmp_path):
    """``benchmarks/gpu_check.sh --smoke``: the loader benchmark, the pretraining step, the retrieval
    benchmark against the official algorithm, all 18 non-registry stages of dvc.yaml under the smoke profile
    (through the CLI, MLflow off; figures that need matplotlib are skipped with a warning) and the step at the
    profile's model, on a machine without MLflow, Prefect, DVC, boto3, pandas, matplotlib or psutil; then its
    one table."""
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke", "--out", str(out)],
        cwd=REPO,
        env={**bare_env, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    parts = dict(line.split(" ", 1) for line in (out / "parts.txt").read_text().splitlines())
    assert {k: v.split()[-1] for k, v in parts.items()} == dict.fromkeys(
        ("loader", "step", "retrieval", "pipeline", "profile_step"), "ok"
    ), parts
    pipeline = json.loads((out / "pipeline.json").read_text())
    assert pipeline["finished"] and len(pipeline["stages"]) == 18  # every dvc.yaml stage but register*
    assert {s["stage"] for s in pipeline["stages"]} >= {
        "pretrain",
        "evaluate_retrieval",
        "evaluate_grounding",
        "summary",
    }
    summary = json.loads((out / "pipeline" / "metrics" / "summary.json").read_text())
    assert summary["SNLI-VE"]["value"] is not None and summary["SNLI-VE"]["champion"].startswith(
        "not registered"
    )
    loader = json.loads((out / "loader.json").read_text())
    assert {(r["loader"], r["workers"]) for r in loader} == {
        ("raw", 0),
        ("seeded-old", 0),
        ("seeded", 0),
        ("seeded", 1),
    }
    worker = next(r for r in loader if r["workers"] == 1)
    assert worker["seed_us"] > 0 and worker["stall_s"] > 0 and worker["stall_fresh_s"] > 0
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert retrieval["identical_rankings"] and retrieval["identical_metrics"]
    report = (out / "report.md").read_text()
    for row in (
        "| loader ",
        "| albef step tiny",
        "| retrieval evaluation",
        "| profile smoke: whole pipeline",
    ):
        assert row in report, report
    assert "matplotlib is not installed" in (out / "pipeline.log").read_text()
