"""The world of the synthetic benchmark: its vocabulary, scenes of shapes and their rendering."""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import permutations
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (20, 175, 40),
    "blue": (35, 75, 220),
    "yellow": (245, 215, 30),
    "purple": (150, 30, 215),
    "orange": (250, 135, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES: dict[str, float] = {"small": 0.11, "big": 0.17}  # circumradius as a fraction of the image size: at the
# model's 48 pixels a small shape spans about 10 pixels, enough to tell its shape
BACKGROUNDS: tuple[str, ...] = ("gradient", "stripes", "checker", "noise")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
CONVERSE: dict[str, str] = {"left": "right", "right": "left", "above": "below", "below": "above"}

# Surface forms. The first entry is the canonical word (used in VQA answers and category names).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk"),
    "square": ("square",),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus sign"),
}
GENERIC_WORDS: tuple[str, ...] = ("shape", "object")
PLURALS: dict[str, str] = {  # "circle" -> "circles", "cross" -> "crosses", "plus sign" -> "plus signs"
    word: word + ("es" if word.endswith("s") else "s")
    for word in (*(w for words in SHAPE_WORDS.values() for w in words), *GENERIC_WORDS)
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"big": ("big", "large"), "small": ("small", "little")}
REL_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
EXTREMES: dict[str, tuple[str, int, int]] = {  # word -> (canonical, axis 0=x 1=y, sign: -1 = minimum)
    "leftmost": ("left", 0, -1),
    "rightmost": ("right", 0, 1),
    "topmost": ("top", 1, -1),
    "bottommost": ("bottom", 1, 1),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "gradient": ("a gradient background", "a smooth gradient"),
    "stripes": ("a striped background", "stripes"),
    "checker": ("a checkered background", "a checkerboard"),
    "noise": ("a noisy background", "a mottled background"),
}
NUMBER_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PREFIXES: tuple[str, ...] = (
    "there is",
    "we see",
    "the picture shows",
    "an image of",
    "a picture of",
    "this image contains",
    "you can see",
    "a drawing of",
    "",
)

# Scene geometry, as fractions of the image size.
CRISP = 0.06  # minimum centre difference on each axis between any two objects
GAP = 0.04  # minimum free space between the bounding circles of two objects
MARGIN = 0.03  # minimum distance between a bounding circle and the border
CIRCLE_SCALE = 0.9  # a circle's radius relative to the circumradius of the other shapes
N_OBJECTS_P = (0.05, 0.3, 0.35, 0.3)  # probability of 1, 2, 3, 4 objects (few single-object scenes: their
# captions are the least specific)
MAX_ROTATION = {
    "circle": 0,
    "square": 12,
    "triangle": 12,
    "star": 36,
    "diamond": 6,
    "hexagon": 30,
    "cross": 12,
}

SPLITS: tuple[str, ...] = (  # the position of a split is its code in the per-image RNG seeds: append only
    "pretrain",
    "retrieval_train",
    "retrieval_val",
    "retrieval_test",
    "vqa_train",
    "vqa_test",
    "ve_train",
    "ve_dev",
    "ve_test",
    "nlvr_train",
    "nlvr_dev",
    "nlvr_test",
    "grounding_train",
    "grounding_val",
    "grounding_test",
    "shifted_test",  # the out-of-distribution retrieval test set (zero-shot transfer)
)
SHIFTED_SPLITS: tuple[str, ...] = ("shifted_test",)

# The shifted split's distribution: more objects per scene and another "camera".
SHIFT_N_OBJECTS_P = (0.0, 0.0, 0.3, 0.7)  # probability of 1, 2, 3, 4 objects (in-domain: N_OBJECTS_P)
SHIFT_CONTRAST = (0.6, 0.8)  # contrast factor range (1: unchanged); colours stay nearest their names
SHIFT_BLUR = (0.4, 0.8)  # Gaussian blur radius range, pixels

VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
VQA_TYPES: tuple[str, ...] = ("color", "shape", "count", "existence", "relation")


def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (n, 2) of a shape with circumradius 1, centred at the origin, y pointing down."""

    def ring(n: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> np.ndarray:
        angles = np.deg2rad(start_deg + np.arange(n) * 360.0 / n)
        r = np.resize(np.asarray(radii, dtype=np.float64), n)
        return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

    if shape == "square":
        return ring(4, 45.0)
    if shape == "triangle":
        return ring(3, -90.0)
    if shape == "star":
        return ring(10, -90.0, (1.0, 0.45))
    if shape == "hexagon":
        return ring(6, 0.0)
    if shape == "diamond":
        return np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)])
    if shape == "cross":  # an arm's three vertices, then each quarter turn of them: (x, y) -> (-y, x)
        w = 0.34  # half an arm's width
        arm = np.array([(-w, -1.0), (w, -1.0), (w, -w)])
        turn = np.array([[0.0, 1.0], [-1.0, 0.0]])
        return np.concatenate([arm @ np.linalg.matrix_power(turn, k) for k in range(4)])
    raise ValueError(f"no polygon for shape {shape!r}")


_POLYGONS: dict[str, np.ndarray] = {s: _unit_polygon(s) for s in SHAPES if s != "circle"}


# ----------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One shape. ``x, y`` is the centre in pixels, ``r`` the circumradius, ``bbox`` the tight box
    ``[x, y, w, h]`` of what is drawn (COCO convention)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    r: float
    angle: float = 0.0

    def outline(self) -> np.ndarray:
        """Polygon vertices in pixels (circles: none, see :meth:`bbox`)."""
        poly = _POLYGONS[self.shape]
        a = math.radians(self.angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        return poly @ rot.T * self.r + np.array([self.x, self.y])

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        if self.shape == "circle":
            rc = self.r * CIRCLE_SCALE
            x0, y0, x1, y1 = self.x - rc, self.y - rc, self.x + rc, self.y + rc
        else:
            pts = self.outline()
            (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
        return (round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2))


@dataclass(frozen=True)
class Desc:
    """A description of objects: any of shape, colour, size (None = unconstrained)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        return (
            (self.shape is None or o.shape == self.shape)
            and (self.color is None or o.color == self.color)
            and (self.size is None or o.size == self.size)
        )


@dataclass(frozen=True)
class Scene:
    """Objects on a background. ``seed`` drives every random choice of :func:`render` (background
    parameters, colour jitter, pixel noise), so a scene renders to the same pixels every time."""

    objects: tuple[Obj, ...]
    background: str
    size: int
    seed: int

    def select(self, desc: Desc) -> list[Obj]:
        return [o for o in self.objects if desc.matches(o)]

    def count(self, desc: Desc) -> int:
        return sum(desc.matches(o) for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return {
            "background": self.background,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "x": round(o.x, 2),
                    "y": round(o.y, 2),
                    "r": round(o.r, 2),
                    "bbox": list(o.bbox),
                }
                for o in self.objects
            ],
        }


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
    """Whether ``a`` is ``rel`` (left/right/above/below) of ``b``, by centres."""
    if rel == "left":
        return a.x < b.x
    if rel == "right":
        return a.x > b.x
    if rel == "above":
        return a.y < b.y
    if rel == "below":
        return a.y > b.y
    raise ValueError(f"unknown relation {rel!r}")


@dataclass(frozen=True)
class Rel:
    """The existential statement "some ``d1`` is ``rel`` some (other) ``d2``"."""

    d1: Desc
    rel: str
    d2: Desc

    def holds(self, scene: Scene) -> bool:
        return any(
            a is not b and self.d1.matches(a) and self.d2.matches(b) and relation_holds(a, self.rel, b)
            for a in scene.objects
            for b in scene.objects
        )


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.random() * len(seq))]  # 2x faster than rng.integers for a scalar


def _place(rng: np.random.Generator, radii: Sequence[float], size: int) -> list[tuple[float, float]] | None:
    """Rejection-sample centres: bounding circles apart by ``GAP``, inside the image by ``MARGIN``, and
    centres apart by ``CRISP`` on both axes. None when it does not succeed quickly."""
    gap, crisp, margin = GAP * size, CRISP * size, MARGIN * size
    for _ in range(20):
        placed: list[tuple[float, float, float]] = []
        for r in radii:
            lo, hi = r + margin, size - r - margin
            for _ in range(60):
                x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                if all(
                    math.hypot(x - px, y - py) >= r + pr + gap
                    and abs(x - px) >= crisp
                    and abs(y - py) >= crisp
                    for px, py, pr in placed
                ):
                    placed.append((x, y, r))
                    break
            else:
                break
        if len(placed) == len(radii):
            return [(x, y) for x, y, _ in placed]
    return None


def make_scene(
    rng: np.random.Generator,
    image_size: int = 96,
    n_objects: int | None = None,
    include: Sequence[tuple[str, str, str]] = (),
    n_objects_p: Sequence[float] = N_OBJECTS_P,
) -> Scene:
    """Sample a scene of 1-4 non-overlapping objects.

    Args:
        rng: the only source of randomness.
        image_size: side of the square image in pixels.
        n_objects: number of objects (sampled from ``N_OBJECTS_P`` when None).
        include: ``(shape, color, size)`` specs that must appear (used to correlate NLVR2 pairs).
        n_objects_p: probabilities of 1, 2, ... objects (the shifted split's differ).
    """
    n = int(rng.choice(len(n_objects_p), p=n_objects_p)) + 1 if n_objects is None else n_objects
    n = max(n, len(include))
    for attempt in range(100):
        k = max(n - attempt // 10, 1)  # after repeated failures, fewer objects (``include`` is a hint)
        specs = list(include)[:k]
        while len(specs) < k:
            specs.append((pick(rng, SHAPES), pick(rng, tuple(COLORS)), pick(rng, tuple(SIZES))))
        order = rng.permutation(k)
        specs = [specs[i] for i in order]
        radii = [SIZES[sz] * image_size for _, _, sz in specs]
        centres = _place(rng, radii, image_size)
        if centres is not None:
            break
    else:  # pragma: no cover - a single small object always fits
        raise RuntimeError("could not place the objects of a scene")
    objects = tuple(
        Obj(sh, col, sz, x, y, r, float(rng.uniform(-MAX_ROTATION[sh], MAX_ROTATION[sh])))
        for (sh, col, sz), r, (x, y) in zip(specs, radii, centres)
    )
    background = pick(rng, BACKGROUNDS)
    return Scene(objects, background, image_size, int(rng.integers(2**62)))


def make_twins(rng: np.random.Generator, image_size: int = 96) -> tuple[Scene, Scene, Rel, Rel]:
    """An attribute-swapped twin pair ``(a, b, rel_a, rel_b)``: ``b`` is ``a`` with the colours of two
    objects exchanged (new background and noise); ``rel_a`` holds in ``a`` only and ``rel_b`` in ``b``
    only, and both read with exactly the same words ("a red circle left of a blue square" / "a blue
    circle left of a red square")."""
    while True:
        a = make_scene(rng, image_size, n_objects=int(rng.integers(2, 5)))
        pairs = [
            (i, j)
            for i, j in permutations(range(len(a.objects)), 2)
            if a.objects[i].color != a.objects[j].color and a.objects[i].shape != a.objects[j].shape
        ]
        for p in rng.permutation(len(pairs)):
            i, j = pairs[p]
            oi, oj = a.objects[i], a.objects[j]
            objects = list(a.objects)
            objects[i], objects[j] = replace(oi, color=oj.color), replace(oj, color=oi.color)
            b = Scene(tuple(objects), pick(rng, BACKGROUNDS), image_size, int(rng.integers(2**62)))
            rel = pick(rng, [r for r in RELATIONS if relation_holds(oi, r, oj)])
            rel_a = Rel(Desc(oi.shape, oi.color), rel, Desc(oj.shape, oj.color))
            rel_b = Rel(Desc(oi.shape, oj.color), rel, Desc(oj.shape, oi.color))
            if rel_a.holds(a) and not rel_a.holds(b) and rel_b.holds(b) and not rel_b.holds(a):
                return a, b, rel_a, rel_b


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def _muted_colors(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """``n`` low-saturation, mid-value colours of one hue family: far from every object colour."""
    hue = float(rng.uniform())
    value = float(rng.uniform(0.42, 0.62))
    out = []
    for _ in range(n):
        h = (hue + float(rng.uniform(-0.08, 0.08))) % 1.0
        s = float(rng.uniform(0.05, 0.22))  # every object colour stays >= 100 away (RGB)
        v = min(max(value + float(rng.uniform(-0.1, 0.1)), 0.35), 0.72)
        out.append(np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0)
    return out


@functools.cache
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _background(kind: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """A ``side x side x 3`` float32 background of the given kind."""
    c0, c1 = _muted_colors(rng, 2)
    yy, xx = _grid(side)
    theta = float(rng.uniform(0, math.pi))
    proj = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif kind == "stripes":
        period = float(rng.uniform(0.08, 0.2))
        t = np.clip(0.5 + 1.5 * np.sin(2 * math.pi * proj / period), 0.0, 1.0)
    elif kind == "checker":
        cells = int(rng.integers(4, 10))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    elif kind == "noise":
        g = int(rng.integers(3, 8))
        coarse = Image.fromarray((rng.uniform(size=(g, g)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    else:
        raise ValueError(f"unknown background {kind!r}")
    return c0 * (1.0 - t[..., None]) + c1 * t[..., None]


def render(scene: Scene) -> Image.Image:
    """Draw a scene: the shapes at 2x on the background, downsampled by 2 for anti-aliasing, then mild
    pixel noise. (Nearest 2x upsampling followed by 2x2 averaging leaves the background unchanged.)"""
    rng = np.random.default_rng(scene.seed)
    side = 2 * scene.size
    background = Image.fromarray(_background(scene.background, scene.size, rng).astype(np.uint8))
    canvas = background.resize((side, side), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        rgb = np.clip(np.array(COLORS[o.color]) + rng.integers(-10, 11, size=3), 0, 255)
        fill = tuple(int(c) for c in rgb)
        if o.shape == "circle":
            rc = o.r * CIRCLE_SCALE
            draw.ellipse([2 * (o.x - rc), 2 * (o.y - rc), 2 * (o.x + rc), 2 * (o.y + rc)], fill=fill)
        else:
            draw.polygon([(2 * px, 2 * py) for px, py in o.outline()], fill=fill)
    small = np.asarray(canvas.reduce(2), dtype=np.int16)
    noise = rng.integers(-4, 5, size=small.shape, dtype=np.int16)  # uniform: much cheaper than normal
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8), "RGB")


def render_shifted(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The shifted split's "camera": :func:`render`, then lower contrast and a slight blur."""
    image = ImageEnhance.Contrast(render(scene)).enhance(float(rng.uniform(*SHIFT_CONTRAST)))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(*SHIFT_BLUR))))
