"""Where a stage computes and in which precision: the one rule behind every ``device`` and ``precision`` setting.

``device`` (a key of every section that builds a model and computes, and ``albef predict --device``):

=========  ======================================================================================================
``auto``   this process's GPU, ``cuda:LOCAL_RANK``, when CUDA is available; else the CPU
``cpu``    the CPU, also on a GPU machine (processes then talk over gloo)
``cuda``   this process's GPU, ``cuda:LOCAL_RANK`` (torchrun and SLURM give each process of a node its own
           local rank, so each gets its own GPU); an error where there is no CUDA device
``cuda:N`` GPU ``N``, for one process only: under several processes every rank would share that GPU, so it
           is refused (use ``cuda``, or ``CUDA_VISIBLE_DEVICES`` to choose which GPUs the ranks get)
=========  ======================================================================================================

``precision``: ``auto`` is bf16 autocast on GPUs with native bf16 (compute capability 8.0 and later), fp16
autocast with a loss scaler on older GPUs, fp32 on the CPU; ``fp32`` never autocasts; ``bf16`` and ``fp16``
need a GPU, and ``bf16`` one with native bf16 (torch would otherwise emulate it, slower than fp32).

A setting this machine cannot honour is a :class:`~albef.config.ConfigError` naming the key, raised before
any work: a stage never falls back to the CPU on its own. :func:`check_device` and :func:`check_precision`
check only the spelling, where configs are loaded (the flows validate sections on a machine that may have no
GPU); :func:`resolve_device` and :func:`resolve_precision` also check this machine, when a stage starts.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import torch

from albef.config import ConfigError

DEVICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _parse(setting: Any, key: str) -> tuple[str, int | None]:
    """``(kind, index)``: kind ``auto`` | ``cpu`` | ``cuda``, index only for ``cuda:N``."""
    text = setting.strip().lower() if isinstance(setting, str) else None
    if text in ("auto", "cpu", "cuda"):
        return text, None
    match = re.fullmatch(r"cuda:(\d+)", text or "")
    if match is None:
        raise ConfigError(f"{key}: expected {DEVICES}, got {setting!r}")
    return "cuda", int(match.group(1))


def check_device(setting: Any, key: str) -> None:
    """A ConfigError naming ``key`` unless ``setting`` is spelt as one of :data:`DEVICES`."""
    _parse(setting, key)


def check_precision(precision: Any, key: str) -> None:
    """A ConfigError naming ``key`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}: expected one of {', '.join(PRECISIONS)}, got {precision!r}")


def _visible() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"


def resolve_device(
    setting: str = "auto", key: str = "device", *, local_rank: int = 0, world_size: int = 1
) -> torch.device:
    """The device ``setting`` means for the process of local rank ``local_rank`` among ``world_size``
    processes (see the module's table); a ConfigError naming ``key`` when this machine cannot honour it."""
    kind, index = _parse(setting, key)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if kind == "auto":
            return torch.device("cpu")
        raise ConfigError(
            f"{key}: {setting!r} was asked for but this machine has no CUDA device "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )
    count = torch.cuda.device_count()
    if index is not None:
        if world_size > 1:
            raise ConfigError(
                f"{key}: {setting!r} names one GPU, but this run has {world_size} processes and each needs its "
                "own; use cuda (or auto): each process takes cuda:LOCAL_RANK"
            )
        if index >= count:
            raise ConfigError(
                f"{key}: {setting!r} was asked for but this machine has {count} CUDA device(s) ({_visible()}); "
                f"use cuda:0 to cuda:{count - 1}, auto or cpu"
            )
        return torch.device("cuda", index)
    if local_rank >= count:
        raise ConfigError(
            f"{key}: {setting!r} is this process's GPU cuda:{local_rank} (LOCAL_RANK), but this machine has "
            f"{count} CUDA device(s) ({_visible()}); start at most {count} processes per node, or use cpu"
        )
    return torch.device("cuda", local_rank)


def resolve_precision(precision: str, device: torch.device, key: str = "precision") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None``: fp32, no autocast); a ConfigError naming
    ``key`` for a precision this device cannot run.

    bf16 support is asked of the current CUDA device, the one :func:`albef.distributed.init_distributed`
    selects; emulation does not count, so ``auto`` picks fp16 with a scaler on GPUs without native bf16."""
    check_precision(precision, key)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"{key}: {precision!r} needs a GPU; this run is on {device.type} (use fp32 or auto)"
        )
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "bf16" and not native_bf16:
        raise ConfigError(
            f"{key}: 'bf16' was asked for but the GPU {device} has no native bf16 (compute capability below "
            "8.0); use auto or fp16 (fp16 trains with a loss scaler)"
        )
    if precision == "fp16" or not native_bf16:
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``amp_dtype`` (:func:`resolve_precision`) on ``device``; ``None``: no autocast, fp32."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


__all__ = [
    "DEVICES",
    "PRECISIONS",
    "autocast",
    "check_device",
    "check_precision",
    "resolve_device",
    "resolve_precision",
]
