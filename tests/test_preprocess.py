"""Preprocessing on a small official-format dataset full of broken inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from albef.data.formats import AnnotationError, load_annotations, record_problem
from albef.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from albef.data.shards import ShardedImages
from albef.data.text import pre_caption, pre_question


def _img(path: Path, mode: str = "RGB", size=(40, 30), **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"RGB": (200, 10, 10), "L": 128, "P": 3, "CMYK": (0, 255, 0, 0), "RGBA": (0, 0, 255, 128)}[mode]
    Image.new(mode, size, color).save(path, **save)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    _img(root / "img/good.jpg")
    _img(root / "img/grey.png", "L")
    _img(root / "img/palette.png", "P")
    _img(root / "img/cmyk.jpg", "CMYK")
    _img(root / "img/alpha.png", "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: stored 40x30, shown 30x40
    _img(root / "img/rotated.jpg", exif=exif)
    _img(root / "img/tiny.png", size=(4, 4))
    (root / "img/empty.jpg").write_bytes(b"")
    (root / "img/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _img(root / "img/full.png")
    data = (root / "img/full.png").read_bytes()
    (root / "img/truncated.png").write_bytes(data[: len(data) // 2])
    outside = tmp_path / "secret.jpg"
    _img(outside)
    os.symlink(outside, root / "img/link_out.jpg")
    captions = [
        {"image": "img/good.jpg", "caption": "A red square."},
        {"image": "img/grey.png", "caption": "a grey picture"},
        {"image": "img/palette.png", "caption": "a palette picture"},
        {"image": "img/cmyk.jpg", "caption": "a cmyk picture"},
        {"image": "img/alpha.png", "caption": ["a picture with alpha", "see-through"]},
        {"image": "img/rotated.jpg", "caption": "turned " + "word " * 40},
        {"image": "img/tiny.png", "caption": "too small"},
        {"image": "img/empty.jpg", "caption": "zero bytes"},
        {"image": "img/corrupt.jpg", "caption": "corrupt"},
        {"image": "img/truncated.png", "caption": "truncated"},
        {"image": "img/missing.jpg", "caption": "missing"},
        {"image": "../secret.jpg", "caption": "escapes the root"},
        {"image": "img/link_out.jpg", "caption": "symlink out"},
        {"image": "img/good.jpg", "caption": " ?!. "},
        {"image": "img/good.jpg"},
        {"image": 7, "caption": "wrong type"},
        {"image": "img/good.jpg", "caption": "A red square."},
    ]
    (root / "pretrain.json").write_text(json.dumps(captions))
    nlvr = [
        {"images": ["img/good.jpg", "img/grey.png"], "sentence": "two images", "label": "True"},
        {"images": ["img/good.jpg"], "sentence": "one image", "label": "False"},
    ]
    (root / "nlvr.json").write_text(json.dumps(nlvr))
    return root


def _cfg(root: Path, tmp: Path, **kw) -> PreprocessConfig:
    base = dict(
        image_root=str(root),
        out_dir=str(tmp / "out"),
        files={"pretrain.json": "pretrain", "nlvr.json": "nlvr"},
        max_side=32,
        min_side=8,
        shard_size=4,
        workers=2,
        max_drop_fraction=1.0,
    )
    base.update(kw)
    return PreprocessConfig(**base)


def test_every_bad_input_gets_a_named_reason(dataset: Path, tmp_path: Path):
    report = preprocess(_cfg(dataset, tmp_path), progress=False)
    reasons = {(d.file, d.index): d.reason for d in report.dropped}
    assert reasons == {
        ("pretrain.json", 6): "too_small",
        ("pretrain.json", 7): "empty_file",
        ("pretrain.json", 8): "corrupt_image",
        ("pretrain.json", 9): "corrupt_image",
        ("pretrain.json", 10): "missing_file",
        ("pretrain.json", 11): "outside_root",
        ("pretrain.json", 12): "outside_root",
        ("pretrain.json", 13): "empty_text",
        ("pretrain.json", 14): "bad_schema",
        ("pretrain.json", 15): "bad_schema",
        ("pretrain.json", 16): "duplicate",
        ("nlvr.json", 1): "nlvr_needs_two_images",
    }
    assert report.records_kept == 7 and report.notes["text_truncated"] == 1
    out = tmp_path / "out"
    kept = json.loads((out / "pretrain.json").read_text())
    assert kept[0]["caption"] == "a red square"
    assert kept[4]["caption"] == ["a picture with alpha", "see through"]
    assert len(kept[5]["caption"].split()) == 30
    stored = json.loads((out / "report.json").read_text())
    assert stored["dropped_by_reason"]["corrupt_image"] == 2
    assert "img/truncated.png" in (out / "report.md").read_text()


def test_images_are_rgb_upright_resized_and_readable_from_shards(dataset: Path, tmp_path: Path):
    preprocess(_cfg(dataset, tmp_path), progress=False)
    images = ShardedImages(tmp_path / "out")
    assert len(images) == 6
    for key in ("img/good.jpg", "img/grey.png", "img/palette.png", "img/cmyk.jpg", "img/alpha.png"):
        image = images.open(key)
        assert image.mode == "RGB" and image.size == (32, 24)
    assert images.open("img/rotated.jpg").size == (24, 32)  # EXIF orientation applied
    r, g, b = images.open("img/good.jpg").getpixel((10, 10))
    assert r > 150 and g < 60 and b < 60
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["files"]["pretrain.json"]["records"] == 6
    assert sum(s["count"] for s in manifest["shards"]) == 6 and len(manifest["shards"]) == 3
    with pytest.raises(KeyError, match="img/corrupt.jpg"):
        images.open("img/corrupt.jpg")


def test_rerun_does_nothing_and_an_interrupted_run_continues(dataset: Path, tmp_path: Path):
    cfg = _cfg(dataset, tmp_path)
    preprocess(cfg, progress=False)
    out = tmp_path / "out"
    shard_times = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.tar")}
    assert preprocess(cfg, progress=False).up_to_date
    # simulate a crash after the first shard: manifest and later shards gone
    (out / "manifest.json").unlink()
    for p in sorted((out / "images").glob("*.tar"))[1:]:
        p.unlink()
    report = preprocess(cfg, progress=False)
    assert not report.up_to_date and report.images_kept == 6
    first = sorted(shard_times)[0]
    assert (out / "images" / first).stat().st_mtime_ns == shard_times[first]  # finished shard reused


def test_too_many_drops_fail_naming_the_reasons(dataset: Path, tmp_path: Path):
    with pytest.raises(PreprocessError, match=r"dropped 12 of 19 records .* reasons: .*corrupt_image: 2"):
        preprocess(_cfg(dataset, tmp_path, max_drop_fraction=0.1), progress=False)
    assert (tmp_path / "out" / "report.md").exists() and not (tmp_path / "out" / "manifest.json").exists()


def test_bad_annotation_files_are_clear_errors(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not utf8")
    with pytest.raises(AnnotationError, match="not UTF-8"):
        load_annotations(bad, "pretrain")
    bad.write_text('[{"image": "a.jpg", "caption": "x"},')
    with pytest.raises(AnnotationError, match="malformed JSON at line 1"):
        load_annotations(bad, "pretrain")
    bad.write_text('{"image": "a.jpg"}')
    with pytest.raises(AnnotationError, match="expected a JSON list of records, got a dict"):
        load_annotations(bad, "pretrain")
    bad.write_text('[{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]')
    with pytest.raises(AnnotationError, match="record 1: missing key 'caption'"):
        load_annotations(bad, "pretrain")
    with pytest.raises(AnnotationError, match="unknown task"):
        load_annotations(bad, "captioning")


@pytest.mark.parametrize(
    ("record", "task", "problem"),
    [
        ({"images": ["a", "b"], "sentence": "s", "label": True}, "nlvr", "key 'label' must be str"),
        ({"images": ["a", "b"], "sentence": "s", "label": "yes"}, "nlvr", "must be one of"),
        ({"image": "a", "caption": "one caption"}, "retrieval_eval", "key 'caption' must be list"),
        ({"image": "a", "sentence": "s", "label": "maybe"}, "ve", "must be one of"),
        ({"question_id": "1", "image": "a", "question": "q"}, "vqa", "key 'question_id' must be int"),
        ({"image": "a", "text": "t"}, "grounding_eval", "missing key 'ref_id'"),
    ],
)
def test_schema_problems_name_the_key(record, task, problem):
    assert problem in record_problem(record, task)


def test_official_text_cleaning():
    assert (
        pre_caption("  A man's dog--runs (fast)!!  on <person>/grass.\n", 30)
        == "a mans dog runs fast on person grass"
    )
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_question("What colour is the cat-toy? ", 30) == "what colour is the cat toy"


def test_decompression_bombs_whitespace_captions_and_unknown_answers(tmp_path: Path):
    root = tmp_path / "raw"
    _img(root / "img/ok.jpg")
    _img(root / "img/huge.png", size=(200, 200))
    (root / "answer_list.json").write_text(json.dumps(["red", "blue"]))
    (root / "pretrain.json").write_text(
        json.dumps(
            [
                {"image": "img/huge.png", "caption": "too many pixels"},
                {"image": "img/ok.jpg", "caption": " \t\n "},
                {"image": "img/ok.jpg", "caption": "fine"},
            ]
        )
    )
    (root / "vqa.json").write_text(
        json.dumps(
            [
                {
                    "question_id": 1,
                    "image": "img/ok.jpg",
                    "question": "what color?",
                    "answer": ["red", "green"],
                    "dataset": "vqa",
                },
            ]
        )
    )
    cfg = PreprocessConfig(
        image_root=str(root),
        out_dir=str(tmp_path / "out"),
        files={"pretrain.json": "pretrain", "vqa.json": "vqa"},
        answer_list="answer_list.json",
        max_pixels=10_000,
        workers=1,
        max_drop_fraction=1.0,
    )
    report = preprocess(cfg, progress=False)
    assert {(d.index, d.reason) for d in report.dropped} == {(0, "decompression_bomb"), (1, "empty_text")}
    assert report.notes["vqa_answer_not_in_answer_list"] == 1


def test_grounding_boxes_outside_the_image_are_dropped(tmp_path: Path):
    import pickle

    root = tmp_path / "raw"
    _img(root / "img/a.jpg", size=(40, 30))
    assets = root / "refcoco+"
    assets.mkdir(parents=True)
    (assets / "instances.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "img/a.jpg", "width": 40, "height": 30}],
                "annotations": [
                    {"id": 10, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1},
                    {"id": 11, "image_id": 1, "bbox": [35, 20, 20, 20], "category_id": 1},
                ],
                "categories": [{"id": 1, "name": "shape"}],
            }
        )
    )
    refs = [
        {"ref_id": 1, "ann_id": 10, "image_id": 1, "split": "val"},
        {"ref_id": 2, "ann_id": 11, "image_id": 1, "split": "val"},
    ]
    (assets / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (assets / "dets.json").write_text(json.dumps({"1": [[5, 5, 10, 10, 0.9]]}))
    (root / "val.json").write_text(
        json.dumps(
            [
                {"image": "img/a.jpg", "text": "the small square", "ref_id": 1},
                {"image": "img/a.jpg", "text": "the square off the edge", "ref_id": 2},
                {"image": "img/a.jpg", "text": "an expression without a box", "ref_id": 3},
            ]
        )
    )
    cfg = PreprocessConfig(
        image_root=str(root),
        out_dir=str(tmp_path / "out"),
        files={"val.json": "grounding_eval"},
        grounding_assets="refcoco+",
        workers=1,
        max_drop_fraction=1.0,
    )
    report = preprocess(cfg, progress=False)
    assert {(d.index, d.reason) for d in report.dropped} == {(1, "box_outside_image"), (2, "ref_without_box")}
    # a pickle that tries to build anything but plain data is refused
    (assets / "refs(unc).p").write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(PreprocessError, match="may only hold plain"):
        preprocess(cfg, progress=False)


def test_same_input_content_gives_the_same_output_bytes(dataset: Path, tmp_path: Path):
    cfg = _cfg(dataset, tmp_path)
    preprocess(cfg, progress=False)
    out = tmp_path / "out"
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for path in (dataset / "img").iterdir():  # rewrite every file: same bytes, new times
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            path.write_bytes(data)
    report = preprocess(cfg, progress=False)
    assert not report.up_to_date  # file times changed, so the images were checked again
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
