"""Images as they are (issue 16, item 2): one decoder for preprocessing, the datasets, ``albef predict`` and
the served pyfunc; high bit depth by its real range; transparency on white; stable messages for images
Pillow cannot decode; SNLI-VE paths with or without an extension; outputs readable under the umask."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef.data.datasets import FolderImages
from albef.data.formats import image_paths
from albef.data.images import ImageProblem, decode_rgb, open_rgb
from albef.data.preprocess import PreprocessConfig, preprocess
from albef.data.shards import ShardedImages
from albef.io import atomic_write, atomic_write_text

SIZE = (40, 30)  # stored as is: preprocessing below never resizes (max_side 64)


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale for 2-D ``values``, RGB for H x W x 3, RGBA for H x W x 4), written by hand:
    Pillow cannot write 16-bit colour PNGs."""
    height, width = values.shape[:2]
    colour_type = {2: 0, 3: 2, 4: 6}[values.ndim if values.ndim == 2 else values.shape[2]]
    raw = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _float_rgb_tiff(width: int = 16, height: int = 12) -> bytes:
    """A valid uncompressed 32-bit float RGB TIFF (SampleFormat 3), which Pillow cannot open."""
    pixels = np.random.default_rng(0).random((height, width, 3)).astype("<f4").tobytes()
    bits, formats = struct.pack("<3H", 32, 32, 32), struct.pack("<3H", 3, 3, 3)
    bits_at = 8 + len(pixels)
    formats_at = bits_at + len(bits)
    ifd_at = formats_at + len(formats)
    short = lambda tag, value: struct.pack("<HHIHH", tag, 3, 1, value, 0)  # noqa: E731
    long = lambda tag, value: struct.pack("<HHII", tag, 4, 1, value)  # noqa: E731
    entries = [
        long(256, width),
        long(257, height),
        struct.pack("<HHII", 258, 3, 3, bits_at),  # BitsPerSample 32, 32, 32
        short(259, 1),  # no compression
        short(262, 2),  # RGB
        long(273, 8),  # the strip follows the header
        short(277, 3),
        long(278, height),
        long(279, len(pixels)),
        short(284, 1),
        struct.pack("<HHII", 339, 3, 3, formats_at),  # SampleFormat: IEEE float
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_at) + pixels + bits + formats + ifd


def _halves(size=SIZE) -> Image.Image:
    """Red left half, blue right half: any rotation or mirror shows."""
    image = Image.new("RGB", size, (220, 20, 20))
    image.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    return image


GREY_RAMP = np.tile(
    np.arange(SIZE[0], dtype=np.uint16) * 6, (SIZE[1], 1)
)  # 0..234: 8-bit values, 16-bit file


def _write_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "grey16_small.png").write_bytes(_png16(GREY_RAMP))
    (root / "grey16_full.png").write_bytes(_png16(GREY_RAMP * 280))  # up to 65520
    rgb = np.stack([GREY_RAMP, np.full_like(GREY_RAMP, 100), np.full_like(GREY_RAMP, 200)], axis=2)
    (root / "rgb16_small.png").write_bytes(_png16(rgb))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    _halves().save(root / "rotated.jpg", exif=exif, quality=95)
    rgba = Image.new("RGBA", SIZE, (0, 0, 0, 0))  # fully transparent black
    rgba.paste((200, 10, 10, 255), (0, 0, 10, 10))
    rgba.save(root / "transparent.png")
    palette = Image.new("P", SIZE, 1)
    palette.putpalette([0, 0, 0, 30, 200, 30] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 20, 30))  # left half: index 0, transparent
    palette.save(root / "palette.png", transparency=0)
    Image.new("RGB", SIZE, (10, 20, 30)).save(root / "keyed.png", transparency=(10, 20, 30))
    Image.new("CMYK", SIZE, (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    (root / "float.tif").write_bytes(_float_rgb_tiff())


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("asis")
    root = base / "raw"
    _write_images(root)
    names = sorted(p.name for p in root.iterdir())
    (root / "pretrain.json").write_text(json.dumps([{"image": n, "caption": f"picture {n}"} for n in names]))
    cfg = PreprocessConfig(
        image_root=str(root),
        out_dir=str(base / "out"),
        files={"pretrain.json": "pretrain"},
        max_side=64,
        workers=1,
        max_drop_fraction=1.0,
    )
    preprocess(cfg, progress=False)
    return base


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------- bit depth


def test_a_16_bit_png_holding_8_bit_values_keeps_them(processed: Path):
    decoded = _pixels(open_rgb(processed / "raw" / "grey16_small.png"))
    assert (decoded[..., 0] == GREY_RAMP).all() and (decoded[..., 0] == decoded[..., 2]).all()
    stored = _pixels(ShardedImages(processed / "out").open("grey16_small.png"))
    assert abs(stored.mean() - GREY_RAMP.mean()) < 2  # ~117, not ~0 (the old value / 256)


def test_a_full_range_16_bit_png_is_scaled_by_its_bit_depth(processed: Path):
    decoded = _pixels(open_rgb(processed / "raw" / "grey16_full.png"))[..., 0]
    expected = np.rint(GREY_RAMP.astype(np.float64) * 280 * 255 / 65535)
    assert np.array_equal(decoded, expected) and decoded.max() == 255  # 65520 -> 254.9 -> 255


def test_a_16_bit_rgb_png_holding_8_bit_values_keeps_them(processed: Path):
    decoded = _pixels(open_rgb(processed / "raw" / "rgb16_small.png"))
    assert (decoded[..., 0] == GREY_RAMP).all()
    assert (decoded[..., 1] == 100).all() and (decoded[..., 2] == 200).all()


def test_float_images_in_0_to_1_and_32_bit_integers_use_their_range():
    buffer = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(buffer, format="TIFF")
    decoded = _pixels(decode_rgb(buffer.getvalue(), "float"))[..., 0]
    assert decoded.min() == 0 and decoded.max() == 255
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 100_000).save(buffer, format="TIFF")
    decoded = _pixels(decode_rgb(buffer.getvalue(), "int32"))[..., 0]
    assert decoded.min() == 0 and decoded.max() == 255


# ---------------------------------------------------------------------------- orientation, alpha, colour


def test_exif_orientation_is_applied(processed: Path):
    reference = _pixels(_halves().transpose(Image.Transpose.ROTATE_270))  # orientation 6: turned clockwise
    decoded = _pixels(open_rgb(processed / "raw" / "rotated.jpg"))
    stored = _pixels(ShardedImages(processed / "out").open("rotated.jpg"))
    for image in (decoded, stored):
        assert image.shape == reference.shape == (40, 30, 3)
        assert np.abs(image - reference).mean() < 6


def test_transparency_is_composited_on_white(processed: Path):
    rgba = _pixels(open_rgb(processed / "raw" / "transparent.png"))
    assert (rgba[20:, 20:] == 255).all() and tuple(rgba[2, 2]) == (200, 10, 10)
    palette = _pixels(open_rgb(processed / "raw" / "palette.png"))
    assert (palette[:, :20] == 255).all() and tuple(palette[5, 30]) == (30, 200, 30)
    keyed = _pixels(open_rgb(processed / "raw" / "keyed.png"))  # RGB with a transparent colour (tRNS)
    assert (keyed == 255).all()


def test_cmyk_becomes_rgb_close_to_the_source(processed: Path):
    decoded = _pixels(open_rgb(processed / "raw" / "cmyk.jpg"))
    assert np.abs(decoded - np.array([255, 0, 0])).max() < 12  # C0 M255 Y255 K0: red


# ---------------------------------------------------------------------------- images Pillow cannot decode


def test_an_image_pillow_cannot_decode_is_unsupported_with_a_stable_report(tmp_path: Path):
    root = tmp_path / "raw"
    _write_images(root)
    (root / "broken.png").write_bytes((root / "keyed.png").read_bytes()[:60])
    records = [{"image": "float.tif", "caption": "float"}, {"image": "broken.png", "caption": "broken"}]
    (root / "pretrain.json").write_text(json.dumps(records))
    reports = []
    for run in ("one", "two"):
        cfg = PreprocessConfig(
            image_root=str(root),
            out_dir=str(tmp_path / run),
            files={"pretrain.json": "pretrain"},
            workers=2,
            max_drop_fraction=1.0,
        )
        report = preprocess(cfg, progress=False)
        reports.append((tmp_path / run / "report.json").read_bytes())
    drops = {d.index: d for d in report.dropped}
    assert drops[0].reason == "unsupported_image"
    assert "Pillow cannot decode this TIFF image" in drops[0].detail and "0x" not in drops[0].detail
    assert drops[1].reason == "corrupt_image" and "0x" not in drops[1].detail
    assert reports[0] == reports[1]


def test_messages_name_no_memory_address():
    with pytest.raises(ImageProblem) as caught:
        decode_rgb(b"this is not an image at all", "notes.txt")
    assert caught.value.reason == "corrupt_image" and "0x" not in caught.value.detail
    assert caught.value.detail == "notes.txt: not an image file Pillow recognises"


# ---------------------------------------------------------------------------- SNLI-VE paths


def test_snli_ve_accepts_bare_ids_and_paths_with_an_extension(tmp_path: Path):
    assert image_paths({"image": "2248275918"}, "ve") == ["2248275918.jpg"]
    assert image_paths({"image": "flickr/x.jpg"}, "ve") == ["flickr/x.jpg"]
    assert image_paths({"image": "x.PNG"}, "ve") == ["x.PNG"]
    root = tmp_path / "raw"
    root.mkdir()
    _halves().save(root / "x.jpg")
    _halves().save(root / "y.jpg")
    records = [
        {"image": "x.jpg", "sentence": "a path with its extension", "label": "entailment"},
        {"image": "y", "sentence": "an official bare id", "label": "neutral"},
        {"image": "z", "sentence": "a bare id with no file", "label": "contradiction"},
        {"image": "w.png", "sentence": "a path with no file", "label": "contradiction"},
    ]
    (root / "ve.json").write_text(json.dumps(records))
    cfg = PreprocessConfig(
        image_root=str(root), out_dir=str(tmp_path / "out"), files={"ve.json": "ve"}, max_drop_fraction=1.0
    )
    report = preprocess(cfg, progress=False)
    kept = json.loads((tmp_path / "out" / "ve.json").read_text())
    assert [r["image"] for r in kept] == ["x.jpg", "y"]
    drops = {d.index: d for d in report.dropped}
    assert drops[2].reason == drops[3].reason == "missing_file"
    assert "z.jpg" in drops[2].detail and "'.jpg' appended" in drops[2].detail
    assert "w.png" in drops[3].detail and "w.png.jpg" not in drops[3].detail and "as it is" in drops[3].detail


def test_a_missing_snli_ve_image_in_a_dataset_says_what_was_tried(tmp_path: Path):
    from albef.data.classify import ClassificationDataset, MissingImageError

    root = tmp_path / "raw"
    root.mkdir()
    ann = tmp_path / "ve.json"
    ann.write_text(json.dumps([{"image": "z", "sentence": "no file", "label": "neutral"}]))
    with pytest.raises(MissingImageError, match=r"'z\.jpg'.*'\.jpg' appended"):
        ClassificationDataset(ann, "ve", FolderImages(root), transform=lambda image: image)


# ---------------------------------------------------------------------------- file modes


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_follow_the_umask(tmp_path: Path, umask_022):
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"x"))
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    os.umask(0o077)
    atomic_write_text(tmp_path / "c.json", "{}")
    assert stat.S_IMODE((tmp_path / "c.json").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_preprocessing_outputs_are_readable_by_others(tmp_path: Path, umask_022):
    root = tmp_path / "raw"
    root.mkdir()
    _halves().save(root / "a.jpg")
    (root / "pretrain.json").write_text(json.dumps([{"image": "a.jpg", "caption": "halves"}]))
    cfg = PreprocessConfig(
        image_root=str(root), out_dir=str(tmp_path / "out"), files={"pretrain.json": "pretrain"}
    )
    preprocess(cfg, progress=False)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


# ---------------------------------------------------------------------------- train and serve agree


@pytest.mark.parametrize(
    "name", ["rotated.jpg", "transparent.png", "palette.png", "keyed.png", "grey16_small.png", "cmyk.jpg"]
)
def test_serving_and_predict_decode_as_preprocessing_does(processed: Path, name: str):
    from albef.serving.predict import open_image
    from albef.serving.pyfunc import InputLimits, decode_image

    path = processed / "raw" / name
    reference = _pixels(open_rgb(path))  # what preprocessing stores (before its resize and JPEG)
    served_path = decode_image(name, 0, limits=InputLimits(image_root=str(path.parent)))
    served_base64 = decode_image(base64.b64encode(path.read_bytes()).decode(), 0)
    predicted = open_image(path)
    folder = FolderImages(processed / "raw").open(name)
    for image in (served_path, served_base64, predicted, folder):
        assert image.mode == "RGB"
        assert np.array_equal(_pixels(image), reference)


def test_serving_reports_an_unsupported_image_by_row_and_column(processed: Path):
    from albef.serving.pyfunc import InvalidModelInput, decode_image

    data = base64.b64encode((processed / "raw" / "float.tif").read_bytes()).decode()
    with pytest.raises(
        InvalidModelInput, match=r"row 3, column 'image': not a decodable image \(unsupported_image"
    ):
        decode_image(data, 3)
