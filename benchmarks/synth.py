"""Benchmark :func:`albef.data.synth.generate`: wall-clock time for a whole synthetic dataset.

What is measured
    One call of ``generate`` per row, end to end: scene sampling, rendering, JPEG encoding and writing of
    every image, all texts, every annotation file, ``scenes.json``, the data card and ``samples.png``.
    The split sizes are the defaults of :class:`SynthConfig` scaled so that the dataset has ``--images``
    images in total (an NLVR2 pair counts as two images); the table shows the exact count generated.

How it is timed
    ``time.perf_counter`` around ``generate`` (progress bar off), into a fresh temporary directory per
    row (deleted afterwards unless ``--keep``). Worker processes are started inside the timed region, so
    their start-up cost is included. Each row runs ``--repeats`` times; the table shows the fastest run
    (the least disturbed by other work on a shared machine) and the median.

Run::

    python benchmarks/synth.py                          # 10,000 images at 96 px, 2 workers
    python benchmarks/synth.py --images 2000 --workers 1,2 --size 64,96 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from albef.data.synth import SynthConfig, generate

_SCALED = (
    "pretrain_images",
    "retrieval_train_images",
    "retrieval_val_images",
    "retrieval_test_images",
    "vqa_train_images",
    "vqa_test_images",
    "ve_images",
    "nlvr_pairs",
    "grounding_images",
)


def scaled_config(images: int, image_size: int, workers: int, seed: int = 0) -> SynthConfig:
    """The default split proportions, scaled to about ``images`` images in total."""
    base = SynthConfig()
    factor = images / base.total_images()
    sizes = {name: round(getattr(base, name) * factor) for name in _SCALED}
    sizes["grounding_images"] = max(sizes["grounding_images"], 14)  # val, testA and testB non-empty
    cfg = SynthConfig(seed=seed, image_size=image_size, workers=workers, **sizes)
    cfg.pretrain_images += images - cfg.total_images()  # exact total
    return dataclasses.replace(cfg)  # re-validate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=10_000, help="images per dataset (default 10000)")
    parser.add_argument("--size", default="96", help="comma-separated image sizes in pixels (default 96)")
    parser.add_argument("--workers", default="2", help="comma-separated worker counts (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="parent directory for outputs (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets")
    args = parser.parse_args()

    print(
        f"# synth generate: python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    )
    header = f"| {'images':>7} | {'size':>4} | {'workers':>7} | {'best s':>7} | {'median s':>8} | {'images/s':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    parent = args.out or Path(tempfile.mkdtemp(prefix="synth_bench_"))
    parent.mkdir(parents=True, exist_ok=True)
    try:
        for size in (int(s) for s in args.size.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                cfg = scaled_config(args.images, size, workers, args.seed)
                times = []
                for rep in range(args.repeats):
                    out = parent / f"synth_{size}px_{workers}w_{rep}"
                    t0 = time.perf_counter()
                    card = generate(cfg, out, progress=False)
                    times.append(time.perf_counter() - t0)
                    if not args.keep:
                        shutil.rmtree(out)
                best = min(times)
                n = card["images_total"]
                print(
                    f"| {n:>7} | {size:>4} | {workers:>7} | {best:>7.2f} | {statistics.median(times):>8.2f} "
                    f"| {n / best:>8.0f} |",
                    flush=True,
                )
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
