"""Image transforms: the official ALBEF ``RandomAugment`` and the four pipelines (ALBEF-SPEC §4.3).

The official ``dataset/randaugment.py`` re-implements PIL's ops with OpenCV on uint8 HWC arrays. Here the
point ops (AutoContrast, Equalize, Brightness) and Sharpness run through PIL itself, which computes the same
numbers, and the affine ops (shear about the top-left corner, translate, rotation about pixel
``(W/2, H/2)``) through a small NumPy copy of OpenCV's bilinear warp. What still differs, all of it small:

* **Sharpness overflow.** The official blends in float32 and casts to uint8 without clipping, so a value
  above 255 or below 0 wraps around (a bright pixel next to dark ones turns dark: 311 -> 55 on x86). PIL
  clips. Pixels that do not overflow are identical, borders included (both leave the outer ring untouched).
* **Affine ops** run through :func:`_warp`, OpenCV's bilinear ``warpAffine`` re-done in NumPy (PIL's
  ``transform`` rounds and fills differently: see there). It matches, pixel for pixel, an emulation of
  OpenCV's fixed-point code path (tests/test_transforms.py); OpenCV itself is not installed here, so that
  emulation is the reference. Cost: about 3x PIL's ``rotate`` (~15 ms vs ~5 ms at 384 px on one slow core).
* **Random stream.** The official draws from NumPy's global generator; here draws come from a
  ``random.Random`` (or the ``random`` module, which PyTorch's DataLoader reseeds in each worker). Same
  distribution, different sequence.
* **Return type.** The official with ``isPIL=True`` returns a NumPy array; this returns a PIL image.
  ``ToTensor`` treats both the same.

Pipelines expect RGB PIL images (the datasets call ``.convert("RGB")``, as the official ones do).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# CLIP's normalisation constants: the official code uses these, not ImageNet's, although the ViT is DeiT.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

MAX_LEVEL = 10  # magnitudes run 0..MAX_LEVEL
TRANSLATE_CONST = 10  # translation in pixels at MAX_LEVEL (absolute, whatever the image size)
FILL = 128  # grey written into the area a geometric op uncovers, in every channel

_BICUBIC = InterpolationMode.BICUBIC
_SUPPORTED_MODES = ("RGB", "L")


class _Rng(Protocol):
    """What RandomAugment draws from: a ``random.Random`` or the ``random`` module itself."""

    def random(self) -> float: ...

    def choices(self, population: Sequence[str], *, k: int = 1) -> list[str]: ...


# ---------------------------------------------------------------------------------------------------------
# The ops. Each takes a PIL image (RGB or L) and returns a new one of the same size and mode.
# ---------------------------------------------------------------------------------------------------------


def identity(img: Image.Image) -> Image.Image:
    """No change (a copy, so callers may mutate the result)."""
    return img.copy()


def auto_contrast(img: Image.Image) -> Image.Image:
    """Stretch each channel on its own so its min maps to 0 and its max to 255 (cutoff 0).

    Same table as the official ``autocontrast_func``: ``int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))``,
    so ``hi`` can land on 254 through float rounding (in both); a constant channel is left alone.
    """
    return ImageOps.autocontrast(img, cutoff=0)


def equalize(img: Image.Image) -> Image.Image:
    """PIL's histogram equalisation, per channel (the official reproduces PIL's, not OpenCV's, formula):
    ``lut[v] = (step // 2 + count(values < v)) // step`` with ``step = (n - count(top non-empty bin)) // 255``;
    a channel with a single value (``step == 0``) is left alone.
    """
    return ImageOps.equalize(img)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Every value times ``factor``, truncated and clipped to 0..255 (PIL's blend with black)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with a smoothed copy: ``smooth + factor * (img - smooth)``, the outer one-pixel ring untouched.

    The smoothing kernel is 1 everywhere and 5 in the centre, divided by 13 (PIL's ``SMOOTH`` and the
    official kernel). Out-of-range results are clipped here and wrap around in the official (module doc).
    """
    return ImageEnhance.Sharpness(img).enhance(factor)


# OpenCV's warpAffine arithmetic: positions in 1/1024 pixel (AB_BITS = 10), sampled at 1/32 pixel (INTER_BITS = 5).
_AB_SCALE = 1024
_SUBPIXEL = 32


def _warp(img: Image.Image, forward: Sequence[float], fill: int) -> Image.Image:
    """``cv2.warpAffine(img, M, (W, H), flags=INTER_LINEAR, borderValue=fill)`` in NumPy.

    ``forward`` maps source to destination pixel indices (pixel centres at integers). Each output pixel
    samples the source at the inverse-mapped position, computed like OpenCV: the column and the row term
    each rounded to 1/1024 pixel, their sum floored to 1/32 pixel. The four neighbours are blended
    bilinearly; neighbours outside the image take the value ``fill`` (the image fades into the fill over one
    pixel), and the result is rounded half up. PIL's own ``transform`` is not used: it truncates instead of
    rounding, switches to the fill with a hard edge and does not quantise positions, which puts it up to
    ~5 grey levels away from OpenCV on noisy content.
    """
    m00, m01, m02, m10, m11, m12 = (float(v) for v in forward)
    det = m00 * m11 - m01 * m10
    # cv2.invertAffineTransform
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    i02, i12 = -i00 * m02 - i01 * m12, -i10 * m02 - i11 * m12
    src = np.asarray(img, dtype=np.uint8)
    grey = src.ndim == 2
    if grey:
        src = src[..., None]
    h, w, bands = src.shape
    cols, rows = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)[:, None]
    frac_bits = _SUBPIXEL.bit_length() - 1  # 5
    shift = (_AB_SCALE // _SUBPIXEL).bit_length() - 1  # 1/1024 -> 1/32 pixel

    def position(row_term: np.ndarray, col_term: np.ndarray) -> np.ndarray:
        """In 1/32 pixel: each term rounded (half to even, as cvRound) to 1/1024, the sum rounded down."""
        row_fixed = np.rint(row_term * _AB_SCALE).astype(np.int32)
        col_fixed = np.rint(col_term * _AB_SCALE).astype(np.int32)
        return (row_fixed + col_fixed + (1 << (shift - 1))) >> shift

    x = position(i01 * rows + i02, i00 * cols)
    y = position(i11 * rows + i12, i10 * cols)
    fx, fy = x & (_SUBPIXEL - 1), y & (_SUBPIXEL - 1)
    x0, y0 = x >> frac_bits, y >> frac_bits
    # Channels first (long inner loops). A one-pixel frame of fill around the image: clipping indices into
    # it makes every tap outside the image read the fill.
    padded = np.pad(src.transpose(2, 0, 1), ((0, 0), (1, 1), (1, 1)), constant_values=fill).reshape(bands, -1)
    xa, xb = np.clip(x0 + 1, 0, w + 1), np.clip(x0 + 2, 0, w + 1)
    ya, yb = np.clip(y0 + 1, 0, h + 1) * (w + 2), np.clip(y0 + 2, 0, h + 1) * (w + 2)
    # Integer weights in 1/32 steps, as in OpenCV's (here exact) fixed-point table; they sum to 1024.
    wx0, wy0 = _SUBPIXEL - fx, _SUBPIXEL - fy
    total = padded.take(ya + xa, axis=1) * (wy0 * wx0)
    total += padded.take(ya + xb, axis=1) * (wy0 * fx)
    total += padded.take(yb + xa, axis=1) * (fy * wx0)
    total += padded.take(yb + xb, axis=1) * (fy * fx)
    out = ((total + (_SUBPIXEL * _SUBPIXEL // 2)) >> (2 * frac_bits)).astype(np.uint8)  # round half up
    out = np.ascontiguousarray(out.transpose(1, 2, 0))
    return Image.fromarray(out[..., 0] if grey else out)


def shear_x(img: Image.Image, factor: float, fill: int = FILL) -> Image.Image:
    """Row ``y`` moves right by ``factor * y`` pixels (top row fixed): ``out[y, x] = img[y, x - factor*y]``."""
    return _warp(img, (1.0, factor, 0.0, 0.0, 1.0, 0.0), fill)


def shear_y(img: Image.Image, factor: float, fill: int = FILL) -> Image.Image:
    """Column ``x`` moves down by ``factor * x`` pixels (left column fixed)."""
    return _warp(img, (1.0, 0.0, 0.0, factor, 1.0, 0.0), fill)


def translate_x(img: Image.Image, pixels: float, fill: int = FILL) -> Image.Image:
    """Content moves LEFT by ``pixels`` (``out[y, x] = img[y, x + pixels]``); a positive offset uncovers a
    ``pixels``-wide band on the right. Same direction as the official."""
    return _warp(img, (1.0, 0.0, -pixels, 0.0, 1.0, 0.0), fill)


def translate_y(img: Image.Image, pixels: float, fill: int = FILL) -> Image.Image:
    """Content moves UP by ``pixels``; a positive offset uncovers a band at the bottom."""
    return _warp(img, (1.0, 0.0, 0.0, 0.0, 1.0, -pixels), fill)


def rotate(img: Image.Image, degrees: float, fill: int = FILL) -> Image.Image:
    """Counter-clockwise (as displayed) rotation about pixel ``(W/2, H/2)``, the official (OpenCV) centre.

    That centre is half a pixel right of and below the geometric centre PIL's ``rotate`` uses; for even sizes
    it is a real pixel and stays exactly where it is.
    """
    w, h = img.size
    cx, cy = w / 2, h / 2
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # cv2.getRotationMatrix2D((cx, cy), degrees, 1.0)
    forward = (cos, sin, (1 - cos) * cx - sin * cy, -sin, cos, sin * cx + (1 - cos) * cy)
    return _warp(img, forward, fill)


# The official op list for every ALBEF pipeline. Color, Contrast, Solarize, Posterize and Cutout exist in
# the official file but are deliberately left out (and not implemented here): they change or hide colours,
# which would make colour words in the paired caption false ("a red car" no longer shows a red car).
_OPS: dict[str, Callable[..., Image.Image]] = {
    "Identity": identity,
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}
AUGMENT_OPS: tuple[str, ...] = tuple(_OPS)
# Argument at MAX_LEVEL of the ops whose sign is random.
_SIGNED_SCALE = {
    "ShearX": 0.3,
    "ShearY": 0.3,
    "TranslateX": float(TRANSLATE_CONST),
    "TranslateY": float(TRANSLATE_CONST),
    "Rotate": 30.0,
}


def op_args(name: str, level: float, rng: _Rng | None = None) -> tuple[float, ...]:
    """The official level-to-argument mapping (level ``m`` of ``MAX_LEVEL``).

    * Identity, AutoContrast, Equalize: no argument.
    * Brightness, Sharpness: factor ``m/10 * 1.8 + 0.1`` (1.36 at m=7); always this factor, no sign flip.
    * ShearX/Y ``± m/10 * 0.3``, TranslateX/Y ``± m/10 * 10`` absolute pixels, Rotate ``± m/10 * 30``
      degrees; the sign is drawn from ``rng`` (50/50).
    """
    if name not in _OPS:
        raise ValueError(f"unknown RandomAugment op {name!r}; expected one of {', '.join(AUGMENT_OPS)}")
    if name in ("Identity", "AutoContrast", "Equalize"):
        return ()
    if name in ("Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    value = (level / MAX_LEVEL) * _SIGNED_SCALE[name]
    if (rng if rng is not None else random).random() < 0.5:
        value = -value
    return (value,)


class RandomAugment:
    """The official ALBEF ``RandomAugment(N, M)`` on PIL images (defaults: the ALBEF setting 2, 7).

    Each call draws ``n`` ops uniformly *with replacement* from ``ops``, then applies each, in order, with
    probability ``p`` at magnitude ``m`` (see :func:`op_args`). Only the 10 caption-safe official ops exist
    (see ``AUGMENT_OPS``).

    Args:
        n: ops drawn per image.
        m: magnitude level, 0..``MAX_LEVEL`` (ALBEF 7, LAVIS 5).
        ops: names from ``AUGMENT_OPS``; duplicates weight an op more.
        p: probability that each drawn op is applied.
        generator: a ``random.Random`` or an int seed, for reproducible draws. ``None`` (the default) draws
            from the ``random`` module, which PyTorch's DataLoader seeds differently in each worker; a
            generator given here is copied into every worker and would repeat the same draws in each, so
            pass one only for single-process use (tests, previews).
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 7,
        ops: Sequence[str] = AUGMENT_OPS,
        p: float = 0.5,
        generator: random.Random | int | None = None,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"m must be in 0..{MAX_LEVEL}, got {m}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        unknown = [op for op in ops if op not in _OPS]
        if unknown:
            raise ValueError(
                f"unknown RandomAugment ops {unknown}; expected names from {list(AUGMENT_OPS)} "
                "(Color, Contrast, Solarize, Posterize and Cutout are excluded on purpose: they falsify colour words)"
            )
        if n > 0 and not ops:
            raise ValueError("ops is empty")
        self.n, self.m, self.ops, self.p = n, m, tuple(ops), p
        self.generator = random.Random(generator) if isinstance(generator, int) else generator

    def sample(self) -> list[tuple[str, tuple[float, ...]]]:
        """Draw one call's ops: the ``(name, args)`` that will be applied, in order (possibly none).

        The draw order follows the official: all ``n`` op choices first, then for each op the apply/skip draw
        and, only when applied, the sign draw.
        """
        rng: _Rng = self.generator if self.generator is not None else random
        chosen = rng.choices(self.ops, k=self.n) if self.n else []
        applied = []
        for name in chosen:
            if rng.random() < self.p:
                applied.append((name, op_args(name, self.m, rng)))
        return applied

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"RandomAugment expects a PIL image, got {type(img).__name__}")
        if img.mode not in _SUPPORTED_MODES:
            raise ValueError(
                f"RandomAugment expects an RGB or L image, got mode {img.mode!r}; call .convert('RGB')"
            )
        for name, args in self.sample():
            img = _OPS[name](img, *args)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m}, p={self.p}, ops={list(self.ops)})"


# ---------------------------------------------------------------------------------------------------------
# Pipelines (official dataset/__init__.py). Random crop and flip draw from torch's generator, RandomAugment
# from the ``random`` module: seed both (torch.manual_seed, random.seed) to repeat a pipeline's output.
# ---------------------------------------------------------------------------------------------------------


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _pipeline(first: T.RandomResizedCrop | T.Resize, hflip: bool, augment: bool) -> T.Compose:
    steps: list[Callable] = [first]
    if hflip:
        # The official flips although captions say "left"/"right"; hflip=False keeps them true.
        steps.append(T.RandomHorizontalFlip())
    if augment:
        steps.append(RandomAugment(2, 7))
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


def pretrain_transform(
    image_size: int, scale: tuple[float, float] = (0.2, 1.0), *, hflip: bool = True, augment: bool = True
) -> T.Compose:
    """Pre-training (and TA pre-training): RandomResizedCrop(scale 0.2-1) -> HFlip -> RandomAugment(2, 7)
    -> ToTensor -> Normalize(CLIP). Bicubic."""
    _check_size(image_size)
    crop = T.RandomResizedCrop(image_size, scale=scale, interpolation=_BICUBIC)
    return _pipeline(crop, hflip, augment)


def train_transform(
    image_size: int, scale: tuple[float, float] = (0.5, 1.0), *, hflip: bool = True, augment: bool = True
) -> T.Compose:
    """Fine-tuning (retrieval, VQA, NLVR2, SNLI-VE): as :func:`pretrain_transform` with crop scale 0.5-1."""
    return pretrain_transform(image_size, scale, hflip=hflip, augment=augment)


def grounding_train_transform(image_size: int, *, hflip: bool = True, augment: bool = True) -> T.Compose:
    """Grounding fine-tuning: Resize((s, s)) (no crop) -> HFlip -> RandomAugment(2, 7) -> ToTensor
    -> Normalize(CLIP). Bicubic."""
    _check_size(image_size)
    return _pipeline(T.Resize((image_size, image_size), interpolation=_BICUBIC), hflip, augment)


def eval_transform(image_size: int) -> T.Compose:
    """Validation/test for every task: Resize((s, s)) bicubic -> ToTensor -> Normalize(CLIP). Deterministic."""
    _check_size(image_size)
    return _pipeline(T.Resize((image_size, image_size), interpolation=_BICUBIC), hflip=False, augment=False)


_BUILDERS: dict[str, Callable[..., T.Compose]] = {
    "pretrain": pretrain_transform,
    "train": train_transform,
    "grounding_train": grounding_train_transform,
    "eval": eval_transform,
}
TRANSFORM_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_transform(name: str, image_size: int, **kw) -> T.Compose:
    """The pipeline called ``name`` ("pretrain" | "train" | "grounding_train" | "eval"); ``kw`` go to its
    builder (e.g. ``hflip=False``, ``augment=False``, ``scale=(0.3, 1.0)``)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown transform {name!r}; expected one of {', '.join(TRANSFORM_NAMES)}")
    return builder(image_size, **kw)
