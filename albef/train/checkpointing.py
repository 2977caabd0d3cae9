"""Full training state on disk: written atomically, the newest complete one found again, the last k kept.

A training checkpoint holds everything a resumed run needs to continue bit for bit: the model state dict
(online and momentum encoders, queues, queue pointer), the optimizer, the AMP scaler, every RNG (torch CPU
and CUDA, Python, NumPy), the global step and epoch, and whatever small state the caller adds (sampler
position, scheduler settings). It is written to a temporary file in the same folder, flushed to disk, and
renamed into place, so a crash or a full disk never leaves a truncated checkpoint under a final name and
never harms the previous one; old checkpoints are pruned only after the new one is complete.
Loading uses ``weights_only=True``: no pickled code runs (:func:`read_checkpoint`, :func:`set_aside`).
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from albef.io import atomic_write
from albef.safe_load import UnreadableCheckpoint, load_torch

log = logging.getLogger(__name__)
_NAME = re.compile(r"step-(\d{9})\.pt")
_PAYLOAD_KEYS = ("model", "step", "epoch")  # what every albef training checkpoint holds
#: where :func:`set_aside` moves an unreadable checkpoint, inside the checkpoint folder
CORRUPT_DIR = "corrupt"


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.pt"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    epoch: int = 0,
    extra: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write the training state at ``step`` atomically, then keep only the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "extra": extra or {},
    }
    final = checkpoint_path(directory, step)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)

    # A failed write (disk full, kill) leaves the previous checkpoints as they were; prune only afterwards.
    atomic_write(final, write)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    return next(reversed(list_checkpoints(directory)), None)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a training checkpoint, read with ``weights_only=True``. A file that is truncated, corrupt,
    refused (pickled code) or holds something else is an :class:`~albef.safe_load.UnreadableCheckpoint`
    naming it; nothing is restored before the whole file has been read."""
    what = "not a readable albef training checkpoint"
    payload = load_torch(path, what)
    if not isinstance(payload, dict):
        raise UnreadableCheckpoint(path, f"holds a {type(payload).__name__}, not a dict", what)
    if missing := [k for k in _PAYLOAD_KEYS if k not in payload]:
        raise UnreadableCheckpoint(path, f"no {', '.join(missing)} entries (another kind of file?)", what)
    return payload


def set_aside(path: str | Path) -> Path:
    """Move an unreadable checkpoint into ``corrupt/`` beside it, where :func:`list_checkpoints` (and so
    ``resume: auto`` and pruning) no longer see it, but the file is kept for a look. Returns the new path."""
    path = Path(path)
    folder = path.parent / CORRUPT_DIR
    folder.mkdir(exist_ok=True)
    target, n = folder / path.name, 1
    while target.exists():
        target, n = folder / f"{path.name}.{n}", n + 1
    path.rename(target)
    return target


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns ``{"step", "epoch", "extra"}``."""
    payload = read_checkpoint(path)
    model.load_state_dict(payload["model"], strict=True)
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise RuntimeError(f"{path} holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return {"step": payload["step"], "epoch": payload["epoch"], "extra": payload["extra"]}
