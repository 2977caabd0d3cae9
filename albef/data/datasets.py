"""PyTorch datasets over official-format annotations, reading images from a folder or from albef's shards.

The same dataset classes serve raw official data (``FolderImages``: relative paths under an image root, as
the official configs use) and preprocessed data (``ShardedImages``), so the pipeline runs unchanged on
COCO/Flickr30K files and on the synthetic benchmark.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from PIL import Image
from torch.utils.data import Dataset

from albef.data.formats import load_annotations
from albef.data.images import open_rgb, resolve_inside
from albef.data.shards import ShardedImages
from albef.data.text import pre_caption


class ImageSource(Protocol):
    def open(self, key: str) -> Image.Image: ...


class FolderImages:
    """Images as files under ``root`` (never outside it)."""

    def __init__(self, root: str | Path, min_side: int = 1):
        self.root = Path(root)
        self.min_side = min_side
        if not self.root.is_dir():
            raise FileNotFoundError(f"image root not found: {self.root}")

    def open(self, key: str) -> Image.Image:
        return open_rgb(resolve_inside(self.root, key), min_side=self.min_side)


def image_source(path: str | Path) -> ImageSource:
    """Shards when ``path`` holds a preprocessing manifest, else a folder of image files."""
    path = Path(path)
    return ShardedImages(path) if (path / "manifest.json").is_file() else FolderImages(path)


Transform = Callable[[Image.Image], object]


class AnnotationDataset(Dataset):
    """The records of an annotation file of the format ``schema`` (albef.data.formats), with the images they
    name, the transform of those and the words a text keeps."""

    schema: str

    def __init__(self, ann_file: str | Path, images: ImageSource, transform: Transform, max_words: int = 30):
        self.records = load_annotations(ann_file, self.schema)
        self.images, self.transform, self.max_words = images, transform, max_words

    def __len__(self) -> int:
        return len(self.records)


class PretrainDataset(AnnotationDataset):
    """(image, caption) pairs; a record with a list of captions yields one of them at random per access."""

    schema = "pretrain"

    def __getitem__(self, index: int):
        record = self.records[index]
        caption = record["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption)
        return self.transform(self.images.open(record["image"])), pre_caption(caption, self.max_words)


class RetrievalTrainDataset(AnnotationDataset):
    """(image, caption, idx): ``idx`` numbers the ``image_id`` values in order of first appearance, so every
    caption of one image shares an id (the ITC positives and the hard-negative mask use it)."""

    schema, text_key = "retrieval_train", "caption"

    def __init__(self, ann_file: str | Path, images: ImageSource, transform: Transform, max_words: int = 30):
        super().__init__(ann_file, images, transform, max_words)
        self.img_ids: dict[object, int] = {}
        for record in self.records:
            self.img_ids.setdefault(self.image_key(record), len(self.img_ids))

    @staticmethod
    def image_key(record: dict) -> object:
        return record["image_id"]

    def __getitem__(self, index: int):
        record = self.records[index]
        image = self.transform(self.images.open(record["image"]))
        return image, pre_caption(record[self.text_key], self.max_words), self.img_ids[self.image_key(record)]


class GroundingTrainDataset(RetrievalTrainDataset):
    """Weakly supervised grounding finetuning (the official ``grounding_dataset(mode='train')``): (image,
    referring expression, idx) with no box; ``idx`` numbers the image file names, so every expression of one
    image is a positive of the others (RefCOCO+ train records carry no image id)."""

    schema, text_key = "grounding_train", "text"

    @staticmethod
    def image_key(record: dict) -> object:
        return Path(record["image"]).name


class RetrievalEvalDataset(AnnotationDataset):
    """Images of an evaluation split; ``texts`` lists every caption, with ``img2txt``/``txt2img`` links."""

    schema = "retrieval_eval"

    def __init__(self, ann_file: str | Path, images: ImageSource, transform: Transform, max_words: int = 30):
        super().__init__(ann_file, images, transform, max_words)
        self.texts: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_index, record in enumerate(self.records):
            self.img2txt[img_index] = []
            for caption in record["caption"]:
                self.img2txt[img_index].append(len(self.texts))
                self.txt2img[len(self.texts)] = img_index
                self.texts.append(pre_caption(caption, max_words))

    def __getitem__(self, index: int):
        return self.transform(self.images.open(self.records[index]["image"])), index
