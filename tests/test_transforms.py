"""Image transforms: each RandomAugment op against the official (OpenCV) definition, the sampler's
statistics, and the four pipelines (ALBEF-SPEC §4.3)."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from albef.data import transforms as tf
from albef.data.transforms import (
    AUGMENT_OPS,
    CLIP_MEAN,
    CLIP_STD,
    RandomAugment,
    build_transform,
    eval_transform,
    grounding_train_transform,
    op_args,
    pretrain_transform,
    train_transform,
)

M7 = 7


def noise(h: int = 32, w: int = 40, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (h, w, 3), dtype=np.uint8)


def smooth(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth colour pattern (at most ~20 grey levels per pixel), where interpolation schemes agree."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [128 + 100 * np.sin(xx / 5 + k) * np.cos(yy / 7 - k) for k in range(3)]
    return np.stack(chans, axis=-1).round().astype(np.uint8)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def reference_warp(a: np.ndarray, forward, fill: int = 128):
    """``cv2.warpAffine(a, M, (W, H), flags=INTER_LINEAR, borderValue=fill)`` in float arithmetic.

    Returns the image, the mask of pixels sampled fully inside the source, and the mask of pixels whose
    sample lies more than one pixel outside (pure fill in OpenCV).
    """
    h, w = a.shape[:2]
    m = np.asarray(forward, dtype=np.float64).reshape(2, 3)
    inv = np.linalg.inv(m[:, :2])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * (xx - m[0, 2]) + inv[0, 1] * (yy - m[1, 2])
    sy = inv[1, 0] * (xx - m[0, 2]) + inv[1, 1] * (yy - m[1, 2])
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def pick(yi, xi):
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        v = a[yi.clip(0, h - 1), xi.clip(0, w - 1)].astype(np.float64)
        v[~inside] = fill
        return v

    out = (1 - fy) * ((1 - fx) * pick(y0, x0) + fx * pick(y0, x0 + 1)) + fy * (
        (1 - fx) * pick(y0 + 1, x0) + fx * pick(y0 + 1, x0 + 1)
    )
    inner = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    outside = (sx < -1) | (sx > w) | (sy < -1) | (sy > h)
    return out.round().astype(np.int64), inner, outside


def opencv_fixed_point_warp(a: np.ndarray, forward, fill: int = 128) -> np.ndarray:
    """OpenCV's integer code path for ``warpAffine(INTER_LINEAR, BORDER_CONSTANT)``, written out tap by tap:
    inverse map (``invertAffineTransform``), positions as ``cvRound(term * 1024)`` per row and per column,
    ``(X0 + adelta + 16) >> 5`` to 1/32 px, weights from the 32x32 table scaled to 2^15, ``(sum + 2^14) >> 15``.
    """
    h, w = a.shape[:2]
    m = np.asarray(forward, dtype=np.float64).reshape(2, 3)
    d = 1.0 / (m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
    a11, a22, a12, a21 = m[1, 1] * d, m[0, 0] * d, -m[0, 1] * d, -m[1, 0] * d
    b1, b2 = -a11 * m[0, 2] - a12 * m[1, 2], -a21 * m[0, 2] - a22 * m[1, 2]
    xs, ys = np.arange(w), np.arange(h)[:, None]
    big_x = (
        np.rint((a12 * ys + b1) * 1024).astype(np.int64) + np.rint(a11 * xs * 1024).astype(np.int64) + 16
    ) >> 5
    big_y = (
        np.rint((a22 * ys + b2) * 1024).astype(np.int64) + np.rint(a21 * xs * 1024).astype(np.int64) + 16
    ) >> 5
    xi, fx, yi, fy = big_x >> 5, big_x & 31, big_y >> 5, big_y & 31
    out = np.zeros(a.shape, dtype=np.int64)
    for dy, wy in ((0, 32 - fy), (1, fy)):
        for dx, wx in ((0, 32 - fx), (1, fx)):
            yy, xx = yi + dy, xi + dx
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            tap = np.where(inside[..., None], a[yy.clip(0, h - 1), xx.clip(0, w - 1)].astype(np.int64), fill)
            out += tap * (wy * wx * 32)[..., None]  # INTER_REMAP_COEF_SCALE = 32768 = 1024 * 32
    return (out + (1 << 14)) >> 15


def rotation_matrix(degrees: float, w: int, h: int):
    """``cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1)``."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = w / 2, h / 2
    return [c, s, (1 - c) * cx - s * cy, -s, c, s * cx + (1 - c) * cy]


# ---------------------------------------------------------------------------------------------------------
# constants and the op list
# ---------------------------------------------------------------------------------------------------------


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_op_list_is_the_official_caption_safe_one():
    assert AUGMENT_OPS == (
        "Identity",
        "AutoContrast",
        "Equalize",
        "Brightness",
        "Sharpness",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    )
    for excluded in ("Color", "Contrast", "Solarize", "Posterize", "Cutout"):
        with pytest.raises(ValueError, match="excluded on purpose"):
            RandomAugment(ops=[excluded])


# ---------------------------------------------------------------------------------------------------------
# each op alone at M=7
# ---------------------------------------------------------------------------------------------------------


def test_op_args_at_m7():
    rng = random.Random(0)
    assert op_args("Identity", M7, rng) == ()
    assert op_args("AutoContrast", M7, rng) == ()
    assert op_args("Equalize", M7, rng) == ()
    for name in ("Brightness", "Sharpness"):  # always brighter/sharper: no sign flip
        assert {op_args(name, M7, rng) for _ in range(50)} == {(0.7 * 1.8 + 0.1,)}
        assert op_args(name, M7)[0] == pytest.approx(1.36)
    for name, magnitude in [
        ("ShearX", 0.21),
        ("ShearY", 0.21),
        ("TranslateX", 7.0),
        ("TranslateY", 7.0),
        ("Rotate", 21.0),
    ]:
        values = [op_args(name, M7, rng)[0] for _ in range(400)]
        assert all(abs(abs(v) - magnitude) < 1e-9 for v in values), name
        negative = sum(v < 0 for v in values) / len(values)
        assert 0.4 < negative < 0.6, (name, negative)
    assert op_args("TranslateX", M7, rng)[0] in (7.0, -7.0)  # whole pixels, so the shift is exact
    with pytest.raises(ValueError, match="unknown RandomAugment op"):
        op_args("Color", M7)


def test_identity_is_unchanged():
    img = Image.fromarray(noise())
    out = tf.identity(img)
    assert out is not img
    np.testing.assert_array_equal(arr(out), arr(img))


def test_brightness_multiplies_by_1_36_truncates_and_clips():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([values] * 3, axis=-1))
    out = arr(tf.brightness(img, *op_args("Brightness", M7)))
    # official: (arange(256, float32) * factor).clip(0, 255).astype(uint8)
    table = (np.arange(256, dtype=np.float32) * np.float32(1.36)).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], table[values])
    assert out[..., 0][values == 100].item() == 136
    assert out[..., 0][values == 200].item() == 255
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def official_sharpness(a: np.ndarray, factor: float) -> np.ndarray:
    """The official formula in float32, before its uint8 cast: borders kept, interior blended with the
    3x3 smoothing (1s, centre 5, /13) rounded to uint8 the way cv2.filter2D does."""
    k = np.ones((3, 3), np.float32)
    k[1, 1] = 5
    k /= 13
    af = a.astype(np.float32)
    h, w = a.shape[:2]
    smooth_ = np.zeros((h - 2, w - 2, a.shape[2]), np.float32)
    for dy in range(3):
        for dx in range(3):
            smooth_ += k[dy, dx] * af[dy : dy + h - 2, dx : dx + w - 2]
    smooth_ = np.rint(smooth_)
    out = af.copy()
    out[1:-1, 1:-1] = smooth_ + np.float32(factor) * (af[1:-1, 1:-1] - smooth_)
    return out


def test_sharpness_matches_official_formula_and_clips_instead_of_wrapping():
    a = noise(24, 30)
    out = arr(tf.sharpness(Image.fromarray(a), *op_args("Sharpness", M7)))
    ref = official_sharpness(a, 1.36)
    overflow = (ref < 0) | (ref >= 256)
    assert overflow.any() and (~overflow).any()
    np.testing.assert_array_equal(out[~overflow], ref[~overflow].astype(np.int64))  # truncation, as official
    # Documented difference: official wraps (uint8 cast of 311 -> 55); we clip to 0/255.
    np.testing.assert_array_equal(out[overflow], np.where(ref[overflow] < 0, 0, 255))
    for border in (out[0], out[-1], out[:, 0], out[:, -1]):
        assert border.shape[-1] == 3
    np.testing.assert_array_equal(out[0], a[0])
    np.testing.assert_array_equal(out[:, -1], a[:, -1])
    assert (out[1:-1, 1:-1] != a[1:-1, 1:-1]).mean() > 0.5  # it did sharpen


def test_autocontrast_stretches_each_channel_to_full_range():
    a = noise(20, 20, low=60, high=140)
    a[..., 1] = noise(20, 20, seed=1, low=10, high=50)[..., 1]
    a[..., 2] = 77  # a constant channel is left alone
    out = arr(tf.auto_contrast(Image.fromarray(a)))
    for c in (0, 1):
        ch = a[..., c].astype(np.int64)
        lo, hi = ch.min(), ch.max()
        scale = 255 / (hi - lo)
        table = (np.arange(256) * scale - lo * scale).clip(0, 255).astype(np.uint8)  # official table
        np.testing.assert_array_equal(out[..., c], table[ch])
        # lo -> 0; hi -> 255 * (hi - lo) / (hi - lo) in floating point, which the int cast can truncate to 254
        assert out[..., c].min() == 0 and out[..., c].max() >= 254
    np.testing.assert_array_equal(out[..., 2], 77)


def official_equalize_channel(ch: np.ndarray) -> np.ndarray:
    hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
    nonzero = hist[hist != 0]
    step = np.sum(nonzero[:-1]) // 255
    if step == 0:
        return ch
    n = np.empty_like(hist)
    n[0] = step // 2
    n[1:] = hist[:-1]
    return (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]


def test_equalize_spreads_histogram_per_channel_like_official():
    a = noise(32, 32, low=100, high=131)
    a[..., 1] = np.random.default_rng(3).normal(40, 5, (32, 32)).clip(0, 255).astype(np.uint8)
    a[..., 2] = 9  # single value: unchanged
    out = arr(tf.equalize(Image.fromarray(a)))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], official_equalize_channel(a[..., c]))
    for c in (0, 1):
        assert out[..., c].min() <= 10 and out[..., c].max() >= 240
        assert np.ptp(out[..., c]) > 5 * np.ptp(a[..., c].astype(np.int64))
    np.testing.assert_array_equal(out[..., 2], 9)


@pytest.mark.parametrize("pixels", [7.0, -7.0])
def test_translate_x_shifts_by_7_pixels_and_fills_128(pixels):
    a = noise(20, 30)
    out = arr(tf.translate_x(Image.fromarray(a), pixels))
    if pixels > 0:  # content moves left, band on the right
        np.testing.assert_array_equal(out[:, :-7], a[:, 7:])
        np.testing.assert_array_equal(out[:, -7:], 128)
    else:
        np.testing.assert_array_equal(out[:, 7:], a[:, :-7])
        np.testing.assert_array_equal(out[:, :7], 128)


@pytest.mark.parametrize("pixels", [7.0, -7.0])
def test_translate_y_shifts_by_7_pixels_and_fills_128(pixels):
    a = noise(30, 20)
    out = arr(tf.translate_y(Image.fromarray(a), pixels))
    if pixels > 0:  # content moves up, band at the bottom
        np.testing.assert_array_equal(out[:-7], a[7:])
        np.testing.assert_array_equal(out[-7:], 128)
    else:
        np.testing.assert_array_equal(out[7:], a[:-7])
        np.testing.assert_array_equal(out[:7], 128)


@pytest.mark.parametrize("factor", [0.21, -0.21])
def test_shear_x_about_top_left_with_fill_128(factor):
    a = smooth()
    h, w = a.shape[:2]
    out = arr(tf.shear_x(Image.fromarray(a), factor))
    np.testing.assert_array_equal(out[0], a[0])  # row 0 does not move
    corner = out[-1, 0] if factor > 0 else out[-1, -1]  # rows move right (left) as y grows
    np.testing.assert_array_equal(corner, 128)
    ref, inner, outside = reference_warp(a, [1, factor, 0, 0, 1, 0])
    assert inner.mean() > 0.6 and outside.any()
    assert np.abs(out[inner] - ref[inner]).max() <= 1
    np.testing.assert_array_equal(out[outside], 128)
    assert h == out.shape[0] and w == out.shape[1]


@pytest.mark.parametrize("factor", [0.21, -0.21])
def test_shear_y_about_top_left_with_fill_128(factor):
    a = smooth()
    out = arr(tf.shear_y(Image.fromarray(a), factor))
    np.testing.assert_array_equal(out[:, 0], a[:, 0])  # column 0 does not move
    corner = out[0, -1] if factor > 0 else out[-1, -1]
    np.testing.assert_array_equal(corner, 128)
    ref, inner, outside = reference_warp(a, [1, 0, 0, factor, 1, 0])
    assert np.abs(out[inner] - ref[inner]).max() <= 1
    np.testing.assert_array_equal(out[outside], 128)


@pytest.mark.parametrize("degrees", [21.0, -21.0])
def test_rotate_about_official_centre_with_fill_128(degrees):
    a = noise(32, 40)
    out = arr(tf.rotate(Image.fromarray(a), degrees))
    np.testing.assert_array_equal(out[16, 20], a[16, 20])  # pixel (W/2, H/2) stays put
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        np.testing.assert_array_equal(corner, 128)
    assert (out != a).mean() > 0.5
    s = smooth()
    h, w = s.shape[:2]
    out = arr(tf.rotate(Image.fromarray(s), degrees))
    ref, inner, outside = reference_warp(s, rotation_matrix(degrees, w, h))
    assert np.abs(out[inner] - ref[inner]).max() <= 1
    np.testing.assert_array_equal(out[outside], 128)


@pytest.mark.parametrize("size", [(32, 40), (33, 47), (96, 96)])
def test_affine_ops_match_opencv_fixed_point_pixel_for_pixel(size):
    h, w = size
    a = noise(h, w, seed=h)
    img = Image.fromarray(a)
    cases = [
        (tf.shear_x, 0.21, [1, 0.21, 0, 0, 1, 0]),
        (tf.shear_x, -0.21, [1, -0.21, 0, 0, 1, 0]),
        (tf.shear_y, 0.21, [1, 0, 0, 0.21, 1, 0]),
        (tf.translate_x, 7.0, [1, 0, -7, 0, 1, 0]),
        (tf.translate_y, -7.0, [1, 0, 0, 0, 1, 7]),
        (tf.rotate, 21.0, rotation_matrix(21.0, w, h)),
        (tf.rotate, -21.0, rotation_matrix(-21.0, w, h)),
        (tf.rotate, 3.0, rotation_matrix(3.0, w, h)),
    ]
    for fn, arg, matrix in cases:
        np.testing.assert_array_equal(
            arr(fn(img, arg)), opencv_fixed_point_warp(a, matrix), err_msg=f"{fn.__name__}({arg})"
        )


def test_rotate_positive_angle_is_counter_clockwise():
    a = np.zeros((40, 40, 3), np.uint8)
    a[19:22, 29:32] = 255  # a blob centred 10 px right of the rotation centre (20, 20)
    out = arr(tf.rotate(Image.fromarray(a), 21.0, fill=0))[..., 0].astype(np.float64)
    ys, xs = np.mgrid[0:40, 0:40]
    cy, cx = (out * ys).sum() / out.sum(), (out * xs).sum() / out.sum()
    assert cy == pytest.approx(20 - 10 * math.sin(math.radians(21)), abs=0.2)  # moved up: counter-clockwise
    assert cx == pytest.approx(20 + 10 * math.cos(math.radians(21)), abs=0.2)


def test_geometric_ops_keep_size_and_mode_for_grey_images():
    img = Image.fromarray(noise()[..., 0])
    for fn, arg in [(tf.shear_x, 0.21), (tf.translate_y, 7.0), (tf.rotate, 21.0)]:
        out = fn(img, arg)
        assert out.mode == "L" and out.size == img.size
    assert arr(tf.translate_x(img, 7.0))[:, -7:].tolist() == [[128] * 7] * img.size[1]


# ---------------------------------------------------------------------------------------------------------
# RandomAugment: sampling, probability, reproducibility
# ---------------------------------------------------------------------------------------------------------


def test_random_augment_defaults_and_output_type():
    aug = RandomAugment()
    assert (aug.n, aug.m, aug.p, aug.ops) == (2, 7, 0.5, AUGMENT_OPS)
    img = Image.fromarray(noise())
    for _ in range(20):
        out = aug(img)
        assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == img.size
    assert "n=2, m=7" in repr(aug)


def test_random_augment_seeded_generator_is_reproducible():
    img = Image.fromarray(noise(24, 24))
    first = RandomAugment(generator=random.Random(123))
    second = RandomAugment(generator=123)  # an int seed means random.Random(seed)
    outs_a = [arr(first(img)) for _ in range(30)]
    outs_b = [arr(second(img)) for _ in range(30)]
    for x, y in zip(outs_a, outs_b):
        np.testing.assert_array_equal(x, y)
    assert any((x != outs_a[0]).any() for x in outs_a[1:])  # not the same op every time
    seed_123, seed_124 = RandomAugment(generator=123), RandomAugment(generator=124)
    assert [seed_123.sample() for _ in range(30)] != [seed_124.sample() for _ in range(30)]


def test_random_augment_global_random_is_seedable():
    img = Image.fromarray(noise(24, 24))
    aug = RandomAugment()
    random.seed(5)
    a = [arr(aug(img)) for _ in range(10)]
    random.seed(5)
    b = [arr(aug(img)) for _ in range(10)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_each_op_applied_with_probability_one_half():
    # Value 50 becomes 68 after one Brightness(1.36) and 92 after two, so the output counts the applied ops.
    img = Image.new("RGB", (4, 4), (50, 50, 50))
    aug = RandomAugment(n=2, ops=["Brightness"], generator=0)
    counts = {50: 0, 68: 0, 92: 0}
    trials = 2000
    for _ in range(trials):
        counts[int(arr(aug(img))[0, 0, 0])] += 1
    assert counts[50] / trials == pytest.approx(0.25, abs=0.04)
    assert counts[68] / trials == pytest.approx(0.50, abs=0.04)
    assert counts[92] / trials == pytest.approx(0.25, abs=0.04)


def test_ops_drawn_uniformly_with_replacement():
    aug = RandomAugment(n=2, p=1.0, generator=1)
    draws = [aug.sample() for _ in range(5000)]
    assert all(len(d) == 2 for d in draws)
    counts = {name: 0 for name in AUGMENT_OPS}
    for d in draws:
        for name, _ in d:
            counts[name] += 1
    for name, c in counts.items():  # expected 1000 each, sd ~30
        assert 850 < c < 1150, (name, c)
    pairs = RandomAugment(n=2, ops=["Brightness", "Rotate"], p=1.0, generator=2)
    same = sum(a[0] == b[0] for a, b in (pairs.sample() for _ in range(2000))) / 2000
    assert same == pytest.approx(0.5, abs=0.05)  # without replacement this would be 0
    assert RandomAugment(n=0).sample() == []


def test_random_augment_argument_checks():
    with pytest.raises(ValueError, match="m must be"):
        RandomAugment(m=11)
    with pytest.raises(ValueError, match="p must be"):
        RandomAugment(p=1.5)
    with pytest.raises(ValueError, match="n must be"):
        RandomAugment(n=-1)
    with pytest.raises(ValueError, match="unknown RandomAugment ops"):
        RandomAugment(ops=["Blur"])
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        RandomAugment()(Image.new("RGBA", (8, 8)))
    with pytest.raises(TypeError, match="PIL image"):
        RandomAugment()(noise())


# ---------------------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------------------

MEAN_RGB = tuple(round(m * 255) for m in CLIP_MEAN)


@pytest.mark.parametrize("name", ["pretrain", "train", "grounding_train", "eval"])
def test_pipelines_give_normalised_float_tensors(name):
    s = 32
    out = build_transform(name, s)(Image.fromarray(noise(50, 70)))
    assert out.dtype == torch.float32 and out.shape == (3, s, s)
    # a constant image of the mean colour maps to ~0 (RandomAugment would move it, so it is off here)
    kw = {} if name == "eval" else {"augment": False}
    flat = build_transform(name, s, **kw)(Image.new("RGB", (45, 37), MEAN_RGB))
    assert flat.abs().max() < 0.01
    white = build_transform(name, s, **kw)(Image.new("RGB", (40, 40), (255, 255, 255)))
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(white.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


def test_eval_transform_is_deterministic_and_resizes_to_a_square():
    transform = eval_transform(24)
    img = Image.fromarray(noise(30, 50))
    torch.manual_seed(0)
    random.seed(0)
    a = transform(img)
    torch.manual_seed(1)
    random.seed(1)
    b = transform(img)
    assert torch.equal(a, b) and a.shape == (3, 24, 24)
    steps = transform.transforms
    assert [type(t) for t in steps] == [T.Resize, T.ToTensor, T.Normalize]
    assert steps[0].size == (24, 24) and steps[0].interpolation == InterpolationMode.BICUBIC


def test_pipeline_steps_match_the_official_recipes():
    pre = pretrain_transform(256).transforms
    assert [type(t) for t in pre] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        RandomAugment,
        T.ToTensor,
        T.Normalize,
    ]
    assert pre[0].size == (256, 256) and pre[0].scale == (0.2, 1.0)
    assert pre[0].interpolation == InterpolationMode.BICUBIC
    assert (pre[2].n, pre[2].m) == (2, 7)
    assert tuple(pre[4].mean) == CLIP_MEAN and tuple(pre[4].std) == CLIP_STD
    fine = train_transform(384).transforms
    assert type(fine[0]) is T.RandomResizedCrop and fine[0].scale == (0.5, 1.0) and fine[0].size == (384, 384)
    ground = grounding_train_transform(384).transforms
    assert [type(t) for t in ground] == [
        T.Resize,
        T.RandomHorizontalFlip,
        RandomAugment,
        T.ToTensor,
        T.Normalize,
    ]
    assert ground[0].size == (384, 384) and ground[0].interpolation == InterpolationMode.BICUBIC
    assert pretrain_transform(64, scale=(0.3, 0.9)).transforms[0].scale == (0.3, 0.9)


def test_augment_switch_removes_random_augment():
    for builder in (pretrain_transform, train_transform, grounding_train_transform):
        assert not any(isinstance(t, RandomAugment) for t in builder(32, augment=False).transforms)
        assert any(isinstance(t, RandomAugment) for t in builder(32).transforms)


@pytest.mark.parametrize("name", ["pretrain", "train", "grounding_train"])
def test_flip_switch(name):
    # Brightness grows left to right; any crop keeps that order, only a flip reverses it.
    ramp = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8)[None, :, None], (48, 1, 3))
    img = Image.fromarray(ramp)

    def flipped_fraction(**kw) -> float:
        transform = build_transform(name, 32, augment=False, **kw)
        torch.manual_seed(0)
        outs = [transform(img) for _ in range(40)]
        return sum(float(o[:, :, -1].mean() < o[:, :, 0].mean()) for o in outs) / len(outs)

    assert 0.2 < flipped_fraction() < 0.8
    assert flipped_fraction(hflip=False) == 0.0
    assert not any(
        isinstance(t, T.RandomHorizontalFlip) for t in build_transform(name, 32, hflip=False).transforms
    )


def test_train_pipeline_reproducible_with_torch_and_random_seeds():
    transform = pretrain_transform(32)
    img = Image.fromarray(noise(40, 40))
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        random.seed(3)
        runs.append(torch.stack([transform(img) for _ in range(5)]))
    assert torch.equal(runs[0], runs[1])


def test_pipelines_pickle_for_dataloader_workers():
    img = Image.fromarray(noise(40, 40))
    for name in tf.TRANSFORM_NAMES:
        clone = pickle.loads(pickle.dumps(build_transform(name, 32)))
        assert clone(img).shape == (3, 32, 32)
    original = RandomAugment(generator=9)
    clone = pickle.loads(pickle.dumps(original))  # the generator state travels with it
    assert [clone.sample() for _ in range(5)] == [original.sample() for _ in range(5)]


def test_build_transform_dispatch_and_errors():
    assert tf.TRANSFORM_NAMES == ("pretrain", "train", "grounding_train", "eval")
    assert build_transform("train", 48, scale=(0.6, 1.0)).transforms[0].scale == (0.6, 1.0)
    with pytest.raises(ValueError, match="unknown transform 'test'.*pretrain, train, grounding_train, eval"):
        build_transform("test", 32)
    with pytest.raises(ValueError, match="image_size"):
        build_transform("eval", 0)
    with pytest.raises(TypeError):
        build_transform("eval", 32, hflip=False)  # eval never flips: a wrong switch is an error, not ignored
