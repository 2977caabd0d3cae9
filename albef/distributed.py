"""One distributed set-up for torchrun, SLURM and a plain single process.

``torchrun`` sets ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``); under SLURM
(``srun python -m albef ...``) the same facts come from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``
and the first host of ``SLURM_JOB_NODELIST``. Without either, the run is one process with no process group,
and every collective in albef is a no-op. Each process computes on the device its section's ``device`` names
(:mod:`albef.device`); NCCL is used between GPUs, gloo between CPUs, and the collective timeout is minutes,
not the days some codebases set, so a dead rank stops the job instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from albef.device import resolve_device, resolve_precision
from albef.world import WorldInfo, first_slurm_host, world_info_from_env

log = logging.getLogger(__name__)


def init_distributed(
    device: str = "auto", key: str = "device", timeout_minutes: float = 30.0, backend: str | None = None
) -> tuple[WorldInfo, torch.device]:
    """Join the process group described by the environment (if any); return the world and this rank's device,
    the one ``device`` (the setting ``key``, e.g. ``pretrain.device``) names for this rank. A device this
    machine does not have is a ConfigError naming ``key``, before any process group is joined."""
    info = world_info_from_env()
    placed = resolve_device(device, key, local_rank=info.local_rank, world_size=info.world_size)
    if placed.type == "cuda":
        torch.cuda.set_device(placed)
    if not info.distributed or dist.is_initialized():
        return info, placed
    if info.source == "slurm":
        os.environ.setdefault(
            "MASTER_ADDR", first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        )
        os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        backend=backend or ("nccl" if placed.type == "cuda" else "gloo"),
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return info, placed


@contextlib.contextmanager
def stage_process(
    device: str, precision: str | None, section: str
) -> Iterator[tuple[WorldInfo, torch.device, torch.dtype | None]]:
    """What every training and evaluation stage runs in: the process group of the environment (joined, and left
    at the end or on error), this rank's device and the autocast dtype ``precision`` gives on it. A device or a
    precision this machine lacks is a ConfigError naming ``<section>.device`` / ``<section>.precision``,
    before any work."""
    world, placed = init_distributed(device, f"{section}.device")
    try:
        amp = None if precision is None else resolve_precision(precision, placed, f"{section}.precision")
        yield world, placed, amp
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _group_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def evaluation_share(n: int, what: str) -> range:
    """This rank's contiguous share of ``n`` evaluation items (shares differ in size by at most one); with
    several ranks each logs which items it takes, so a slow or stuck rank can be told apart."""
    world_size = _group_size()
    if world_size == 1:
        return range(n)
    rank = dist.get_rank()
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    share = range(start, start + per + (1 if rank < extra else 0))
    items = f"{share.start}-{share.stop - 1}" if len(share) else "none"
    log.info("rank %d of %d evaluates %s %s of %d", rank, world_size, what, items, n)
    return share


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    world_size = _group_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, when ranks hold different row counts.

    Identity without a process group. Rows are padded to the longest share for the collective and trimmed
    afterwards. A rank with no rows (more ranks than items) may pass any empty tensor: it takes its shape
    and dtype from the ranks that have rows.
    """
    world_size = _group_size()
    if world_size == 1:
        return tensor
    # shapes travel as objects: a rank that computed nothing cannot know the trailing dimensions
    shapes = gather_objects((tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
    counts = [shape[0] for shape, _ in shapes]
    filled = [(shape, dtype) for shape, dtype in shapes if shape[0] > 0]
    if not filled:
        return tensor
    trailing, dtype = filled[0][0][1:], getattr(torch, filled[0][1])
    longest = max(counts)
    padded = torch.zeros((longest, *trailing), dtype=dtype, device=tensor.device)
    if tensor.numel():
        padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], dim=0)
