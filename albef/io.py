"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written file under a final name.

The file gets the permissions an ordinary ``open(path, "w")`` would give it: ``0o666`` less the process's
umask (``0o644`` under the usual ``022``), not the ``0o600`` of the temporary file it is written as, so other
users and services (a model server, a data loader under another account) can read shards and models.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: ``/proc/self/status``);
    elsewhere set and restored at once, under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    On any failure the temporary file is removed and whatever stood at ``path`` before is untouched. The file
    ends with mode ``0o666 & ~umask``.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def replacing_folder(out: str | Path) -> Iterator[Path]:
    """An empty folder beside ``out`` to fill; when the block ends without error it replaces ``out`` whole, so
    ``out`` is always the previous complete folder or the new one, never a mixture."""
    out = Path(out)
    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def can_draw(path: str | Path) -> bool:
    """Whether matplotlib is installed to draw ``path``. A machine without it (a bare GPU machine) skips the
    figure with a warning instead of failing a stage after its work is done."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logging.getLogger(__name__).warning("matplotlib is not installed: %s is not drawn", path)
    return False


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON with sorted keys (a metrics or summary file), written atomically; the folder is
    made if needed."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_metrics(out_dir: str | Path, metrics: dict, metrics_path: str | Path | None = None) -> Path:
    """An evaluation's metrics: ``<out_dir>/metrics.json`` (the report folder, made if needed, returned) and, for
    DVC, ``metrics_path`` too."""
    out = Path(out_dir)
    write_json(out / "metrics.json", metrics)
    if metrics_path:
        write_json(metrics_path, metrics)
    return out
