"""A registered model loads without unpickling anything, and a file changed in the artifact store is refused by
name before any of the model is imported (issue 16, item 5).

Every file of a registered version is tampered with in turn, the way someone who can write to the artifact store
would: code files get a line that leaves a canary file, ``MLmodel`` is rewritten to ask for a pickled model, every
other file is replaced by a pickle whose loading would leave the canary. ``albef registry fetch`` and
:func:`load_verified` must refuse each one naming the file, and the canary must never appear."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import yaml

from albef.tracking.integrity import (
    MANIFEST_FILE,
    MANIFEST_TAG,
    IntegrityError,
    fetch_verified,
    load_verified,
)
from albef.tracking.register import register_stage

NAME = "albef-integrity-test"


class _Payload:
    """A pickle that leaves ``path`` behind when it is loaded: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


@pytest.fixture
def registered(tiny_retrieval_model, mlflow_sqlite, tmp_path):
    """Version 1 of NAME, registered by the register stage; (client, version, the model's folder in the artifact
    store)."""
    from mlflow import MlflowClient

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"r_mean": 50.0, "txt_r1": 20.0, "img_r1": 10.0}))
    params = {
        "mlflow": {"experiment": "integrity-test", "spool_dir": str(tmp_path / "spool")},
        "register": {
            "model_name": NAME,
            "model_dir": str(tiny_retrieval_model),
            "metrics": str(metrics),
            "gate": {"metric": "r_mean"},
        },
        "evaluate": {"max_tokens": 16},
    }
    summary = register_stage(params, tmp_path / "register.json")
    client = MlflowClient(mlflow_sqlite)
    mv = client.get_model_version(NAME, str(summary["version"]))
    model_id = summary["model_uri"].removeprefix("models:/")  # the logged model (MLflow 3)
    stored = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    assert (stored / "MLmodel").is_file(), stored
    return client, mv, stored


def test_a_registered_model_holds_no_pickle_and_loads_from_its_code(registered, tmp_path, capsys):
    import pandas as pd

    from albef.cli import main

    client, mv, stored = registered
    files = [p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    pyfunc = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    assert Path(pyfunc["model_code_path"]).name == "model_code.py" and "model_code.py" in files
    assert len(mv.tags[MANIFEST_TAG]) == 64

    # the CLI's way: fetch and check, then serve the checked copy
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"model_name": NAME}}))
    assert main(["registry", "fetch", "--params", str(params), "--dst", str(tmp_path / "fetched")]) == 0
    assert "v1: every file matches its registration" in capsys.readouterr().out
    model = load_verified(client, NAME, mv.version, tmp_path / "checked")
    out = model.predict(pd.DataFrame({"image": [_png()], "text": ["a red square"]}))
    assert len(out["itm"]) == 1 and len(out["itm"][0]) == 1


def _png() -> str:
    from albef.serving.pyfunc import example_png

    return example_png()


def _tamper(path: Path, rel: str, canary: Path) -> list[str]:
    """Change ``path`` as an attacker would; returns the extra files written next to it."""
    if rel.endswith(".py"):
        path.write_text(f"open({str(canary)!r}, 'w').write('code ran')\n" + path.read_text())
        return []
    if rel == "MLmodel":  # ask for a pickled python_model instead of the code file, and supply one
        model = yaml.safe_load(path.read_text())
        flavor = model["flavors"]["python_function"]
        flavor.pop("model_code_path", None)
        flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
        path.write_text(yaml.safe_dump(model))
        (path.parent / "python_model.pkl").write_bytes(pickle.dumps(_Payload(canary)))
        return ["python_model.pkl"]
    path.write_bytes(pickle.dumps(_Payload(canary)))
    return []


def test_every_file_changed_in_the_artifact_store_is_refused_by_name_and_runs_nothing(registered, tmp_path):
    client, mv, stored = registered
    canary = tmp_path / "canary"
    files = sorted(p for p in stored.rglob("*") if p.is_file())
    assert len(files) > 20  # the model, its tokenizer, MLflow's files and albef's code
    for n, path in enumerate(files):
        rel = path.relative_to(stored).as_posix()
        original = path.read_bytes()
        added = _tamper(path, rel, canary)
        try:
            with pytest.raises(IntegrityError, match=rf"changed {rel}\b") as refused:
                load_verified(client, NAME, mv.version, tmp_path / f"try-{n}")
            for extra in added:
                assert f"added {extra}" in str(refused.value)
        finally:
            path.write_bytes(original)
            for extra in added:
                (stored / extra).unlink()
        assert not canary.exists(), f"tampering with {rel} ran code"
    # a file added beside the model: named too; and the manifest itself cannot be swapped
    (stored / "python_model.pkl").write_bytes(pickle.dumps(_Payload(canary)))
    with pytest.raises(IntegrityError, match=r"added python_model\.pkl"):
        fetch_verified(client, NAME, mv.version, tmp_path / "added")
    (stored / "python_model.pkl").unlink()
    run_artifacts = Path(client.get_run(mv.run_id).info.artifact_uri.removeprefix("file://"))
    manifest = run_artifacts / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace('"MLmodel": "', '"MLmodel": "0'))
    with pytest.raises(IntegrityError, match="was changed after registration"):
        fetch_verified(client, NAME, mv.version, tmp_path / "manifest")
    assert not canary.exists()


def test_plain_mlflow_loading_ignores_a_stray_pickle_and_refuses_a_pickled_mlmodel_when_told(
    registered, tmp_path, monkeypatch
):
    """Without albef's check, MLflow itself: the model is code, so a pickle dropped beside it is never read; an
    MLmodel rewritten to load one is refused with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` (the README's
    serving command sets it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _, mv, stored = registered
    canary = tmp_path / "canary"
    (stored / "python_model.pkl").write_bytes(pickle.dumps(_Payload(canary)))
    assert mlflow.pyfunc.load_model(f"models:/{NAME}/{mv.version}").metadata is not None
    assert not canary.exists()
    _tamper(stored / "MLmodel", "MLmodel", canary)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(MlflowException, match="Deserializing model using pickle is disallowed"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/{mv.version}")
    assert not canary.exists()
