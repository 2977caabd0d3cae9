"""A registered model's files, sealed at registration and checked before loading.

A registered albef model loads without unpickling anything (:mod:`albef.serving.model_code`), but some of its
files are code all the same: the model's code file and the copy of albef under ``code/`` run when it loads,
``MLmodel`` says what to run, and the requirements files say what to install. Whoever can write to the artifact
store could change them. So the register stage **seals** the logged model: it reads the files back from the
artifact store, records the SHA-256 of each in ``model_manifest.json`` (an artifact of the registering run) and
puts the digest of that manifest on the model version as the tag :data:`MANIFEST_TAG`, which lives in the
tracking store, not the artifact store.

:func:`fetch_verified` (``albef registry fetch``) downloads a version and checks every file against the manifest
before anything of it is imported: a changed, added or missing file is refused by name, and nothing is loaded.
:func:`load_verified` then loads it with MLflow's pickle deserialization switched off, so even a rewritten
``MLmodel`` that asks for a pickled model would be refused by MLflow itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from albef.data.shards import sha256_file
from albef.tracking.registry import RegistryError

MANIFEST_TAG = "albef.manifest_sha256"  # on the model version: the SHA-256 of its manifest's bytes
MANIFEST_FILE = "model_manifest.json"  # an artifact of the registering run: {relative path: SHA-256}
# Written by MLflow into a folder it downloads a registered version to (name and version), not stored with it.
_DOWNLOAD_ONLY = frozenset({"registered_model_meta"})


class IntegrityError(RegistryError):
    """A registered model whose files are not the ones that were registered; nothing of it was loaded."""


def manifest(root: str | Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``root`` (links are refused: a model holds none)."""
    root = Path(root)
    files: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise IntegrityError(f"{rel}: a symbolic link in a model folder")
        if path.is_file() and rel not in _DOWNLOAD_ONLY:
            files[rel] = sha256_file(path)
    return files


def seal(model_uri: str) -> str:
    """Record the files of the logged model ``model_uri`` as they are in the artifact store: the manifest goes
    to the active run as :data:`MANIFEST_FILE`; returns its digest, the value of :data:`MANIFEST_TAG`."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=scratch)
        text = json.dumps(manifest(local), indent=1, sort_keys=True) + "\n"
    mlflow.log_text(text, MANIFEST_FILE)
    return hashlib.sha256(text.encode()).hexdigest()


def _store(client) -> dict[str, str]:
    # the client's store, not the process-global one (a Prefect flow may point that elsewhere)
    return {"tracking_uri": client.tracking_uri, "registry_uri": client.tracking_uri}


def fetch_verified(client, name: str, version: str | int, dst: str | Path) -> Path:
    """Download version ``version`` of registered model ``name`` into ``dst`` and check every file against the
    manifest sealed at registration; :class:`IntegrityError` names what differs. Returns the model folder."""
    import mlflow

    mv = client.get_model_version(name, str(version))
    label = f"{name} v{mv.version}"
    expected_digest = (mv.tags or {}).get(MANIFEST_TAG)
    if not expected_digest:
        raise IntegrityError(
            f"{label} carries no {MANIFEST_TAG!r} tag (registered before albef sealed its models, or not by "
            "`albef register`): its files cannot be checked; register the model again"
        )
    if not mv.run_id:
        raise IntegrityError(f"{label} names no registering run, which holds its {MANIFEST_FILE}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            listed_path = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path=MANIFEST_FILE, dst_path=scratch, **_store(client)
            )
        except Exception as exc:
            raise IntegrityError(
                f"{label}: its {MANIFEST_FILE} cannot be read from run {mv.run_id} ({exc})"
            ) from exc
        text = Path(listed_path).read_bytes()
    if hashlib.sha256(text).hexdigest() != expected_digest:
        raise IntegrityError(
            f"{label}: {MANIFEST_FILE} of run {mv.run_id} was changed after registration (its SHA-256 is not the "
            f"version's {MANIFEST_TAG} tag); refusing to load the model"
        )
    expected: dict[str, Any] = json.loads(text)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst), **_store(client)
        )
    )
    found = manifest(local)
    problems = [f"changed {p}" for p in sorted(expected) if p in found and found[p] != expected[p]]
    problems += [f"added {p}" for p in sorted(set(found) - set(expected))]
    problems += [f"missing {p}" for p in sorted(set(expected) - set(found))]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise IntegrityError(
            f"{label}: the artifact store holds files other than the ones registered ({shown}); refusing to load "
            f"the model (the downloaded copy in {local} was not imported)"
        )
    return local


def load_verified(client, name: str, version: str | int, dst: str | Path | None = None, **kwargs: Any):
    """:func:`fetch_verified`, then ``mlflow.pyfunc.load_model`` of the checked copy, with pickle deserialization
    off (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``: albef models need none)."""
    import mlflow

    folder = fetch_verified(client, name, version, dst or tempfile.mkdtemp(prefix="albef-model-"))
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        return mlflow.pyfunc.load_model(str(folder), **kwargs)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
