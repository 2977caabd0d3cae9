"""Which process of which job this is, read from the environment torchrun or SLURM sets (torch-free: the
tracking code asks whether it runs on rank 0 without loading torch; :mod:`albef.distributed` joins the process
group)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    source: str = "single"  # torchrun | slurm | single

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """``node[03-05,07],gpu1`` -> ``node03``: the first host of a SLURM node list."""
    prefix, ranges = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist).groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def world_info_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return WorldInfo(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm"
        )
    return WorldInfo()
