"""Deterministic, resumable data order: which samples a rank sees, and the randomness each sample gets.

Two things make a resumed run see exactly the data an uninterrupted one would have seen:

* :class:`EpochSampler` draws one permutation per epoch from ``(seed, epoch)`` alone (like
  ``DistributedSampler`` with ``set_epoch``), gives rank ``r`` every ``world``-th sample of it, and can
  start part-way into the epoch. It yields ``(epoch, index)`` pairs.
* :class:`SeededSamples` seeds Python's, NumPy's and PyTorch's (CPU) global generators from
  ``(seed, epoch, index)`` before loading each sample (random crops, RandomAugment, the choice among an
  image's captions). A sample's augmentation therefore depends neither on the DataLoader's worker count,
  nor on which worker loaded it, nor on where a run was resumed. Loaded in the training process itself
  (``num_workers=0``), the generators come out as they went in, so the training loop's own streams do not
  shift.

Seeding is on the loader's hot path (a sample takes 0.6-1 ms at 96 px), so it is kept cheap
(benchmarks/loader.py; ~10 us a sample, down from ~400): the seed is a SplitMix64 hash (~1 us;
``SeedSequence`` took ~16), each generator is seeded directly (``torch.manual_seed`` also seeds every
accelerator, ~190 us on a CPU-only machine, where it records the call stack for later), and the
save/restore of the global states (~100 us, mostly NumPy's) happens once per batch in the training process
and never in a DataLoader worker, where nothing else draws from those generators.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


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
        # (with drop_last, _order already gives this rank whole batches only)
        mine = self._order()[self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing Python's, NumPy's, PyTorch's or CUDA's global generators. For
    validation, once an epoch; per-sample loading uses the cheaper CPU-only :func:`_kept_cpu_generators`."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), _kept_cpu_generators():
        yield


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's output function: a bijection on 64-bit ints whose every output bit depends on every
    input bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch, well mixed, independent of everything else.

    SplitMix64 chained over the three ints: within one ``(seed, epoch)`` distinct indices hash to distinct
    64-bit values (each step is a bijection; the top 63 bits are kept), and neighbouring indices or epochs
    share no visible pattern.
    """
    mixed = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return mixed >> 1


@contextlib.contextmanager
def _kept_cpu_generators() -> Iterator[None]:
    """Restore Python's, NumPy's and PyTorch's CPU generators after the block (a cheaper
    :func:`preserved_rng` without ``fork_rng``'s bookkeeping)."""
    torch_state = torch.default_generator.get_state()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededSamples(Dataset):
    """Wraps a dataset so that ``dataset[(epoch, index)]`` loads sample ``index`` with fixed randomness.

    A DataLoader fetches a whole batch through :meth:`__getitems__`, so the training process saves and
    restores its generators once per batch, not once per sample.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _load(self, key: tuple[int, int]):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        # CPU generators only (module docstring): torch.manual_seed would also reset the GPU dropout stream.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed & 0xFFFF_FFFF)
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        if get_worker_info() is not None:
            # A DataLoader worker: its generators serve this dataset alone, so there is nothing to restore.
            return [self._load(key) for key in keys]
        # The training process: its own streams (dropout, masking, hard negatives) must not shift.
        with _kept_cpu_generators():
            return [self._load(key) for key in keys]
