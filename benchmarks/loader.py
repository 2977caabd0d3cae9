"""Benchmark the pretraining input pipeline alone: samples/s, the cost of per-sample seeding, epoch stalls.

What is measured
    The loader ``albef pretrain`` builds, without a model: :class:`~albef.data.datasets.PretrainDataset`
    over preprocessed shards, the pretraining transform (RandomResizedCrop 0.2-1, HFlip, RandomAugment(2, 7),
    ToTensor, Normalize; :func:`~albef.data.transforms.pretrain_transform`), the stage's ``Collate``
    (tokenizer, 30 tokens), an :class:`~albef.train.sampler.EpochSampler` and a DataLoader, per image size:

    * ``raw``: the dataset without :class:`~albef.train.sampler.SeededSamples`, no seeding at all;
    * ``seeded``: through ``SeededSamples`` (what the Trainer runs);
    * ``seeded-old``: the seeding before issue 13, re-implemented here for comparison (a ``SeedSequence``
      per sample, ``torch.manual_seed``, and a full save/restore of every global generator per sample).

    ``workers 0`` rows load in this process (one worker's throughput). ``seed us`` is the seeding's own
    cost per sample, timed on a dataset that does nothing, in this process or, for rows with workers,
    inside a DataLoader worker (where ``SeededSamples`` restores nothing); ``overhead`` is that cost's share
    of a seeded sample's time in one process (``seed us`` x the in-process samples/s). Comparing samples/s
    of ``raw`` and ``seeded`` directly is blurred by the augmentation draws: unseeded, each pass draws other
    RandomAugment ops, whose costs differ by 10x. Rows with N workers run a DataLoader with N worker
    processes: samples/s over an epoch, counted from its first batch (steady state), and ``stall``, the
    wait for the first batch of epoch 2 after the last batch of epoch 1, with persistent workers (the
    Trainer now) and without (workers started afresh every epoch, as before). With more workers than CPU
    cores the first batch waits for every worker's, so stalls and steady rates there say little.

How it is timed
    ``time.perf_counter`` around whole passes over ``--samples`` samples (in-process) or an epoch (workers).
    In-process variants alternate, ``--repeats`` times each, and the table shows each one's best pass (the
    least disturbed by other work on a shared machine). Torch runs one intra-op thread per process, as in
    DataLoader workers.

Data
    By default a synthetic pretraining set (``--images`` images, 2 captions each) rendered at each image
    size by :mod:`albef.data.synth`, preprocessed into shards with a tokenizer (:mod:`albef.data.stages`)
    in a temporary folder. ``--data-dir`` uses an existing preprocessed folder instead (``pretrain.json``,
    shards, ``tokenizer/``) for every size. Needs only torch, torchvision, transformers, tokenizers,
    Pillow, NumPy and PyYAML.

Run::

    python benchmarks/loader.py                                   # 96 and 256 px, workers 0,2,8
    python benchmarks/loader.py --sizes 256 --workers 0,4 --samples 1024 --json loader.json
    python benchmarks/loader.py --data-dir data/processed --sizes 96
    python benchmarks/loader.py --smoke                           # a few seconds on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from albef.data.datasets import PretrainDataset, image_source
from albef.data.transforms import build_transform
from albef.tokenizer import ALBEFTokenizer
from albef.train.sampler import EpochSampler, SeededSamples
from albef.train.stages import Collate, TrainStageConfig

SEED = 42


class LegacySeededSamples(Dataset):
    """``SeededSamples`` as it was before issue 13: the baseline of the ``seeded-old`` rows."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        state = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2, dtype=np.uint32)
        seed = (int(state[0]) << 31) ^ int(state[1])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            try:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (2**32))
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class IndexOnly(Sampler[int]):
    """An ``EpochSampler``'s order without the epoch, for the unseeded dataset."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return (index for _, index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class Nothing(Dataset):
    """A dataset that does no work: what remains of a seeded load is the seeding."""

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> int:
        return index


_WRAPPERS = {"raw": None, "seeded-old": LegacySeededSamples, "seeded": SeededSamples}


def _as_list(samples: list) -> list:
    return samples


def seeding_us(loader: str, samples: int, batch: int) -> float:
    """Microseconds per sample that ``loader``'s seeding costs, beyond loading ``Nothing`` unseeded, through
    a DataLoader as the Trainer uses it (best of 3). Not timed outside a DataLoader on purpose: the old
    ``torch.manual_seed`` records the stack on CPU-only machines, which costs more the deeper it is."""
    wrapper = _WRAPPERS[loader]
    if wrapper is None:
        return 0.0
    sampler = EpochSampler(samples, batch, seed=SEED)
    sampler.set_epoch(1)
    loaders = [
        _loader(wrapper(Nothing(), SEED), sampler, _as_list, batch, 0, persistent=False),
        _loader(Nothing(), IndexOnly(sampler), _as_list, batch, 0, persistent=False),
    ]
    best = [float("inf"), float("inf")]
    for _ in range(3):
        for i, data in enumerate(loaders):
            started = time.perf_counter()
            for _batch in data:
                pass
            best[i] = min(best[i], time.perf_counter() - started)
    return max(best[0] - best[1], 0.0) / len(sampler) * 1e6


class SeedingInWorker(Dataset):
    """Its one item is :func:`seeding_us`, run inside a DataLoader worker process."""

    def __init__(self, loader: str, samples: int, batch: int):
        self.loader, self.samples, self.batch = loader, samples, batch

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> float:
        return seeding_us(self.loader, self.samples, self.batch)


def seeding_us_in_worker(loader: str, samples: int, batch: int) -> float:
    probe = SeedingInWorker(loader, samples, batch)
    return float(next(iter(DataLoader(probe, batch_size=None, num_workers=1))))


@dataclass
class Row:
    image_size: int
    loader: str  # raw | seeded | seeded-old
    workers: int
    samples: int
    samples_per_s: float
    seed_us: float | None = None  # seeding's own cost per sample (in a worker for rows with workers)
    overhead_pct: float | None = None  # its share of a seeded sample's time in one process
    stall_s: float | None = None  # first batch of epoch 2, persistent workers
    stall_fresh_s: float | None = None  # the same, workers started afresh


def make_data(root: Path, image_size: int, images: int) -> Path:
    """A synthetic pretraining set at ``image_size``, preprocessed into shards with a tokenizer."""
    from albef.data.stages import preprocess_stage, synth_stage

    splits = (
        "retrieval_train",
        "retrieval_val",
        "retrieval_test",
        "vqa_train",
        "vqa_test",
        "ve",
        "grounding",
    )
    synth = {f"{name}_images": 0 for name in splits} | {"nlvr_pairs": 0, "shifted_test_images": 0}
    params = {
        "synth": {
            **synth,
            "out": str(root / "synth"),
            "seed": 1,
            "image_size": image_size,
            "pretrain_images": images,
            "workers": 1,
        },
        "preprocess": {
            "image_root": str(root / "synth"),
            "out_dir": str(root / "processed"),
            "files": {"pretrain.json": "pretrain"},
            "max_side": image_size,
            "min_side": 8,
            "workers": 1,
        },
        "tokenizer": {"vocab_size": 1000, "train_files": ["pretrain.json"]},
    }
    synth_stage(params, progress=False)
    preprocess_stage(params, progress=False)
    return root / "processed"


def build_pipeline(data_dir: Path, image_size: int) -> tuple[PretrainDataset, Collate]:
    """The dataset and collate of the pretraining stage, with the stage's default augmentation settings."""
    stage = TrainStageConfig()
    transform = build_transform(
        "pretrain", image_size, hflip=stage.hflip, augment=stage.augment, scale=stage.crop_scale
    )
    dataset = PretrainDataset(data_dir / stage.train_file, image_source(data_dir), transform)
    tokenizer = ALBEFTokenizer.from_pretrained(data_dir / "tokenizer")
    return dataset, Collate(tokenizer, stage.max_tokens, with_idx=False)


def _loader(
    dataset: Dataset, sampler: Sampler, collate, batch: int, workers: int, persistent: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator(),
        persistent_workers=persistent and workers > 0,
    )


def _variants(dataset: PretrainDataset, sampler: EpochSampler) -> dict[str, tuple[Dataset, Sampler]]:
    return {
        "raw": (dataset, IndexOnly(sampler)),
        "seeded-old": (LegacySeededSamples(dataset, SEED), sampler),
        "seeded": (SeededSamples(dataset, SEED), sampler),
    }


def in_process(
    dataset, collate, image_size: int, samples: int, batch: int, repeats: int, seed_samples: int
) -> list[Row]:
    """Each variant's best pass over ``samples`` samples, loaded in this process (num_workers=0)."""
    sampler = EpochSampler(len(dataset), batch, seed=SEED)
    batches = max(1, min(samples // batch, sampler.batches_per_epoch))
    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, (data, order) in _variants(dataset, sampler).items():
            sampler.set_epoch(1)
            loader = _loader(data, order, collate, batch, 0, persistent=False)
            started = time.perf_counter()
            for i, _batch in enumerate(loader):
                if i + 1 == batches:
                    break
            best[name] = max(best.get(name, 0.0), batches * batch / (time.perf_counter() - started))
    rows = []
    for name, rate in best.items():
        cost = None if name == "raw" else seeding_us(name, seed_samples, batch)
        overhead = None if cost is None else 100 * cost * rate / 1e6
        rows.append(Row(image_size, name, 0, batches * batch, rate, cost, overhead))
    return rows


def _epoch(loader: DataLoader, sampler: EpochSampler, epoch: int) -> tuple[Iterator, float, float, int]:
    """Run one epoch; returns the iterator (still alive), the time to its first batch, the steady-state
    time after it and the number of batches."""
    sampler.set_epoch(epoch)
    started = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    count = 1
    for _ in batches:
        count += 1
    return batches, first - started, time.perf_counter() - first, count


def with_workers(
    dataset,
    collate,
    image_size: int,
    workers: int,
    batch: int,
    loader: str,
    one_process: float,
    seed_samples: int,
) -> Row:
    """Steady-state samples/s over epoch 1, and the epoch-2 stall with and without persistent workers;
    ``one_process`` (the in-process samples/s of ``loader``) turns the seeding cost into a share."""
    sampler = EpochSampler(len(dataset), batch, seed=SEED)
    data, order = _variants(dataset, sampler)[loader]
    persistent = _loader(data, order, collate, batch, workers, persistent=True)
    _, _, steady, count = _epoch(persistent, sampler, 1)
    _, stall, _, _ = _epoch(persistent, sampler, 2)
    del persistent  # stops its workers

    fresh = _loader(data, order, collate, batch, workers, persistent=False)
    batches, _, _, _ = _epoch(fresh, sampler, 1)
    ended = time.perf_counter()
    del batches  # what the Trainer did at an epoch end: stop the workers ...
    sampler.set_epoch(2)
    next(iter(fresh))  # ... and start new ones for the next epoch
    stall_fresh = time.perf_counter() - ended
    rate = (count - 1) * batch / steady if count > 1 else float("nan")
    cost = None if loader == "raw" else seeding_us_in_worker(loader, seed_samples, batch)
    overhead = None if cost is None else 100 * cost * one_process / 1e6
    return Row(image_size, loader, workers, (count - 1) * batch, rate, cost, overhead, stall, stall_fresh)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    header = f"{'size':>5} {'loader':<11} {'workers':>7} {'samples':>7} {'samples/s':>10} {'seed us':>8}"
    header += f" {'overhead':>9}"
    header += f" {'stall 2nd epoch':>16} {'(fresh workers)':>16}"
    print(header)
    print("-" * len(header))
    for r in rows:
        overhead = _fmt(r.overhead_pct, ".1f") + (" %" if r.overhead_pct is not None else "  ")
        stall = _fmt(r.stall_s, ".3f") + (" s" if r.stall_s is not None else "  ")
        fresh = _fmt(r.stall_fresh_s, ".3f") + (" s" if r.stall_fresh_s is not None else "  ")
        print(
            f"{r.image_size:>5} {r.loader:<11} {r.workers:>7} {r.samples:>7} {r.samples_per_s:>10.1f} "
            f"{_fmt(r.seed_us, '.1f'):>8} {overhead:>9} {stall:>16} {fresh:>16}"
        )


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_ints, default=[96, 256], help="image sizes, e.g. 96,256")
    parser.add_argument(
        "--workers", type=_ints, default=[0, 2, 8], help="DataLoader worker counts; 0: in-process"
    )
    parser.add_argument("--samples", type=int, default=512, help="samples per in-process pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed-samples", type=int, default=2048, help="samples for timing the seeding alone")
    parser.add_argument(
        "--repeats", type=int, default=3, help="in-process passes per variant (best is shown)"
    )
    parser.add_argument("--images", type=int, default=256, help="synthetic images (2 records each)")
    parser.add_argument(
        "--data-dir", type=Path, help="a preprocessed folder to use instead of synthetic data"
    )
    parser.add_argument(
        "--loader", default="seeded", help="variant for the worker rows: seeded|raw|seeded-old"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (48 px, workers 0,1) in a few seconds")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.workers, args.samples, args.batch_size = [48], [0, 1], 16, 4
        args.repeats, args.images, args.seed_samples = 1, 8, 128
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"batch {args.batch_size}, best of {args.repeats} in-process passes"
    )
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        for size in args.sizes:
            data_dir = args.data_dir
            if data_dir is None:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="albef-loader-")))
                started = time.perf_counter()
                data_dir = make_data(tmp, size, args.images)
                print(f"{size} px: {args.images} synthetic images in {time.perf_counter() - started:.1f} s")
            dataset, collate = build_pipeline(data_dir, size)
            mine = in_process(
                dataset, collate, size, args.samples, args.batch_size, args.repeats, args.seed_samples
            )
            if 0 in args.workers:
                rows += mine
            one_process = next(r.samples_per_s for r in mine if r.loader == args.loader)
            for workers in (w for w in args.workers if w > 0):
                rows.append(
                    with_workers(
                        dataset,
                        collate,
                        size,
                        workers,
                        args.batch_size,
                        args.loader,
                        one_process,
                        args.seed_samples,
                    )
                )
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
