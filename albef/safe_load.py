"""Reading weight files safely, with one clear error when a file is truncated, corrupt or refused.

Every weight file albef reads goes through here: the ``model.safetensors`` of an albef model folder, a DeiT or
official ``.pth`` (``init``, ``init_deit``, ``convert-official``), a training checkpoint (``resume``) and a
parity reference. PyTorch files load with ``weights_only=True`` (no pickled code ever runs); safetensors files
hold no code at all. Whatever goes wrong (a truncated download or copy, a file of another kind, a pickle that
would call a function) becomes an :class:`UnreadableCheckpoint` whose one-line message names the file and
what is wrong, which the command line prints as ``albef <command>: error: ...`` without a traceback.

Torch-free at import (the error types are needed where torch is not); torch and safetensors load on use.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

# Globals a PyTorch checkpoint legitimately names in its pickle (tensor rebuilding, ordered dicts, byte codecs).
_SAFE_MODULES = ("torch", "collections", "_codecs", "builtins.set", "builtins.frozenset")
_SCAN_LIMIT = 64 * 2**20  # bytes of a non-zip file looked at for pickled globals


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class UnreadableCheckpoint(CheckpointError):
    """A weight file that cannot be read at all: missing, truncated, corrupt, of another kind, or refused
    because its pickle would run code. ``path`` is the file, ``reason`` what is wrong with it."""

    def __init__(self, path: str | Path, reason: str, what: str = "") -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {what + ': ' if what else ''}{reason}")


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickles inside a PyTorch file: each ``data.pkl`` of a zip checkpoint, else the file's own bytes."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        with open(path, "rb") as fh:
            return [fh.read(_SCAN_LIMIT)]
    except (OSError, zipfile.BadZipFile, EOFError):
        return []


def pickled_globals(path: str | Path) -> list[str]:
    """The functions and classes the pickles in ``path`` would import (``module.name``), read with
    :mod:`pickletools`, which only decodes opcodes and never runs or imports anything."""
    found: list[str] = []
    for data in _pickle_streams(Path(path)):
        stream = io.BytesIO(data)
        while stream.tell() < len(data):  # a legacy (non-zip) file holds several pickles in a row
            strings: list[str] = []
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name == "GLOBAL":
                        found.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # the rest is not a pickle (tensor bytes of a legacy file) or is truncated
                break
    return list(dict.fromkeys(found))


def _incomplete_zip(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive (every PyTorch checkpoint since 1.6) but is not a whole one."""
    try:
        with open(path, "rb") as fh:
            starts_as_zip = fh.read(4) == b"PK\x03\x04"
        return starts_as_zip and not zipfile.is_zipfile(path)
    except OSError:
        return False


def describe_failure(path: str | Path, exc: BaseException) -> str:
    """What is wrong with the file at ``path``, given the exception reading it raised: one short line."""
    path = Path(path)
    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return "a directory, not a file"
    if isinstance(exc, PermissionError):
        return f"cannot be read ({exc.strerror or first_line(exc)})"
    if _incomplete_zip(path):  # torch's zip reader says so as a RuntimeError, or an OSError (EINVAL)
        return "truncated or corrupt (an incomplete zip archive)"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or first_line(exc)})"
    if type(exc).__name__ == "SafetensorError":
        return f"truncated or not a safetensors file ({first_line(exc)})"
    if isinstance(exc, EOFError):
        return "empty or truncated (the data ends early)"
    if isinstance(exc, pickle.UnpicklingError) or "weights only load failed" in str(exc).lower():
        scanned = [g for g in pickled_globals(path) if not g.startswith(_SAFE_MODULES)]
        code = list(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(exc)) + scanned))
        if code:
            shown = ", ".join(code[:4]) + (f", ... ({len(code)} in all)" if len(code) > 4 else "")
            return f"refused: it holds pickled code ({shown}), which weights_only=True does not run"
        return "corrupt or not a PyTorch checkpoint (its pickle cannot be read)"
    text = str(exc)
    if "zip archive" in text or "PytorchStreamReader" in text:
        return "truncated or corrupt (an incomplete zip archive)"
    if "magic number" in text:
        return "corrupt or not a PyTorch checkpoint (wrong magic number)"
    return f"cannot be read ({type(exc).__name__}: {first_line(exc)})"


def load_torch(path: str | Path, what: str = "") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; any failure is an
    :class:`UnreadableCheckpoint` naming the file (``what`` says which kind of file was expected)."""
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # a bare pickle's protocol: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UnreadableCheckpoint(path, describe_failure(path, exc), what) from exc


def load_weights(path: str | Path, what: str = "") -> Any:
    """A ``.safetensors`` file with ``safetensors.torch.load_file`` on the CPU, anything else with
    :func:`load_torch`; any failure is an :class:`UnreadableCheckpoint`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_torch(path, what)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise UnreadableCheckpoint(path, describe_failure(path, exc), what) from exc
