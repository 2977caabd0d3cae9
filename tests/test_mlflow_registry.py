"""The register stage, the promotion gate and the pyfunc model, on a fresh sqlite store per test (a copy
of one pre-migrated database). The pyfunc is loaded back in a fresh process, as a user would."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from conftest import load_in_fresh_python

from albef.config import ConfigError
from albef.tracking.config import GateConfig, RegisterConfig
from albef.tracking.register import register_stage
from albef.tracking.registry import Registry, RegistryError, decide

NAME = "albef-retrieval-test"


def _params(model_dir: Path, root: Path, metrics: dict, **gate) -> dict:
    path = root / f"metrics-{len(list(root.glob('metrics-*')))}.json"
    path.write_text(json.dumps(metrics))
    return {
        "mlflow": {"experiment": "registry-test", "spool_dir": str(root / "spool")},
        "register": {
            "model_name": NAME,
            "model_dir": str(model_dir),
            "metrics": str(path),
            "gate": {"metric": "r_mean", **gate},
        },
        "evaluate": {"max_tokens": 16},
    }


def _metrics(r_mean: float) -> dict:
    return {
        "txt_r1": r_mean / 2,
        "img_r1": r_mean / 3,
        "r_mean": r_mean,
        "itc": {"r_mean": r_mean - 1},
        "model_task": "retrieval",
    }


def _aliases(registry: Registry) -> dict[str, str]:
    return {alias: row["version"] for row in registry.list() for alias in row["aliases"]}


@pytest.fixture
def registered(tiny_retrieval_model, mlflow_sqlite, tmp_path):
    """Version 1 registered by the register stage (r_mean 50): champion and challenger."""
    summary = register_stage(
        _params(tiny_retrieval_model, tmp_path, _metrics(50.0)), tmp_path / "register.json"
    )
    return Registry(RegisterConfig(model_name=NAME), mlflow_sqlite), summary


def test_first_version_is_champion_a_worse_one_stays_challenger_a_better_one_takes_over(registered, tmp_path):
    registry, summary = registered
    assert summary["version"] == 1 and summary["promoted"] is True
    assert json.loads((tmp_path / "register.json").read_text())["aliases"] == ["challenger", "champion"]
    v1 = registry.version(1)
    assert v1.tags["metric.r_mean"] == "50" and v1.tags["metric.itc.r_mean"] == "49"
    assert v1.tags["promotion_decision"] == "promoted" and "no champion yet" in v1.tags["promotion_reason"]
    assert v1.tags["git_commit"] and v1.tags["data_version"] and v1.run_id
    # the stage's run nests under a pipeline parent and records the decision
    run = registry.client.get_run(v1.run_id)
    assert run.data.tags["albef.stage"] == "register" and run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["promotion_decision"] == "promoted" and run.data.metrics["eval.r_mean"] == 50

    model_uri = summary["model_uri"]
    worse, decision = registry.register(model_uri, _metrics(40.0), {})
    assert str(worse.version) == "2" and not decision.promote
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}
    tags = registry.version(2).tags
    assert (
        tags["promotion_decision"] == "rejected" and "is worse than champion v1" in tags["promotion_reason"]
    )

    _, decision = registry.register(model_uri, _metrics(55.0), {})
    assert decision.promote and _aliases(registry) == {"champion": "3", "challenger": "3"}
    assert registry.rollback() == "1"
    assert _aliases(registry)["champion"] == "1"
    assert registry.version(1).tags["promotion_decision"] == "rollback"
    # a worse version cannot be promoted through the gate, only by hand
    assert registry.promote(2).promote is False and _aliases(registry)["champion"] == "1"
    assert registry.promote(2, force=True).promote and _aliases(registry)["champion"] == "2"


def test_the_registry_cli_lists_promotes_and_rolls_back(registered, tmp_path, capsys):
    from albef.cli import main

    registry, summary = registered
    registry.register(summary["model_uri"], _metrics(45.0), {})
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"register": {"model_name": NAME}, "mlflow": {}}))

    def albef(*args):
        capsys.readouterr()
        code = main(["registry", *args, "--params", str(params)])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = albef("list")
    assert code == 0 and "v1" in out and "champion" in out and "rejected" in out
    code, out, _ = albef("promote", "--version", "2")
    assert code == 1 and "worse" in out
    assert albef("promote", "--version", "2", "--force")[0] == 0
    assert _aliases(registry)["champion"] == "2"
    code, out, _ = albef("rollback")
    assert code == 0 and "champion is now v1" in out
    code, _, err = albef("promote", "--version", "9")
    assert code == 2 and "has no version 9" in err


def test_a_gate_metric_the_evaluation_did_not_produce_is_named(tiny_retrieval_model, mlflow_sqlite, tmp_path):
    params = _params(tiny_retrieval_model, tmp_path, _metrics(50.0))
    params["register"]["gate"]["metric"] = "recall_at_1"
    with pytest.raises(
        ConfigError, match=r"'recall_at_1' is not in .*available: img_r1, itc.r_mean, r_mean, txt_r1"
    ):
        register_stage(params)
    assert Registry(RegisterConfig(model_name=NAME), mlflow_sqlite).list() == []


def test_a_champion_alias_whose_version_was_deleted_is_a_clear_error(registered):
    registry, summary = registered
    registry.register(summary["model_uri"], _metrics(40.0), {})
    registry.client.delete_model_version(NAME, "1")
    with pytest.raises(RegistryError, match="pointed to version 1, which was deleted"):
        registry.register(summary["model_uri"], _metrics(60.0), {})
    assert [row["version"] for row in registry.list()] == ["2"], "nothing was registered"
    with pytest.raises(RegistryError, match="has no version 1"):
        registry.rollback(to=1)
    with pytest.raises(RegistryError, match="which was deleted"):
        registry.promote(2)  # the gate has no champion to compare with
    registry.promote(2, force=True)  # the way out: an explicit champion
    assert _aliases(registry)["champion"] == "2"


def test_a_failed_promotion_leaves_the_champion_in_place(registered, monkeypatch):
    registry, summary = registered
    real = registry.client.set_registered_model_alias

    def flaky(name, alias, version):
        if alias == "champion":
            raise ConnectionError("registry went away")
        return real(name, alias, version)

    monkeypatch.setattr(registry.client, "set_registered_model_alias", flaky)
    with pytest.raises(RegistryError, match="champion is unchanged"):
        registry.register(summary["model_uri"], _metrics(70.0), {})
    monkeypatch.undo()
    assert _aliases(registry) == {"champion": "1", "challenger": "2"}
    assert registry.version(2).tags["promotion_decision"] == "failed"


@pytest.mark.parametrize(
    ("gate", "value", "champion", "promote", "words"),
    [
        ({}, 50.0, None, True, "no champion yet"),
        ({"min_value": 60.0}, 50.0, None, False, "misses the required at least 60"),
        ({}, 50.0, ("1", 50.0), True, "ties"),
        ({"min_improvement": 1.0}, 50.5, ("1", 50.0), False, "needs +1"),
        ({"direction": "minimize", "metric": "loss"}, 0.9, ("4", 1.0), True, "improves on champion v4"),
        (
            {"direction": "minimize", "metric": "loss", "min_value": 0.5},
            0.9,
            ("4", 1.0),
            False,
            "at most 0.5",
        ),
    ],
)
def test_gate_decisions(gate, value, champion, promote, words):
    decision = decide(GateConfig(**gate), value, champion)
    assert decision.promote is promote and words in decision.reason


def test_gate_config_errors():
    with pytest.raises(ConfigError, match="direction"):
        GateConfig(direction="up")
    with pytest.raises(ConfigError, match="forbidden character"):
        RegisterConfig(model_name="albef/retrieval")
    with pytest.raises(ConfigError, match="reserved"):
        RegisterConfig(champion_alias="latest")


def _png(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_the_pyfunc_loads_in_a_fresh_process_and_ranks(registered, tiny_data, mlflow_sqlite, tmp_path):
    images = (
        sorted((tiny_data / "data" / "synth").rglob("*.jpg"))[:3]
        or sorted((tiny_data / "data" / "synth").rglob("*.png"))[:3]
    )
    request = {
        "image": [_png(images[0]), _png(images[1]), _png(images[2]), None],
        "text": ["a red circle", "a blue square", "", "two green triangles"],
    }
    (tmp_path / "request.json").write_text(json.dumps(request))
    script = (
        "import json, sys, pandas as pd, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "out = model.predict(pd.DataFrame(json.load(open(sys.argv[1]))))\n"
        "print(json.dumps(out))\n"
    )
    out = load_in_fresh_python(script, tmp_path / "request.json", mlflow_sqlite, tmp_path, timeout=180)
    assert len(out["itc"]) == 3 and len(out["itc"][0]) == 3  # 3 images, 3 non-empty texts
    assert len(out["itm"]) == 3 and all(len(row) == 3 for row in out["itm"])
    assert all(sorted(r) == [0, 1, 2] for r in out["image_to_text"] + out["text_to_image"])
    best = max(range(3), key=lambda t: out["itm"][0][t])
    assert out["image_to_text"][0][0] == best


def test_bad_model_input_is_a_clear_error(registered, mlflow_sqlite):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    with pytest.raises(MlflowException, match=r"missing inputs.*text|missing column"):
        model.predict(pd.DataFrame({"image": ["x"]}))
    with pytest.raises(
        MlflowException, match=r"row 0, column 'image': expected an image file's bytes as base64 text"
    ):
        model.predict(pd.DataFrame({"image": ["not an image!"], "text": ["a red circle"]}))
    garbage = base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode()
    with pytest.raises(MlflowException, match=r"row 0, column 'image': not a decodable image"):
        model.predict(pd.DataFrame({"image": [garbage], "text": ["a red circle"]}))
    with pytest.raises(MlflowException, match="need at least one image and one text"):
        model.predict(pd.DataFrame({"image": [""], "text": ["a red circle"]}))


_READ_EVERY_ARTIFACT = """
import json, sys, tempfile, mlflow
from mlflow import MlflowClient

request = json.load(open(sys.argv[1]))
client = MlflowClient()
experiment = client.get_experiment_by_name(request["experiment"])


def files(run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found += files(run_id, item.path) if item.is_dir else [item.path]
    return found


listed = {}
with tempfile.TemporaryDirectory() as scratch:
    for run in client.search_runs([experiment.experiment_id]):
        name = run.data.tags.get("albef.stage") or run.info.run_name
        listed[name] = sorted(files(run.info.run_id))
        for path in listed[name]:
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, dst_path=scratch)
model = mlflow.pyfunc.load_model(f"models:/{request['model']}/1")
print(json.dumps({"listed": listed, "location": experiment.artifact_location, "model": bool(model.metadata)}))
"""


def test_moving_the_project_folder_keeps_every_artifact_link(
    tiny_retrieval_model, mlflow_template_db, tmp_path
):
    """The embedded store (sqlite:///mlflow.db beside ./mlruns) in project folder A: a run logged before
    albef stored locations relative (absolute paths, as MLflow writes them), a stage run, the register stage.
    The project is copied to B and A deleted: from B every artifact lists and downloads, the model loads."""
    import shutil

    from mlflow import MlflowClient

    from albef.tracking.run import start_stage_run

    old, new = tmp_path / "A", tmp_path / "B"
    old.mkdir()
    shutil.copy(mlflow_template_db, old / "mlflow.db")
    uri = f"sqlite:///{old / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(old)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        legacy = client.create_run(client.create_experiment("portable"), run_name="legacy").info.run_id
        client.log_text(legacy, "logged before the move", "notes/legacy.txt")
        client.set_terminated(legacy)
        assert client.get_run(legacy).info.artifact_uri.startswith(str(old / "mlruns"))
        for name in ("ALBEF_MLFLOW_PARENT_RUN_ID", "ALBEF_MLFLOW_PIPELINE"):
            patch.delenv(name, raising=False)
        params = _params(tiny_retrieval_model, old, _metrics(50.0))
        params["mlflow"].update(experiment="portable", system_metrics=False)
        run = start_stage_run(params, "evaluate")
        (old / "rankings.json").write_text("[]")
        run.log_artifact(old / "rankings.json", "report")
        run.log_dict({"r_mean": 50.0}, "metrics.json")
        assert run.finish() is True
        assert register_stage(params, old / "register.json")["version"] == 1
        assert "MLFLOW_REGISTRY_URI" not in os.environ  # processes started later keep their own store
    shutil.copytree(old, new)
    shutil.rmtree(old)

    (new / "request.json").write_text(json.dumps({"experiment": "portable", "model": NAME}))
    out = load_in_fresh_python(_READ_EVERY_ARTIFACT, new / "request.json", "sqlite:///mlflow.db", new)
    assert out["location"] == out["location"].lstrip("/") and out["location"].startswith("mlruns/")
    listed = out["listed"]
    assert listed["legacy"] == ["notes/legacy.txt"]
    assert listed["evaluate"] == ["metrics.json", "report/rankings.json"]
    assert "register.json" in listed["register"]
    assert out["model"]
