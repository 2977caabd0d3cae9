"""Where a run came from: the git commit, the DVC data version, library versions, a flat view of params."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

from albef.tracking.redact import redact_uri

LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "safetensors",
    "numpy",
    "mlflow",
    "dvc",
)


def _git(*args: str, cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip()


def git_state(cwd: str | Path | None = None) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false", "root": path, "branch": name, "remote": url}`` of the project in
    ``cwd`` (default: the working directory, else the checkout albef itself is imported from); empty outside any
    git checkout. ``remote`` is the URL of ``origin`` (else of the first remote) with its credentials redacted:
    a clone made with a token keeps it in the URL."""
    if cwd is None:
        import albef

        candidates: list[str | Path] = [".", Path(albef.__file__).resolve().parent]
    else:
        candidates = [cwd]
    commit = None
    for candidate in candidates:
        commit = _git("rev-parse", "HEAD", cwd=candidate)
        if commit:
            cwd = candidate
            break
    if not commit or cwd is None:
        return {}
    # Only tracked source counts as dirty: DVC rewrites dvc.lock and metrics/ during the pipeline itself.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.yaml", "*.toml", cwd=cwd)
    state = {
        "commit": commit,
        "dirty": "true" if status else "false",
        "root": _git("rev-parse", "--show-toplevel", cwd=cwd) or str(cwd),
    }
    branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=cwd)
    if branch:
        state["branch"] = branch
    remotes = (_git("remote", cwd=cwd) or "").split()
    if remotes:
        url = _git("remote", "get-url", "origin" if "origin" in remotes else remotes[0], cwd=cwd)
        if url:
            state["remote"] = redact_uri(url)
    return state


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _lock_outs(lock: dict[str, Any]) -> dict[str, str]:
    """Every output path recorded in ``dvc.lock`` -> its hash (``md5`` or ``.dir`` md5)."""
    outs: dict[str, str] = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            digest = entry.get("md5") or entry.get("hash") or entry.get("etag")
            if entry.get("path") and digest:
                outs[os.path.normpath(entry["path"])] = str(digest)
    return outs


def data_version(inputs: list[str | Path], lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """The DVC version of each input folder or file: its hash in ``dvc.lock``, as the stage that produced
    it recorded it (DVC writes a stage's lock entry before the next stage starts, so this is the version
    the running stage reads). Inputs DVC does not know get ``untracked``; ``version`` combines them all."""
    lock_path = Path(lock_file)
    outs: dict[str, str] = {}
    if lock_path.is_file():
        with contextlib.suppress(yaml.YAMLError):
            outs = _lock_outs(yaml.safe_load(lock_path.read_text()) or {})
    root = lock_path.resolve().parent
    found: dict[str, str] = {}
    for item in inputs:
        path = Path(item)
        if path.is_absolute():
            with contextlib.suppress(ValueError):  # outside the project: kept absolute
                path = path.resolve().relative_to(root)
        rel = os.path.normpath(path)
        found[rel] = outs.get(rel, "untracked")
    combined = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": combined, **{f"input.{k}": v for k, v in found.items()}}


def numeric_items(values: dict[str, Any]) -> dict[str, float]:
    """The entries of a flat mapping that are numbers (bools excluded): what MLflow accepts as metrics."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def provenance_tags(inputs: list[str | None]) -> dict[str, str]:
    """A stage run's MLflow tags: the version of its inputs under DVC (``dvc.lock`` of ``$DVC_ROOT``)."""
    versions = data_version([i for i in inputs if i], Path(os.environ.get("DVC_ROOT", ".")) / "dvc.lock")
    return {
        "albef.data_version": versions.pop("version"),
        **{f"albef.dvc.{k}": v for k, v in versions.items()},
    }
