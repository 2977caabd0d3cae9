"""Deterministic, resumable data order: which samples a rank sees, and the randomness each sample gets.

Two things make a resumed run see exactly the data an uninterrupted one would have seen:

* :class:`EpochSampler` draws one permutation per epoch from ``(seed, epoch)`` alone (like
  ``DistributedSampler`` with ``set_epoch``), gives rank ``r`` every ``world``-th sample of it, and can
  start part-way into the epoch. It yields ``(epoch, index)`` pairs.
* :class:`SeededSamples` seeds Python's, NumPy's and PyTorch's global generators from
  ``(seed, epoch, index)`` before loading each sample (random crops, RandomAugment, the choice among an
  image's captions) and restores them afterwards. A sample's augmentation therefore depends neither on the
  DataLoader's worker count, nor on which worker loaded it, nor on where a run was resumed.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """A rank's share of a per-epoch permutation, in whole batches, optionally resumed mid-epoch.

    With ``drop_last`` (training) every rank gets ``len(dataset) // (world * batch_size)`` full batches, the
    same count on every rank; without it (evaluation) the tail is padded by wrapping around, as
    ``DistributedSampler`` does.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.start_batch = 0, 0
        if drop_last and self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes = {batch_size * world_size})"
            )

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return (self.num_samples // self.world_size) // self.batch_size
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Serve ``epoch``'s order, skipping the first ``start_batch`` batches (a resumed run)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            used = self.batches_per_epoch * self.batch_size * self.world_size
            order = order[:used]
        else:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self._order()[self.start_batch * self.batch_size :]
        if self.drop_last:
            mine = mine[: (len(mine) // self.batch_size) * self.batch_size]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


@contextlib.contextmanager
def preserved_rng(cuda: bool = False) -> Iterator[None]:
    """Run a block without disturbing Python's, NumPy's or PyTorch's global generators (and CUDA's when
    ``cuda``; left out in per-sample loading, where forking every device's state would cost time)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if cuda and torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, well mixed (SeedSequence), independent of everything else."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(epoch, index)]`` loads sample ``index`` with fixed randomness."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        # the loader may run in the training process: its generators must come out as they went in
        with preserved_rng():
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % (2**32))
            return self.dataset[index]
