"""Dataset readers give the same samples from the raw official-format folder and from the shards."""

from __future__ import annotations

import json

import pytest
import torch

from albef.data.datasets import (
    FolderImages,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    image_source,
)
from albef.data.preprocess import PreprocessConfig, preprocess
from albef.data.shards import ShardedImages
from albef.data.synth import SynthConfig, generate
from albef.data.transforms import eval_transform


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cfg = SynthConfig(
        seed=3,
        image_size=64,
        pretrain_images=6,
        retrieval_train_images=4,
        retrieval_val_images=2,
        retrieval_test_images=3,
        vqa_train_images=0,
        vqa_test_images=0,
        ve_images=0,
        nlvr_pairs=0,
        grounding_images=0,
        workers=1,
    )
    generate(cfg, root / "raw", progress=False)
    files = {
        "pretrain.json": "pretrain",
        "retrieval_train.json": "retrieval_train",
        "retrieval_test.json": "retrieval_eval",
    }
    preprocess(
        PreprocessConfig(
            image_root=str(root / "raw"), out_dir=str(root / "out"), files=files, max_side=64, workers=1
        ),
        progress=False,
    )
    return root


def test_folder_and_shards_give_the_same_pictures(data):
    transform = eval_transform(64)
    raw = PretrainDataset(data / "raw" / "pretrain.json", image_source(data / "raw"), transform)
    sharded = PretrainDataset(data / "out" / "pretrain.json", image_source(data / "out"), transform)
    assert isinstance(image_source(data / "out"), ShardedImages)
    assert isinstance(image_source(data / "raw"), FolderImages)
    assert len(raw) == len(sharded) == 12
    (a, cap_a), (b, cap_b) = raw[0], sharded[0]
    assert a.shape == b.shape == (3, 64, 64) and cap_a == cap_b
    assert (a - b).abs().mean() < 0.05  # JPEG re-encoding only


def test_retrieval_ids_and_eval_links(data):
    transform = eval_transform(64)
    train = RetrievalTrainDataset(
        data / "out" / "retrieval_train.json", image_source(data / "out"), transform
    )
    records = json.loads((data / "out" / "retrieval_train.json").read_text())
    assert len(train.img_ids) == 4 and len(train) == len(records)
    _, _, idx0 = train[0]
    same = [i for i, r in enumerate(records) if r["image_id"] == records[0]["image_id"]]
    assert all(train[i][2] == idx0 for i in same)
    test = RetrievalEvalDataset(data / "out" / "retrieval_test.json", image_source(data / "out"), transform)
    assert len(test) == 3 and len(test.texts) == 15
    assert test.img2txt[1] == [5, 6, 7, 8, 9] and test.txt2img[7] == 1
    image, index = test[2]
    assert index == 2 and isinstance(image, torch.Tensor)


def test_folder_images_refuse_paths_outside_the_root(data):
    from albef.data.images import ImageProblem

    with pytest.raises(ImageProblem, match="outside_root"):
        FolderImages(data / "raw").open("../out/manifest.json")
