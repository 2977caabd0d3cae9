"""Preprocessing throughput: ``albef preprocess`` (validation, RGB, resize, JPEG, shards; N processes)
against a single-process Pillow baseline that only decodes and resizes the same images.

    python benchmarks/preprocess.py --images 4000 --image-size 256 --max-side 96 --workers 2

It writes a synthetic dataset of JPEGs first (not timed), then times both paths on it and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from albef.data.images import resize_longest
from albef.data.preprocess import PreprocessConfig, preprocess


def make_dataset(root: Path, n: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    records = []
    for i in range(n):
        pixels = np.roll(base, i % size, axis=1) // 2 + rng.integers(0, 127, (1, 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:06d}.jpg", quality=90)
        records.append({"image": f"img/{i:06d}.jpg", "caption": f"picture number {i}"})
    (root / "pretrain.json").write_text(json.dumps(records))


def baseline(root: Path, max_side: int) -> int:
    """One process: decode, convert to RGB, resize. No validation, no encoding, no shards."""
    count = 0
    for path in sorted((root / "img").iterdir()):
        with Image.open(path) as image:
            resize_longest(image.convert("RGB"), max_side)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=256, help="side of the source JPEGs")
    parser.add_argument("--max-side", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="albef-bench-"))
    try:
        make_dataset(tmp / "raw", args.images, args.image_size)
        baseline(tmp / "raw", args.max_side)  # warm the page cache for both contenders
        start = time.perf_counter()
        n = baseline(tmp / "raw", args.max_side)
        t_base = time.perf_counter() - start

        cfg = PreprocessConfig(
            image_root=str(tmp / "raw"),
            out_dir=str(tmp / "out"),
            files={"pretrain.json": "pretrain"},
            max_side=args.max_side,
            min_side=8,
            workers=args.workers,
            shard_size=1000,
        )
        start = time.perf_counter()
        report = preprocess(cfg, progress=False)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        again = preprocess(cfg, progress=False)
        t_rerun = time.perf_counter() - start
        assert report.images_kept == n and again.up_to_date
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.images} JPEGs "
        f"{args.image_size}x{args.image_size} -> longest side {args.max_side}"
    )
    print(f"{'path':<46} {'seconds':>8} {'images/s':>9}")
    print(f"{'Pillow decode+resize, 1 process (baseline)':<46} {t_base:8.2f} {n / t_base:9.0f}")
    label = f"albef preprocess, {args.workers} processes (+validate, shards)"
    print(f"{label:<46} {t_ours:8.2f} {n / t_ours:9.0f}")
    print(f"{'albef preprocess rerun, unchanged input':<46} {t_rerun:8.2f} {'':>9}")
    print(f"speed-up over the baseline: {t_base / t_ours:.2f}x")


if __name__ == "__main__":
    main()
