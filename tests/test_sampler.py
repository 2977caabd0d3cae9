"""Deterministic, resumable data order and per-sample randomness."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from albef.train.sampler import EpochSampler, SeededSamples, sample_seed


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
    """Draws from every global generator, normals too: a cached second normal (Python's ``gauss``, NumPy's
    legacy ``standard_normal``) left by one sample must not leak into the next one in the same worker."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        py = (random.random(), random.gauss(0, 1))
        npy = (float(np.random.rand()), float(np.random.standard_normal()))
        return torch.cat([torch.rand(2), torch.randn(3)]), py, npy, index


def _global_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _assert_same_states(before, after) -> None:
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert (before[2][1] == after[2][1]).all() and before[2][2:] == after[2][2:]  # key, pos, gauss cache


def test_each_sample_gets_the_same_randomness_whatever_the_workers_or_order():
    data = SeededSamples(Noisy(), seed=7)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached normal in each: it must survive too
    before = _global_states()
    direct = {i: data[(4, i)] for i in range(10)}
    _assert_same_states(before, _global_states())
    sampler = EpochSampler(10, batch_size=2, seed=0)
    sampler.set_epoch(4)
    for workers in (0, 1, 2):  # one worker loads every sample in turn, without restoring in between
        loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers)
        for tensors, py, npy, idx in loader:
            for row, i in enumerate(idx.tolist()):
                assert torch.equal(tensors[row], direct[i][0])
                assert [v[row].item() for v in py] == pytest.approx(direct[i][1], rel=1e-12)
                assert [v[row].item() for v in npy] == pytest.approx(direct[i][2], rel=1e-12)
    assert not torch.equal(data[(5, 0)][0], direct[0][0])  # another epoch, other draws


def test_loading_in_the_training_process_leaves_its_generators_alone():
    """num_workers=0: the DataLoader fetches whole batches (``__getitems__``) in this process, whose own
    streams (dropout, masking) must continue as if no sample had been loaded."""
    data = SeededSamples(Noisy(), seed=7)
    sampler = EpochSampler(10, batch_size=4, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=0, generator=torch.Generator())
    random.gauss(0, 1), np.random.standard_normal()
    before = _global_states()
    batches = list(loader)
    _assert_same_states(before, _global_states())
    assert len(batches) == 2 and not torch.equal(batches[0][0][0], batches[0][0][1])  # samples do differ


def test_sample_seeds_are_distinct_and_spread():
    seeds = {sample_seed(42, epoch, index) for epoch in range(3) for index in range(20_000)}
    assert len(seeds) == 60_000
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(42, 0, 1) != sample_seed(43, 0, 1) != sample_seed(42, 1, 1)
    # every bit is used: about half the seeds have any given bit set (low bits feed NumPy's 32-bit seed)
    for bit in (0, 1, 31, 32, 62):
        share = sum(s >> bit & 1 for s in seeds) / len(seeds)
        assert 0.48 < share < 0.52, bit
