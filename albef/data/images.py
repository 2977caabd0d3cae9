"""Opening images safely: inside the image root, decodable, RGB, upright, not a decompression bomb.

:func:`decode_rgb` is the one decoder: preprocessing, the datasets (raw folders and shards), ``albef
predict`` and the served MLflow pyfunc all call it, so a picture is the same pixels in training and in
serving. Its rules, in order:

1. EXIF orientation is applied (a phone photo stored sideways comes out upright).
2. High bit depth (16-bit greyscale ``I;16``, 32-bit ``I``, float ``F``) becomes 8 bits by its real range,
   decided by the largest value: at most 255 (a 16-bit file holding 8-bit values) the values are kept as
   they are; at most 65535 they are scaled by the 16-bit range (``v * 255 / 65535``); larger (32-bit data,
   no fixed range) by the image's own maximum. Float images whose values lie in 0..1 are scaled by 255.
   Negative values and NaN become 0. 16-bit RGB/RGBA PNGs, which Pillow reads by their high byte (the
   16-bit range), are read again by their low byte when every colour value is at most 255 (16-bit
   greyscale-with-alpha PNGs keep Pillow's high-byte reading).
3. Transparency (RGBA, LA, palette or greyscale/RGB with a transparent colour) is composited on white.
4. Palette, CMYK, greyscale and bilevel images are converted to RGB by Pillow (CMYK naively, without an
   ICC profile).

Every failure has a short reason code that the preprocessing report counts, with a message that is the
same on every run (no memory addresses):

``outside_root``  the path escapes the image root (``../``, an absolute path, a symlink pointing out)
``missing_file``  nothing at that path
``empty_file``    a zero-byte file
``corrupt_image`` a broken file: corrupt JPEG, truncated PNG, not an image at all
``unsupported_image`` a valid image Pillow cannot decode or convert (a float RGB TIFF, an unknown
                  compression, HEIF without a plugin, a mode without a conversion to RGB)
``decompression_bomb`` more pixels than ``max_pixels``
``too_small``     shorter side below ``min_side``
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail, not decode into a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Raised whenever the rules above change what pixels a file decodes to: preprocessing fingerprints it, so a
# rerun re-decodes images stored by an older decoder instead of calling them up to date.
DECODER_VERSION = 2
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# Pillow's wording when a valid file uses something it does not implement (as opposed to a broken file)
_UNSUPPORTED = re.compile(
    r"unknown pixel mode|unknown .*mode|not supported|unsupported|not available|not implemented|"
    r"cannot handle|unknown compression|unknown value",
    re.IGNORECASE,
)
# image formats Pillow does not read without a plugin: (ISO-BMFF brands, name) and (signature, name)
_BRANDS = (((b"heic", b"heix", b"hevc", b"heim", b"mif1", b"msf1"), "HEIF"), ((b"avif", b"avis"), "AVIF"))
_SIGNATURES = ((b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"))


def _other_format(data: bytes) -> str | None:
    """The name of an image format Pillow cannot read (without a plugin) that ``data`` starts like."""
    for brands, kind in _BRANDS:
        if data[4:8] == b"ftyp" and data[8:12] in brands:
            return kind
    return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), None)


@dataclass
class ImageProblem(Exception):
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing anything that leaves ``root`` (also through symlinks)."""
    if not relative or Path(relative).is_absolute():
        raise ImageProblem("outside_root", f"{relative!r} is not a relative path")
    root = root.resolve()
    candidate = root / relative
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise ImageProblem("outside_root", f"{relative}: cannot resolve ({exc})") from exc
    if not resolved.is_relative_to(root):
        raise ImageProblem(
            "outside_root", f"{relative} resolves to {resolved}, outside the image root {root}"
        )
    return resolved


def open_rgb(
    path: Path, min_side: int = 1, max_pixels: int = 64_000_000, max_side: int | None = None
) -> Image.Image:
    """Decode ``path`` fully into an upright RGB image (longest side at most ``max_side``), or raise
    :class:`ImageProblem`."""
    if not path.exists():
        raise ImageProblem("missing_file", str(path))
    if not path.is_file():
        raise ImageProblem("missing_file", f"{path} is not a file")
    return decode_rgb(path.read_bytes(), str(path), min_side, max_pixels, max_side)


def decode_rgb(
    data: bytes, name: str, min_side: int = 1, max_pixels: int = 64_000_000, max_side: int | None = None
) -> Image.Image:
    """The image file ``data`` (called ``name`` in messages) as an upright 8-bit RGB image, by the rules in
    the module's docstring; longest side at most ``max_side``. Raises :class:`ImageProblem`."""
    if not data:
        raise ImageProblem("empty_file", name)
    image = _load(data, name, min_side, max_pixels, max_side)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ImageProblem("corrupt_image", f"{name}: bad EXIF orientation ({_stable(exc)})") from exc
    image = to_rgb(image, name)
    return resize_longest(image, max_side) if max_side is not None else image


def _load(data: bytes, name: str, min_side: int, max_pixels: int, max_side: int | None) -> Image.Image:
    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageProblem(
                    "decompression_bomb", f"{name}: {width}x{height} pixels exceeds {max_pixels}"
                )
            if min(width, height) < min_side:
                raise ImageProblem("too_small", f"{name}: {width}x{height} < {min_side} px")
            if max_side is not None and max(width, height) > 2 * max_side:
                # JPEG: decode straight at 1/2, 1/4 or 1/8 scale (DCT scaling), never below twice the final
                # size, so the bicubic resize that follows still sees enough pixels. Many times faster.
                scale = max_side / max(width, height)
                image.draft("RGB", (2 * round(width * scale), 2 * round(height * scale)))
            rawmode = _png16_rawmode(image)
            image.load()
            if rawmode is not None:
                image = _png16_small_values(image, data, rawmode)
            return image
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("decompression_bomb", f"{name}: {_stable(exc)}") from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, name) from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        message = _stable(exc)
        if isinstance(exc, NotImplementedError) or _UNSUPPORTED.search(message):
            kind = f"{image.format} " if image is not None and image.format else ""
            raise ImageProblem(
                "unsupported_image", f"{name}: Pillow cannot decode this {kind}image ({message})"
            ) from exc
        raise ImageProblem("corrupt_image", f"{name}: {type(exc).__name__}: {message}") from exc


def _unidentified(data: bytes, name: str) -> ImageProblem:
    """Why no Pillow plugin opened ``data``: a format Pillow knows but not this variant of it (unsupported),
    a format Pillow lacks (unsupported), or a broken file / not an image (corrupt)."""
    Image.init()
    prefix = data[:16]
    for ident in Image.ID:
        factory, accept = Image.OPEN[ident]
        try:
            accepted = accept(prefix) if accept else False
            if isinstance(accepted, str):  # Pillow knows the format but lacks its codec ("WEBP support...")
                return ImageProblem(
                    "unsupported_image", f"{name}: Pillow cannot decode this {ident} image ({accepted})"
                )
            if not accepted:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                factory(io.BytesIO(data), "")
        except Exception as exc:
            message = _stable(exc) or type(exc).__name__
            # a header value Pillow has no entry for (an unknown TIFF compression...)
            if isinstance(exc.__cause__, KeyError):
                message = f"unknown value {_stable(exc.__cause__)} in its header"
            if isinstance(exc, NotImplementedError) or _UNSUPPORTED.search(message):
                return ImageProblem(
                    "unsupported_image", f"{name}: Pillow cannot decode this {ident} image ({message})"
                )
            return ImageProblem("corrupt_image", f"{name}: not a valid {ident} image ({message})")
    if kind := _other_format(data):
        return ImageProblem("unsupported_image", f"{name}: Pillow cannot decode {kind} images")
    return ImageProblem("corrupt_image", f"{name}: not an image file Pillow recognises")


def _stable(exc: BaseException) -> str:
    """The exception's message without what differs between runs (object reprs with memory addresses)."""
    message = re.sub(r"<[^<>]*? at 0x[0-9a-fA-F]+>", "<data>", str(exc))
    return re.sub(r"\b0x[0-9a-fA-F]{8,}\b", "0x…", message)


def _png16_rawmode(image: Image.Image) -> str | None:
    """The raw mode of a 16-bit RGB/RGBA PNG (which Pillow reads by the high byte of each value), else None."""
    if image.format != "PNG" or len(image.tile) != 1:
        return None
    rawmode = image.tile[0][3]
    return rawmode if rawmode in ("RGB;16B", "RGBA;16B") else None


def _png16_small_values(image: Image.Image, data: bytes, rawmode: str) -> Image.Image:
    """A 16-bit RGB(A) PNG whose colour values all fit in 8 bits read as those values (by the low bytes,
    alpha kept by its high byte); any other image as Pillow read it."""
    colours = image.getextrema()[:3]
    if any(high != 0 for _, high in colours):
        return image
    low = Image.open(io.BytesIO(data))
    tile = low.tile[0]
    swapped = rawmode.replace(";16B", ";16L")  # the little-endian unpacker takes the second byte: the low one
    low.tile = [tile._replace(args=swapped) if hasattr(tile, "_replace") else (*tile[:3], swapped)]
    low.load()
    if image.mode == "RGBA":
        low = Image.merge("RGBA", (*low.split()[:3], image.getchannel("A")))
    low.info = image.info
    low.format = image.format
    return low


def eight_bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image (``I;16*``, ``I``, ``F``) as 8-bit ``L`` by the rule in the module's
    docstring: values kept when the largest is at most 255, else scaled by 255/65535 (16-bit range) up to
    65535, else by 255/max; floats within 0..1 scaled by 255; negatives and NaN to 0."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    elif top <= 65535:
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / top
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    pixels = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)  # 2-D uint8: mode L


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB from any mode, by the rules in the module's docstring (transparency over white, high bit
    depth by its real range, palette, CMYK, greyscale); a mode Pillow cannot convert is an
    ``unsupported_image`` :class:`ImageProblem`."""
    mode = image.mode
    try:
        if mode in HIGH_BIT_MODES:
            image = eight_bit(image)
        # alpha: an alpha band, a transparent colour or palette entry, or a palette with alpha
        alpha = (
            image.mode in ALPHA_MODES
            or "transparency" in image.info
            or (image.mode == "P" and getattr(image.palette, "mode", "") == "RGBA")
        )
        if image.mode == "RGB" and not alpha:
            return image
        if alpha:
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError, TypeError) as exc:
        raise ImageProblem(
            "unsupported_image", f"{name}: Pillow cannot convert mode {mode} to RGB ({_stable(exc)})"
        ) from exc


def resize_longest(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longest side is at most ``max_side`` (bicubic, aspect kept); never enlarge."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
