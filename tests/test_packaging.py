"""Packaging: pyproject.toml declares what the code imports, within ranges the lock satisfies; an environment
installed from pyproject.toml alone runs albef and the flows; and checkouts that share .ci/install's cached
environment each run their own albef."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
BIN = Path(sys.executable).parent

# Declared distributions that no Python file imports, each with the reason it is declared.
COMMAND_ONLY = {
    "dvc": "dvc.yaml's stages run through the dvc command (the flows call `dvc repro`)",
    "dvc-s3": "DVC's S3 remote (`dvc push/pull` to s3://); dvc loads it as a plugin",
    "ruff": "the linter CI runs (`ruff check`, `ruff format --check`)",
    "nvidia-ml-py": "pynvml, which MLflow's system metrics monitor imports to log GPU use",
    "pytest-xdist": "pytest's -n (the README's test command runs the tests on every core)",
}

# Where each group of distributions must be imported from (or be COMMAND_ONLY).
USED_BY = {"core": ("albef",), "pipeline": ("albef", "flows"), "dev": ("tests",)}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _declared() -> dict[str, dict[str, Requirement]]:
    """{group: {canonical name: requirement}}; the group of the core dependencies is "core"."""
    project = _project()
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {
        group: {canonicalize_name(r.name): r for r in map(Requirement, reqs)}
        for group, reqs in groups.items()
    }


def _imports(folder: str) -> set[str]:
    """Top-level names of the third-party modules the .py files under ``folder`` import (absolute imports,
    standard library and the repository's own modules left out)."""
    root = REPO / folder
    files = list(root.rglob("*.py"))
    local = {p.name for p in REPO.iterdir() if p.is_dir() and any(p.glob("*.py"))}  # albef, flows, tests, ...
    local |= {p.stem for p in files}  # sibling modules: conftest, benchmarks' shared helpers
    local |= {p.stem for p in (REPO / "benchmarks").glob("*.py")}  # the benchmarks tests import by name
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - local


@functools.cache
def _provided() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(folder: str) -> dict[str, set[str]]:
    """{imported module: the canonical names of the installed distributions that provide it}."""
    provided = _provided()
    return {name: {canonicalize_name(d) for d in provided.get(name, [])} for name in _imports(folder)}


def test_every_import_is_declared():
    declared = _declared()
    runtime = set(declared["core"]) | set(declared["pipeline"])
    everything = set().union(*declared.values())
    missing = []
    for folder, allowed in (
        ("albef", runtime),
        ("flows", runtime),
        ("tests", everything),
        ("benchmarks", runtime),
    ):
        for module, dists in sorted(_distributions(folder).items()):
            if not dists:
                missing.append(f"{folder}/ imports {module}, which no installed distribution provides")
            elif not dists & allowed:
                missing.append(f"{folder}/ imports {module} ({' or '.join(sorted(dists))}): not declared")
    assert not missing, "\n".join(missing)


def test_nothing_declared_is_unused():
    unused = []
    for group, reqs in _declared().items():
        used = set().union(*(d for folder in USED_BY[group] for d in _distributions(folder).values()))
        unused += [f"{group}: {name}" for name in reqs if name not in used and name not in COMMAND_ONLY]
    assert not unused, (
        f"declared but imported by none of their folders (or list them in COMMAND_ONLY): {unused}"
    )


def test_core_leaves_out_the_pipeline_services():
    # tests/test_bare_imports.py runs the core commands with these hidden; a bare GPU machine installs only core.
    services = {
        "mlflow",
        "prefect",
        "dvc",
        "boto3",
        "botocore",
        "s3transfer",
        "pandas",
        "matplotlib",
        "psutil",
    }
    declared = _declared()
    assert services <= set(declared["pipeline"])
    assert not services & set(declared["core"])


def test_the_lock_satisfies_every_range():
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    wrong = [
        f"{group}: {req} (lock: {pins.get(name, 'absent')})"
        for group, reqs in _declared().items()
        for name, req in reqs.items()
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True)
    ]
    assert not wrong, wrong


def _find_links() -> list[str]:
    """The local wheel folders of machines of this kind (as in .ci/install); none elsewhere."""
    folders = ("/opt/wheels", "/opt/pypi-more/files", "/opt/pypi/files")
    return [arg for d in folders if Path(d).is_dir() for arg in ("--find-links", d)]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _copy_project(dest: Path, *folders: str) -> Path:
    """The files that build albef (pyproject.toml names README.md) plus ``folders``."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("albef", *folders):
        shutil.copytree(
            REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    return dest


@pytest.mark.slow
def test_a_venv_from_pyproject_alone_runs_albef_and_the_flows(tmp_path):
    """``albef[pipeline]`` in a new venv, resolved from pyproject.toml's declarations (the lock only as
    constraints, so uv picks the locked versions from its cache): the CLI, the flows and the registry work."""
    uv = shutil.which("uv", path=str(BIN)) or shutil.which("uv")
    assert uv is not None, "uv is not on .venv/bin or PATH: .ci/install puts it there"
    source = _copy_project(tmp_path / "src")
    venv = tmp_path / "venv"
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MLFLOW_TRACKING_URI")
    }
    _run([uv, "venv", "-q", "-p", sys.executable, str(venv)], tmp_path, env)
    # The lock only as constraints: the requirements themselves come from pyproject.toml.
    install = [
        uv,
        "pip",
        "install",
        "-q",
        "-p",
        str(venv / "bin" / "python"),
        "-c",
        str(LOCK),
        *_find_links(),
    ]
    _run([*install, f"{source}[pipeline]"], tmp_path, env)
    # Bytecode written as modules are first imported, to one folder outside the venv and the checkout.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    work = tmp_path / "work"
    work.mkdir()
    assert "registry" in _run([str(venv / "bin" / "albef"), "--help"], work, env)
    # flows/ from the checkout, as Prefect loads it; albef from the new venv (-P: the current folder is not on
    # sys.path, and the checkout goes after site-packages).
    check = (
        f"import sys; sys.path.append({str(REPO)!r}); import albef, flows.pipeline, flows.serve; "
        f"assert albef.__file__.startswith({str(venv)!r}), albef.__file__"
    )
    _run([str(venv / "bin" / "python"), "-P", "-c", check], work, env)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _run(
        [str(venv / "bin" / "albef"), "registry", "list", "--params", str(REPO / "params.yaml")], work, env
    )
    assert "no versions" in out


def test_checkouts_sharing_the_environment_run_their_own_albef(tmp_path):
    """Two checkouts install into one environment cache, one after the other: each .venv still runs its own
    checkout's albef (the cache here links to the real shared environment, so nothing heavy is installed)."""
    shared = Path(
        _run(["bash", str(REPO / ".ci" / "install"), "--shared-path"], REPO).strip().splitlines()[-1]
    )
    assert (shared / ".albef-complete").exists(), (
        f"the shared environment {shared} is not built: run .ci/install"
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / shared.name).symlink_to(shared)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["ALBEF_VENV_CACHE"] = str(cache)
    checkouts = {}
    for name in ("a", "b"):
        checkout = _copy_project(tmp_path / name, ".ci", "requirements")
        # Each checkout's own code: a marker module, and in b a CLI that only prints b's name.
        (checkout / "albef" / "_checkout.py").write_text(f"NAME = {name!r}\n")
        if name == "b":
            (checkout / "albef" / "cli.py").write_text(
                'def main(argv=None):\n    print("the cli of checkout b")\n'
            )
        last = _run(["bash", ".ci/install"], checkout, env).strip().splitlines()[-1]
        assert Path(last) == checkout / ".venv"
        assert not (checkout / ".venv").is_symlink()
        checkouts[name] = checkout
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, checkout in checkouts.items():
        python = str(checkout / ".venv" / "bin" / "python")
        out = _run(
            [python, "-c", "import albef, albef._checkout as c; print(albef.__file__, c.NAME)"], outside
        )
        assert out.split() == [str(checkout / "albef" / "__init__.py"), name]
        # The shared commands run with the checkout's python, so they see its albef too.
        assert (checkout / ".venv" / "bin" / "prefect").read_text().startswith(f"#!{python}\n")
    assert "registry" in _run([str(checkouts["a"] / ".venv" / "bin" / "albef"), "--help"], outside)
    assert (
        _run([str(checkouts["b"] / ".venv" / "bin" / "albef"), "--help"], outside)
        == "the cli of checkout b\n"
    )
    # The shared environment holds no albef of its own.
    assert not list((shared / "lib").glob("python3.*/site-packages/*albef*"))
