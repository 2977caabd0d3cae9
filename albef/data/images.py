"""Opening images safely: inside the image root, decodable, RGB, upright, not a decompression bomb.

Every failure has a short reason code that the preprocessing report counts:

``outside_root``  the path escapes the image root (``../``, an absolute path, a symlink pointing out)
``missing_file``  nothing at that path
``empty_file``    a zero-byte file
``corrupt_image`` Pillow cannot decode it (corrupt JPEG, truncated PNG, not an image)
``decompression_bomb`` more pixels than ``max_pixels``
``too_small``     shorter side below ``min_side``
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

# A truncated file must fail, not decode into a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False


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
    data = path.read_bytes()
    if not data:
        raise ImageProblem("empty_file", str(path))
    return decode_rgb(data, str(path), min_side, max_pixels, max_side)


def decode_rgb(
    data: bytes, name: str, min_side: int = 1, max_pixels: int = 64_000_000, max_side: int | None = None
) -> Image.Image:
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
            image.load()
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem("decompression_bomb", f"{name}: {exc}") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ImageProblem("corrupt_image", f"{name}: {type(exc).__name__}: {exc}") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise ImageProblem("corrupt_image", f"{name}: bad EXIF orientation ({exc})") from exc
    image = to_rgb(image)
    return resize_longest(image, max_side) if max_side is not None else image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB from any mode: greyscale, palette (with transparency), CMYK, 16-bit, with alpha over white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


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
