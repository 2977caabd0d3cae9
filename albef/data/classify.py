"""SNLI-VE and NLVR2 data: the official annotation files as datasets, and their batching.

SNLI-VE (``ve_*.json``): ``{"image": id without extension, "sentence", "label"}``; the image is ``id.jpg``
(the official ``ve_dataset`` appends it) and the label one of contradiction 0 / neutral 1 / entailment 2.
NLVR2 (``nlvr_*.json``): ``{"images": [left, right], "sentence", "label": "True" | "False"}`` -> 1 / 0.

Missing images are looked up when the dataset is built, not in the middle of an epoch. The policy is
``missing_images``: ``"error"`` (default) stops with the file, the record's index and the image path;
``"skip"`` leaves such records out, counts them (:attr:`ClassificationDataset.skipped`) and names the first
few in a warning. Preprocessing already drops records whose images cannot be read, so on preprocessed data a
missing image means the annotations and the shards disagree, which is why an error is the default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from albef.data.datasets import FolderImages, ImageSource, Transform
from albef.data.formats import AnnotationError, image_path_note, image_paths, load_annotations
from albef.data.images import ImageProblem, resolve_inside
from albef.data.text import pre_caption
from albef.models.nlvr import NLVR_LABELS
from albef.models.ve import VE_LABELS

log = logging.getLogger(__name__)

#: label names by class id, per task
LABEL_NAMES: dict[str, list[str]] = {
    "ve": sorted(VE_LABELS, key=VE_LABELS.__getitem__),
    "nlvr": sorted(NLVR_LABELS, key=NLVR_LABELS.__getitem__),
}
_LABEL_IDS = {"ve": VE_LABELS, "nlvr": NLVR_LABELS}
MISSING_IMAGE_POLICIES = ("error", "skip")


class MissingImageError(FileNotFoundError):
    """An annotation record names an image that is not in the image source."""


def has_image(images: ImageSource, key: str) -> bool:
    """Whether ``images`` holds ``key`` (shards: the manifest; a folder: the file; anything else: assumed)."""
    if isinstance(images, FolderImages):
        try:
            return resolve_inside(images.root, key).is_file()
        except ImageProblem:  # outside the root: not there
            return False
    if hasattr(images, "__contains__"):
        return key in images  # type: ignore[operator]
    return True


class ClassificationDataset(Dataset):
    """(image(s), sentence, label id, record index) per record of a VE or NLVR2 annotation file.

    ``__getitem__`` returns one transformed image for VE and a ``(left, right)`` pair for NLVR2.
    """

    def __init__(
        self,
        ann_file: str | Path,
        task: str,
        images: ImageSource,
        transform: Transform,
        max_words: int = 30,
        missing_images: str = "error",
    ):
        if task not in _LABEL_IDS:
            raise ValueError(f"unknown classification task {task!r}; choose ve or nlvr")
        if missing_images not in MISSING_IMAGE_POLICIES:
            raise ValueError(
                f"missing_images must be one of {MISSING_IMAGE_POLICIES}, got {missing_images!r}"
            )
        self.task, self.images, self.transform, self.max_words = task, images, transform, max_words
        self.ann_file = Path(ann_file)
        records = load_annotations(ann_file, task)
        self.records: list[dict[str, Any]] = []
        self.indices: list[int] = []  # index of each kept record in the annotation file
        self.keys: list[list[str]] = []
        self.skipped: list[dict[str, Any]] = []  # {"index", "image"} of records left out
        for index, record in enumerate(records):
            keys = [os.path.normpath(k) for k in image_paths(record, task)]
            absent = next((k for k in keys if not has_image(images, k)), None)
            if absent is not None:
                if missing_images == "error":
                    note = image_path_note(record, task)
                    raise MissingImageError(
                        f"{self.ann_file}: record {index} ({record['sentence']!r}) needs image {absent!r}, "
                        f"which is not in the image source{f' ({note})' if note else ''} "
                        f"(set missing_images: skip to leave such records out)"
                    )
                self.skipped.append({"index": index, "image": absent})
                continue
            self.records.append(record)
            self.indices.append(index)
            self.keys.append(keys)
        if self.skipped:
            log.warning(
                "%s: %d of %d records skipped for missing images (first: %s)",
                self.ann_file,
                len(self.skipped),
                len(records),
                ", ".join(f"record {s['index']}: {s['image']}" for s in self.skipped[:3]),
            )
        if not self.records:
            raise AnnotationError(f"{self.ann_file}: no usable records")
        self.labels = [_LABEL_IDS[task][r["label"]] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def sentence(self, index: int) -> str:
        return pre_caption(self.records[index]["sentence"], self.max_words)

    def __getitem__(self, index: int):
        pixels = [self.transform(self.images.open(k)) for k in self.keys[index]]
        image = pixels[0] if self.task == "ve" else tuple(pixels)
        return image, self.sentence(index), self.labels[index], index


class ClassificationCollate:
    """Stack images (NLVR2: all left images, then all right images, as the official ``cat([image0,
    image1])``), tokenize the sentences (``max_tokens`` at most) and stack the label ids."""

    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, samples: list[tuple]) -> dict[str, torch.Tensor]:
        if isinstance(samples[0][0], tuple):  # NLVR2: (left, right)
            images = torch.cat([torch.stack([s[0][side] for s in samples]) for side in (0, 1)])
        else:
            images = torch.stack([s[0] for s in samples])
        tokens = self.tokenizer([s[1] for s in samples], max_length=self.max_tokens)
        return {
            "images": images,
            "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask,
            "targets": torch.tensor([s[2] for s in samples], dtype=torch.long),
            "index": torch.tensor([s[3] for s in samples], dtype=torch.long),
        }
