"""Atomic file writes: a crash, a kill or a full disk never leaves a half-written file under a final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``.

    On any failure the temporary file is removed and whatever stood at ``path`` before is untouched.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def can_draw(path: str | Path) -> bool:
    """Whether matplotlib is installed to draw ``path``. A machine without it (a bare GPU machine) skips the
    figure with a warning instead of failing a stage after its work is done."""
    import importlib.util
    import logging

    if importlib.util.find_spec("matplotlib") is not None:
        return True
    logging.getLogger(__name__).warning("matplotlib is not installed: %s is not drawn", path)
    return False
