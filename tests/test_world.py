from __future__ import annotations

import torch

from albef.distributed import init_distributed
from albef.world import WorldInfo, first_slurm_host, world_info_from_env


def test_torchrun_slurm_and_single_process_environments():
    assert world_info_from_env({}) == WorldInfo()
    tr = world_info_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (tr.rank, tr.local_rank, tr.world_size, tr.source, tr.is_main) == (3, 1, 4, "torchrun", False)
    sl = world_info_from_env({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"})
    assert (sl.rank, sl.local_rank, sl.world_size, sl.source) == (5, 1, 8, "slurm")
    assert world_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


def testfirst_slurm_host():
    assert first_slurm_host("node[03-05,07],gpu1") == "node03"
    assert first_slurm_host("gpu1,gpu2") == "gpu1"
    assert first_slurm_host("single") == "single"


def test_a_plain_process_needs_no_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    info, device = init_distributed()
    assert not info.distributed and info.is_main and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
