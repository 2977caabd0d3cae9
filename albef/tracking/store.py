"""The experiment the runs go to, with artifact locations that survive moving the project.

With the embedded store (``sqlite:///mlflow.db``, relative to the project) MLflow resolves its default artifact
root ``./mlruns`` against the working directory once and writes the absolute path into the database: into the
experiment, and from there into every run's ``artifact_uri``, every logged model's location and every model
version's ``storage_location``. Moving the project folder then breaks every artifact link.

MLflow reads a location without a scheme as a local path relative to the working directory at the time of
reading, the rule that already makes ``sqlite:///mlflow.db`` a path relative to it. So when the sqlite file sits
in the project and no ``artifact_location`` is configured, the experiment's location is stored as
``mlruns/<experiment id>``: runs, logged models and model versions created under it inherit the relative prefix,
and the database moves together with its artifacts. A database written before (absolute paths to the project's
``mlruns``, or to where the project used to be) is converted the first time a stage opens the experiment.
Whatever reads artifacts (``mlflow ui``, a model load) runs in the project folder, as the relative database URI
requires anyway.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ARTIFACT_DIR = "mlruns"  # MLflow's default artifact root beside a local store
# (table, column, scoped by experiment) holding artifact locations that inherit the experiment's prefix
_LOCATIONS = (
    ("runs", "artifact_uri", True),
    ("logged_models", "artifact_location", True),
    ("model_versions", "storage_location", False),
    ("model_versions", "source", False),
)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, absolute (a relative one is relative to the working
    directory, as for MLflow); None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return (Path.cwd() / path).resolve()


# MLflow error codes of a store that answered and refused the call: retrying cannot help
_PERMANENT = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "ENDPOINT_NOT_FOUND",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: the store answered and refused the call itself."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in _PERMANENT


def ensure_experiment(
    client: Any,
    uri: str,
    name: str,
    artifact_location: str | None = None,
    project: str | Path | None = None,
) -> str:
    """The id of experiment ``name`` (created when missing, restored when deleted). Without a configured
    ``artifact_location``, a sqlite store in ``project`` (default: the working directory) gets the portable
    location ``mlruns/<id>`` (see the module docstring)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location)
        except Exception as exc:  # another stage created it in between
            if not is_permanent(exc):
                raise
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        exp_id = exp.experiment_id
    db = sqlite_file(uri)
    base = Path(project or Path.cwd()).resolve()
    if artifact_location is None and db is not None and db.parent == base:
        make_portable(db, exp_id, base)
    return exp_id


def make_portable(db: str | Path, experiment_id: str, project: str | Path) -> bool:
    """Store the artifact locations of experiment ``experiment_id`` of the sqlite store ``db`` relative to
    ``project``: when the experiment is at MLflow's default location ``<folder>/mlruns/<id>`` and that folder
    is ``project`` or no longer exists (it moved). Returns True when the locations are relative."""
    relative = f"{ARTIFACT_DIR}/{experiment_id}"
    with contextlib.closing(sqlite3.connect(str(db), timeout=60)) as con, con:
        row = con.execute(
            "SELECT artifact_location FROM experiments WHERE experiment_id = ?", (int(experiment_id),)
        ).fetchone()
        if row is None or row[0] == relative:
            return row is not None
        old = _local_path(row[0])
        if old is None or not old.is_absolute() or old.parts[-2:] != (ARTIFACT_DIR, str(experiment_id)):
            return False  # configured elsewhere (a bucket, a shared folder): left alone
        if old != Path(project).resolve() / relative and old.exists():
            return False  # another project's artifacts, still there
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        con.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
            (relative, int(experiment_id)),
        )
        for prefix in {row[0], str(old), old.as_uri()}:
            start = len(prefix) + 1  # substr() counts from 1: the rest starts with '/'
            for table, column, scoped in _LOCATIONS:
                if table not in tables:
                    continue
                where = f"substr({column}, 1, ?) = ?" + (" AND experiment_id = ?" if scoped else "")
                args: tuple[Any, ...] = (relative, start, start, prefix + "/")
                con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {where}",
                    args + ((int(experiment_id),) if scoped else ()),
                )
    return True


def _local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(location) if parsed.scheme == "" else None
