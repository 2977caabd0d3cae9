"""Deterministic, resumable data order and per-sample randomness."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from albef.train.sampler import EpochSampler, SeededSamples


def test_ranks_share_an_epoch_without_overlap_and_epochs_differ():
    shares = []
    for rank in range(3):
        s = EpochSampler(50, batch_size=4, rank=rank, world_size=3, seed=1)
        s.set_epoch(2)
        shares.append([i for _, i in s])
    assert all(len(x) == 16 for x in shares)  # 50 // 3 = 16 per rank -> 4 batches of 4
    flat = [i for x in shares for i in x]
    assert len(set(flat)) == len(flat)
    s = EpochSampler(50, batch_size=4, seed=1)
    s.set_epoch(0)
    first = [i for _, i in s]
    s.set_epoch(1)
    assert [i for _, i in s] != first
    s.set_epoch(0)
    assert [i for _, i in s] == first


def test_resuming_part_way_serves_the_rest_of_the_epoch():
    s = EpochSampler(40, batch_size=4, seed=3)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start_batch=3)
    assert list(s) == full[12:] and len(s) == len(full) - 12
    with pytest.raises(ValueError, match="outside"):
        s.set_epoch(5, start_batch=11)


def test_fewer_samples_than_one_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch .*4 per process x 2 processes"):
        EpochSampler(7, batch_size=4, world_size=2)


class Noisy(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        return torch.rand(2), random.random(), float(np.random.rand()), index


def test_each_sample_gets_the_same_randomness_whatever_the_workers_or_order():
    data = SeededSamples(Noisy(), seed=7)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    direct = {i: data[(4, i)] for i in range(10)}
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    sampler = EpochSampler(10, batch_size=2, seed=0)
    sampler.set_epoch(4)
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers)
        for tensors, py, npy, idx in loader:
            for row, i in enumerate(idx.tolist()):
                assert torch.equal(tensors[row], direct[i][0])
                assert py[row].item() == pytest.approx(direct[i][1]) and npy[row].item() == direct[i][2]
    assert not torch.equal(data[(5, 0)][0], direct[0][0])  # another epoch, other draws
