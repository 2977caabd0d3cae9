"""The queue holds momentum features gathered from every rank (two real gloo processes on loopback)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from albef.config import tiny_config
from albef.models import ALBEFRetrieval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same weights on both ranks, as DDP guarantees
        model = ALBEFRetrieval(tiny_config())
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        images = torch.randn(4, 3, 32, 32, generator=g)
        ids = torch.randint(5, 100, (4, 8), generator=g)
        ids[:, 0] = 1
        out = model(images, ids, torch.ones_like(ids), torch.arange(4) + 10 * rank)
        torch.save(
            {
                "feat": out.image_feat_m,
                "queue": model.image_queue.clone(),
                "idx": model.idx_queue.clone(),
                "ptr": int(model.queue_ptr),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_queue_holds_every_ranks_features(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    gathered = torch.cat([r0["feat"], r1["feat"]])  # (8, D): rank 0's batch, then rank 1's
    for r in (r0, r1):
        torch.testing.assert_close(r["queue"][:, :8], gathered.T)
        assert r["idx"][0, :8].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
        assert r["ptr"] == 8


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from albef.distributed import gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = {0: 2, 1: 0, 2: 1}[rank]
        # a rank with nothing to evaluate passes a bare empty tensor, as the evaluation loops do
        mine = torch.full((rows, 3, 4), float(rank), dtype=torch.float64) if rows else torch.empty(0)
        nothing = gather_rows(torch.empty(0))
        torch.save({"rows": gather_rows(mine), "nothing": nothing}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathering_rows_when_a_rank_has_none(tmp_path):
    """More ranks than items: the empty rank takes its shape and dtype from the others, nothing hangs."""
    mp.spawn(_gather_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    expected = torch.cat(
        [torch.zeros(2, 3, 4, dtype=torch.float64), torch.full((1, 3, 4), 2.0, dtype=torch.float64)]
    )
    for rank in range(3):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["rows"], expected) and got["rows"].dtype == torch.float64
        assert got["nothing"].numel() == 0
