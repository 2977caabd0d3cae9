"""Experiment workspaces (albef.orchestration.workspace) on a small real DVC project: a flow run with overrides
works in a git worktree of its own, never writes the checkout's params.yaml, reruns only what its overrides
change, and ends as a DVC experiment that `dvc exp show` in the checkout lists with its own params and
metrics; two at once do not mix; flow runs in the checkout wait for each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from albef.orchestration import workspace
from albef.orchestration.pipeline import PlanError, apply_overrides, choose_mode

pytestmark = pytest.mark.slow

DVC_YAML = {
    "stages": {
        # uncached output, as the synthetic data is: a workspace gets the checkout's copy
        "make": {
            "cmd": "echo make >> $RUNLOG && mkdir -p raw && python -c \"open('raw/x.txt','w').write('x')\"",
            "params": ["make.n"],
            "outs": [{"raw": {"cache": False}}],
        },
        "gen": {
            "cmd": "echo gen >> $RUNLOG && python -c \"import yaml;p=yaml.safe_load(open('params.yaml'));"
            "open('data.txt','w').write(str(p['gen']['a']))\"",
            "deps": ["raw"],
            "params": ["gen.a"],
            "outs": ["data.txt"],
        },
        "ev": {
            "cmd": "echo ev >> $RUNLOG && python -c \"import yaml,json;p=yaml.safe_load(open('params.yaml'));"
            "json.dump({'m': int(open('data.txt').read()) * p['ev']['b']}, open('metrics/m.json','w'))\"",
            "deps": ["data.txt"],
            "params": ["ev.b"],
            "metrics": [{"metrics/m.json": {"cache": False}}],
        },
    }
}
PARAMS = {"make": {"n": 1}, "gen": {"a": 3}, "ev": {"b": 2}}


def _env(runlog: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RUNLOG=str(runlog),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@localhost",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@localhost",
        DVC_NO_ANALYTICS="1",
    )
    return env


def _sh(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result.stdout


def _dvc(cwd: Path, env: dict[str, str], *args: str) -> str:
    return _sh([sys.executable, "-m", "dvc", *args], cwd, env)


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch) -> Path:
    """A git + DVC project whose pipeline ran once in the checkout; dvc.lock and the metrics stay uncommitted,
    as after a `dvc repro` nobody committed."""
    root = tmp_path / "checkout"
    root.mkdir()
    runlog = tmp_path / "runs.log"
    env = _env(runlog)
    for key in (
        "RUNLOG",
        "PATH",
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
    ):
        monkeypatch.setenv(key, env[key])
    _sh(["git", "init", "-q"], root, env)
    _dvc(root, env, "init", "-q")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text("# the settings\n" + yaml.safe_dump(PARAMS, sort_keys=False))
    (root / "metrics").mkdir()
    (root / ".gitignore").write_text("/raw\n/mlflow.db\n/mlruns\n")
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "project"], root, env)
    _dvc(root, env, "repro", "-q")
    runlog.write_text("")
    return root


def _runs(checkout: Path) -> list[str]:
    return (checkout.parent / "runs.log").read_text().split()


def _exp_rows(checkout: Path, env: dict[str, str]) -> dict[str, dict]:
    """`dvc exp show --json` in the checkout: experiment name -> {"params": ..., "metrics": ...}."""
    rows: dict[str, dict] = {}
    for baseline in json.loads(_dvc(checkout, env, "exp", "show", "--json", "-A")):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                rows[rev.get("name") or exp.get("name")] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": data["metrics"]["metrics/m.json"]["data"],
                }
    return rows


def test_a_workspace_runs_the_overrides_as_a_dvc_experiment_and_leaves_the_checkout_alone(checkout: Path):
    env = dict(os.environ)
    before = {name: (checkout / name).read_bytes() for name in ("params.yaml", "dvc.lock", "metrics/m.json")}
    status_before = _sh(["git", "status", "--porcelain"], checkout, env)

    ws = workspace.create(checkout, "b-five")
    assert ws.isolated and ws.path == checkout / ".dvc" / "tmp" / "albef-workspaces" / "b-five"
    assert workspace.describe(ws.path) == ws and not workspace.describe(checkout).isolated
    assert (ws.path / "dvc.lock").read_bytes() == before["dvc.lock"]  # the checkout's uncommitted state
    assert (ws.path / "raw" / "x.txt").read_text() == "x"  # an uncached output, copied
    assert apply_overrides(ws.path, {"ev.b": 5}).changed == {"ev.b": (2, 5)}
    _dvc(ws.path, env, "repro", "-q")
    assert _runs(checkout) == ["ev"]  # only what the override changes
    assert json.loads((ws.path / "metrics" / "m.json").read_text()) == {"m": 15}

    ref = workspace.save(ws)
    assert ref.startswith("refs/exps/") and ref.endswith("/b-five")
    workspace.remove(ws)
    assert not ws.path.exists()
    assert "b-five" not in _sh(["git", "worktree", "list"], checkout, env)

    rows = _exp_rows(checkout, env)
    assert rows["b-five"] == {"params": {**PARAMS, "ev": {"b": 5}}, "metrics": {"m": 15}}
    assert {name: (checkout / name).read_bytes() for name in before} == before
    assert _sh(["git", "status", "--porcelain"], checkout, env) == status_before
    # the experiment's outputs went to the checkout's cache: applying it needs nothing re-run
    _dvc(checkout, env, "exp", "apply", "b-five")
    assert json.loads((checkout / "metrics" / "m.json").read_text()) == {"m": 15}
    assert "up to date" in _dvc(checkout, env, "status").lower()


def test_two_workspaces_at_once_each_run_with_their_own_settings(checkout: Path):
    env = dict(os.environ)
    errors: list[BaseException] = []

    def run(name: str, a: int) -> None:
        try:
            ws = workspace.create(checkout, name)
            apply_overrides(ws.path, {"gen.a": a})
            _dvc(ws.path, env, "repro", "-q")
            workspace.save(ws)
            workspace.remove(ws)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"a-{a}", a)) for a in (4, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = _exp_rows(checkout, env)
    assert rows["a-4"]["metrics"] == {"m": 8} and rows["a-4"]["params"]["gen"] == {"a": 4}
    assert rows["a-7"]["metrics"] == {"m": 14} and rows["a-7"]["params"]["gen"] == {"a": 7}
    assert sorted(_runs(checkout)) == ["ev", "ev", "gen", "gen"]
    assert yaml.safe_load((checkout / "params.yaml").read_text()) == PARAMS


def test_a_half_made_workspace_is_made_again_and_a_finished_one_reused(checkout: Path):
    ws = workspace.create(checkout, "again")
    (ws.path / "note").write_text("kept")
    assert workspace.create(checkout, "again") == ws and (ws.path / "note").read_text() == "kept"
    (ws.path / ".dvc" / "tmp" / "albef-workspace.json").unlink()  # as if creation had been interrupted
    assert workspace.create(checkout, "again") == ws and not (ws.path / "note").exists()


def test_the_stage_environment_points_at_the_checkouts_mlflow_store(checkout: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = workspace.create(checkout, "tracked")
    uri = f"sqlite:///{checkout / 'mlflow.db'}"
    assert workspace.stage_env(ws, uri) == {"ALBEF_DVC_EXPERIMENT": "tracked", "MLFLOW_TRACKING_URI": uri}
    assert workspace.stage_env(workspace.describe(checkout), uri) == {}
    assert (ws.path / "mlruns").resolve() == (checkout / "mlruns").resolve()  # artifacts land in the checkout


def test_modes_and_names():
    assert choose_mode("auto", {"a.b": 1}) == "experiment"
    assert choose_mode("auto", None) == "checkout"
    assert choose_mode("experiment", None) == "experiment"
    with pytest.raises(PlanError, match="never writes the checkout's params.yaml"):
        choose_mode("checkout", {"a.b": 1})
    with pytest.raises(PlanError, match="workspace: expected one of auto, checkout, experiment"):
        choose_mode("tmp", None)
    name = workspace.experiment_name("crimson owl/1", "0f3e8a2c-1111-2222-3333-444455556666")
    assert name == "crimson-owl-1-0f3e8a2c"


def test_a_checkout_without_a_commit_is_refused_naming_why(tmp_path: Path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(
        PlanError, match="runs as a DVC experiment, which needs the checkout .* a git repository"
    ):
        workspace.create(tmp_path, "x")


def test_a_second_flow_run_in_the_checkout_waits_for_the_first(checkout: Path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from albef.orchestration.workspace import checkout_lock\n"
            f"with checkout_lock({str(checkout)!r}, 'first'):\n"
            "    print('held', flush=True); time.sleep(2)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    start = time.monotonic()
    with workspace.checkout_lock(checkout, "second"), workspace.checkout_lock(checkout, "second, re-entered"):
        waited = time.monotonic() - start
    holder.wait(timeout=30)
    assert waited > 1.0, waited
