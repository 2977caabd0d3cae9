"""Where a flow run works: the checkout itself, or a workspace of its own that ends as a DVC experiment.

Several flow runs at once must not share a ``params.yaml``: each would run with the other's settings and
report its own. So a flow run with overrides never writes them into the checkout. It works in a **workspace**:
a git worktree of the checkout's commit under ``.dvc/tmp/albef-workspaces/<name>``, with

* the checkout's uncommitted changes (modified and untracked, not ignored files) copied over, so it runs what
  the checkout would run;
* the checkout's DVC cache (``cache.dir`` in the workspace's ``.dvc/config.local``), so cached outputs come
  from it (``dvc checkout``) and new ones go to it, and the checkout's uncached outputs (``cache: false``:
  the synthetic data, metrics, plots, training runs) copied, so DVC reruns only the stages the overrides
  change;
* the checkout's MLflow store: a relative local store (``sqlite:///mlflow.db``, the embedded default) is
  passed to the stages as an absolute ``MLFLOW_TRACKING_URI`` and the artifact folder ``mlruns`` is a link
  to the checkout's, so every run lands where the checkout's UI looks.

The overrides are written into the workspace's ``params.yaml``, the stages run there (``dvc repro``, one
Prefect task each, retried and resumed there), and a finished run is saved with ``dvc exp save`` as the DVC
experiment ``<name>``: ``dvc exp show`` in the checkout lists it with its params and metrics,
``dvc exp apply <name>`` brings it into the checkout. The worktree is then removed (kept on failure, or when
asked, for inspection). Git commands and ``dvc exp save`` of concurrent runs are serialised by a lock file;
everything else runs in parallel.

A flow run without overrides works in the checkout (its ``dvc.lock`` and outputs are the pipeline's), holding
the checkout lock so that a second such run waits instead of colliding with the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from albef.orchestration.pipeline import PlanError
from albef.tracking.run import EXPERIMENT_ENV

WORKSPACES = Path(".dvc") / "tmp" / "albef-workspaces"
_GIT_LOCK = Path(".dvc") / "tmp" / "albef-git.lock"  # worktree add/remove, dvc exp save
_CHECKOUT_LOCK = Path(".dvc") / "tmp" / "albef-checkout.lock"  # a flow run working in the checkout
_MARKER = Path(".dvc") / "tmp" / "albef-workspace.json"  # in a workspace: its checkout and experiment


@dataclass(frozen=True)
class Workspace:
    checkout: Path  # the albef checkout the flow run was started in
    path: Path  # where the stages run (the checkout itself in checkout mode)
    experiment: str | None  # the DVC experiment it becomes (None: the checkout)

    @property
    def isolated(self) -> bool:
        return self.experiment is not None


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def experiment_name(flow_run_name: str, flow_run_id: str) -> str:
    """A DVC experiment (git ref) name for a flow run: its Prefect name and the start of its id, unique per run."""
    stem = _NAME_OK.sub("-", flow_run_name).strip("-.") or "run"
    return f"{stem}-{flow_run_id.replace('-', '')[:8]}"


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PlanError(f"git {' '.join(args)} in {cwd} failed: {result.stderr.strip()[-800:]}")
    return result.stdout


def _dvc(cwd: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise PlanError(
            f"dvc {' '.join(args)} in {cwd} failed: {(result.stdout + result.stderr).strip()[-800:]}"
        )
    return result.stdout


# ------------------------------------------------------------------------------------------------- locks

# Within one process, a thread re-enters a lock it holds (a subflow inside its parent flow's lock) and other
# threads wait on it; across processes the lock file's flock decides.
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_DEPTH: dict[str, int] = {}  # per lock file, changed only by the thread holding its RLock
_GUARD = threading.Lock()


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str | None = None, logger=None) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes and threads; re-entered by the thread that holds it."""
    key = str(path.resolve())
    with _GUARD:
        rlock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    if not rlock.acquire(blocking=False):
        if waiting and logger is not None:
            logger.info("%s: waiting for another flow run of this process", waiting)
        rlock.acquire()
    try:
        if _DEPTH.get(key):
            _DEPTH[key] += 1
            try:
                yield
            finally:
                _DEPTH[key] -= 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                if waiting and logger is not None:
                    logger.info("%s: waiting for %s", waiting, holder)
                fcntl.flock(fh, fcntl.LOCK_EX)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
            _DEPTH[key] = 1
            try:
                yield
            finally:
                _DEPTH.pop(key, None)
                fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        rlock.release()


def checkout_lock(checkout: Path, holder: str, logger=None):
    """Held by a flow run that works in the checkout: a second one waits until the first has finished."""
    return _file_lock(Path(checkout) / _CHECKOUT_LOCK, f"{holder}: the checkout is busy", logger)


# ----------------------------------------------------------------------------------------- the workspace


def _uncached_outputs(project: Path) -> list[str]:
    """Every ``cache: false`` output, metric and plot dvc.yaml declares (paths relative to the project)."""
    stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages") or {}
    found: list[str] = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if isinstance(entry, dict):
                    for path, opts in entry.items():
                        if isinstance(opts, dict) and opts.get("cache") is False:
                            found.append(path)
    return list(dict.fromkeys(found))


# Files this large (checkpoints, exported weights) are hard-linked into a workspace instead of copied: albef
# writes such files whole, to a temporary name renamed into place, so a workspace replacing or deleting its
# link never changes the checkout's file. Smaller files (logs appended in place, metrics) are copied.
LINK_BYTES = 32 * 2**20


def _copy(src: Path, dest: Path) -> None:
    """``src`` (a file or a folder) at ``dest``: large files linked, the rest copied with their metadata."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest, symlinks=True, copy_function=_copy_file)
    else:
        _copy_file(src, dest)


def _copy_file(src: str | Path, dest: str | Path) -> None:
    if not os.path.islink(src) and os.path.getsize(src) >= LINK_BYTES:
        try:
            os.link(src, dest)
            return
        except OSError:  # another filesystem, or links not allowed: copy
            pass
    shutil.copy2(src, dest, follow_symlinks=False)


def describe(path: str | Path) -> Workspace:
    """What ``path`` is: a workspace made by :func:`create` (its checkout and experiment), else a checkout."""
    path = Path(path).resolve()
    marker = path / _MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        return Workspace(Path(info["checkout"]), path, info["experiment"])
    return Workspace(path, path, None)


def workspace_path(checkout: Path, experiment: str) -> Path:
    return Path(checkout).resolve() / WORKSPACES / experiment


def create(checkout: str | Path, experiment: str, logger=None, rev: str | None = None) -> Workspace:
    """A workspace for DVC experiment ``experiment`` (see the module docstring); an existing one of the same
    name (an interrupted attempt of the same flow run) is reused as it is. ``rev``: start from that commit
    (e.g. an experiment's ref) as it is, instead of the checkout's commit and uncommitted changes."""
    checkout = Path(checkout).resolve()
    path = workspace_path(checkout, experiment)
    if (path / _MARKER).is_file() and (path / ".git").is_file():
        if logger is not None:
            logger.info("workspace %s: reusing it (an earlier attempt of this flow run)", path)
        return Workspace(checkout, path, experiment)
    with _file_lock(checkout / _GIT_LOCK):
        try:
            _git(checkout, "rev-parse", "--verify", "HEAD^{commit}")
        except PlanError as exc:
            raise PlanError(
                f"a flow run with overrides runs as a DVC experiment, which needs the checkout {checkout} to be "
                f"a git repository with a commit ({exc})"
            ) from None
        if path.exists():
            shutil.rmtree(path)
        _git(checkout, "worktree", "prune")
        path.parent.mkdir(parents=True, exist_ok=True)
        _git(checkout, "worktree", "add", "--detach", str(path), rev or "HEAD")
    # the checkout's uncommitted state: modified and untracked (not ignored) files, deletions
    changed = [] if rev else _git(checkout, "ls-files", "-z", "-m", "-o", "--exclude-standard").split("\0")
    for rel in filter(None, dict.fromkeys(changed)):
        src = checkout / rel
        if src.is_file() or src.is_symlink():
            _copy(src, path / rel)
        elif not src.exists():
            with contextlib.suppress(FileNotFoundError):
                (path / rel).unlink()
    # the checkout's DVC settings and cache
    local_config = checkout / ".dvc" / "config.local"
    if local_config.is_file():
        shutil.copy2(local_config, path / ".dvc" / "config.local")
    cache_dir = _dvc(checkout, "cache", "dir").strip()
    _dvc(path, "config", "--local", "cache.dir", str((checkout / cache_dir).resolve()))
    # outputs DVC cannot restore from the cache (cache: false), as the checkout has them
    for rel in _uncached_outputs(checkout):
        src = checkout / rel
        if src.exists() and not (path / rel).exists():
            _copy(src, path / rel)
    try:
        _dvc(path, "checkout", "--allow-missing", "--quiet")
    except PlanError as exc:  # outputs missing from the cache: the stages that make them will run
        if logger is not None:
            logger.info("workspace %s: not every output could be checked out (%s)", path, exc)
    marker = path / _MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"checkout": str(checkout), "experiment": experiment}) + "\n")
    artifacts = checkout / "mlruns"
    if not (path / "mlruns").exists():
        artifacts.mkdir(exist_ok=True)
        (path / "mlruns").symlink_to(artifacts, target_is_directory=True)
    if logger is not None:
        logger.info("workspace %s: DVC experiment %s, on the checkout's commit and changes", path, experiment)
    return Workspace(checkout, path, experiment)


def stage_env(workspace: Workspace, tracking_uri: str | None) -> dict[str, str]:
    """What the stage commands of an isolated run need in their environment: the checkout's MLflow store
    (``tracking_uri``, absolute, from :func:`albef.orchestration.mlflow_link.tracking` on the checkout) and
    the experiment's name for their runs' tags."""
    if not workspace.isolated:
        return {}
    env = {EXPERIMENT_ENV: workspace.experiment or ""}
    if tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def save(workspace: Workspace, logger=None) -> str:
    """``dvc exp save`` the finished workspace as its experiment (metrics and plots included); returns the
    experiment's git ref."""
    assert workspace.experiment is not None
    # everything the run left that git would commit: metrics and plots (cache: false), new files of the checkout
    untracked = _git(workspace.path, "ls-files", "-z", "--others", "--exclude-standard").split("\0")
    include = [arg for rel in filter(None, untracked) for arg in ("--include-untracked", rel)]
    with _file_lock(workspace.checkout / _GIT_LOCK):
        _dvc(workspace.path, "exp", "save", "--force", "--name", workspace.experiment, *include)
        ref = experiment_ref(workspace.checkout, workspace.experiment)
    if logger is not None:
        logger.info(
            "DVC experiment %s saved (%s): `dvc exp show` lists it, `dvc exp apply %s` brings it into the checkout",
            workspace.experiment,
            ref,
            workspace.experiment,
        )
    return ref


def experiment_ref(checkout: Path, experiment: str) -> str:
    """The git ref of DVC experiment ``experiment`` (refs/exps/<baseline>/<name>)."""
    refs = _git(checkout, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
    found = [r for r in refs if r.rsplit("/", 1)[-1] == experiment and "/exec/" not in r]
    if not found:
        raise PlanError(f"no DVC experiment named {experiment!r} in {checkout}")
    return found[-1]


def remove(workspace: Workspace) -> None:
    """Delete the worktree (its outputs are in the DVC cache and the experiment)."""
    if not workspace.isolated:
        return
    with _file_lock(workspace.checkout / _GIT_LOCK):
        with contextlib.suppress(PlanError):
            _git(workspace.checkout, "worktree", "remove", "--force", str(workspace.path))
        shutil.rmtree(workspace.path, ignore_errors=True)
        with contextlib.suppress(PlanError):
            _git(workspace.checkout, "worktree", "prune")
