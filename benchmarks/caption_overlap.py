"""How often a caption of the synthetic benchmark is word for word a caption of another image too.

A caption shared by k images of a split caps text-to-image R@1 for it at 1/k, and in training it makes the
in-batch "negatives" of ITC and ITM true matches. This counts it per retrieval-format file (pretraining,
retrieval train/val/test, the shifted test set) of a data folder:

    python benchmarks/caption_overlap.py data/synth           # after `dvc repro synth`
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

FILES = (
    "pretrain.json",
    "retrieval_train.json",
    "retrieval_val.json",
    "retrieval_test.json",
    "shifted_test.json",
)


def overlap(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts for one file of ``{"image", "caption"}`` records (a caption may be a list)."""
    images_of: dict[str, set[str]] = defaultdict(set)
    pairs: list[tuple[str, str]] = []
    for record in records:
        captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
        for caption in captions:
            images_of[caption].add(record["image"])
            pairs.append((caption, record["image"]))
    shared = sum(1 for caption, _ in pairs if len(images_of[caption]) > 1)
    widest = sorted(images_of.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:5]
    return {
        "images": len({image for _, image in pairs}),
        "captions": len(pairs),
        "distinct": len(images_of),
        "shared": shared,
        "shared_percent": round(100 * shared / max(len(pairs), 1), 1),
        "most_shared": [[caption, len(images)] for caption, images in widest],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="a folder with the synthetic benchmark's JSON files (data/synth)")
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args(argv)
    found = {
        name: overlap(json.loads((Path(args.data) / name).read_text()))
        for name in FILES
        if (Path(args.data) / name).is_file()
    }
    if not found:
        parser.error(f"none of {', '.join(FILES)} in {args.data}")
    print(f"{'file':<22} {'images':>7} {'captions':>9} {'shared word for word':>22}  most shared")
    for name, row in found.items():
        top = ", ".join(f"'{c}' x{n}" for c, n in row["most_shared"][:2])
        print(
            f"{name:<22} {row['images']:>7} {row['captions']:>9} {row['shared']:>12} ({row['shared_percent']:>5} %)  {top}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
