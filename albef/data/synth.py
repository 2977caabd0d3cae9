"""A deterministic synthetic image-text benchmark (ShapeWorld/CLEVR style) in the official ALBEF formats.

Every image is a scene of 1-4 flat shapes (7 shapes, 8 colours, 2 sizes) on a muted, textured background.
Every text (captions, VQA questions and answers, SNLI-VE hypotheses, NLVR2 statements, referring
expressions) is produced from the scene by a small grammar, and its truth is a function of the scene
metadata, which ``scenes.json`` records for every image. The annotation files follow the official schemas
(``ALBEF-SPEC.md`` §4.1) so the same pipeline runs on this data and on the real datasets.

Semantics (CLEVR-like, documented in the data card):
    * "A left of B" compares object centres: ``A.x < B.x`` (image y grows downwards, so "above" is
      ``A.y < B.y``). Scenes are sampled so that every pair of objects differs by at least ``CRISP`` x the
      image size on both axes, so every relation is either clearly true or clearly false.
    * An indefinite statement ("a red circle left of a blue square") is existential: some red circle is
      left of some blue square. A definite one ("the red circle") presupposes exactly one such object.
    * A count ("two red circles") is exact.
    * An SNLI-VE hypothesis is a definite claim ("the big object is red") about whichever object its subject
      means: entailment when all of them have the value, contradiction when none has, neutral when some have
      and some have not. Each picture's three hypotheses share one form, so the words do not give the label
      away: the label needs the picture.
    * Captions describe the whole scene (every object, or a relation after a listing of the other objects),
      so that a caption is true of few images besides its own.

Bag of words is not enough: some image pairs are attribute-swapped twins (the same layout with the colours
of two objects exchanged), and each twin carries the near-miss text of the other (for example "a red circle
left of a blue square" versus "a blue circle left of a red square": the same words, different images), in
every split.

Determinism: every image draws from ``numpy.random.default_rng([seed, split_code, index, stream])``, so any
split of the work across processes gives the same bytes; JSON is written with sorted keys and fixed
separators. ``workers`` does not change any output byte.

Cross-dataset transfer (the paper's COCO-finetuned model evaluated zero-shot on Flickr30K): the split
``shifted_test`` (``shifted_test.json``, the official retrieval_eval format) is drawn from another
distribution than every other split, which no training stage reads: busier scenes (``SHIFT_N_OBJECTS_P``)
photographed by another "camera" (lower contrast and a slight blur, ``SHIFT_CONTRAST``, ``SHIFT_BLUR``), with
captions from the same grammar. Its scenes go to ``scenes_shifted.json``; adding it leaves every other file
of the benchmark byte for byte as before except the data card, which counts it.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
import multiprocessing
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

from albef.data.text import pre_caption

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
PLURALS: dict[str, str] = {
    "circle": "circles",
    "disk": "disks",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "rhombus": "rhombuses",
    "hexagon": "hexagons",
    "cross": "crosses",
    "plus sign": "plus signs",
    "shape": "shapes",
    "object": "objects",
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
BACKGROUND_ADJECTIVES: dict[str, str] = {
    "gradient": "a smooth gradient",
    "stripes": "striped",
    "checker": "checkered",
    "noise": "mottled",
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
    if shape == "cross":
        w = 0.34
        return np.array(
            [
                (-w, -1),
                (w, -1),
                (w, -w),
                (1, -w),
                (1, w),
                (w, w),
                (w, 1),
                (-w, 1),
                (-w, w),
                (-1, w),
                (-1, -w),
                (-w, -w),
            ],
            dtype=np.float64,
        )
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


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
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
            specs.append((_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, tuple(SIZES))))
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
    background = _pick(rng, BACKGROUNDS)
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
            b = Scene(tuple(objects), _pick(rng, BACKGROUNDS), image_size, int(rng.integers(2**62)))
            rel = _pick(rng, [r for r in RELATIONS if relation_holds(oi, r, oj)])
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


# ----------------------------------------------------------------------------------------------------------
# Surface text
# ----------------------------------------------------------------------------------------------------------


def _noun(desc: Desc, rng: np.random.Generator, plural: bool = False) -> str:
    word = _pick(rng, SHAPE_WORDS[desc.shape] if desc.shape else GENERIC_WORDS)
    return PLURALS[word] if plural else word


def np_text(desc: Desc, rng: np.random.Generator, plural: bool = False) -> str:
    """A bare noun phrase: ``[size] [colour] noun`` ("big red circle", "red objects")."""
    words = []
    if desc.size:
        words.append(_pick(rng, SIZE_WORDS[desc.size]))
    if desc.color:
        words.append(desc.color)
    words.append(_noun(desc, rng, plural))
    return " ".join(words)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _counted(n: int, desc: Desc, rng: np.random.Generator) -> str:
    """ "a red circle", "two red circles", "no red circles"."""
    return _a(np_text(desc, rng)) if n == 1 else f"{NUMBER_WORDS[n]} {np_text(desc, rng, plural=True)}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _with_prefix(rng: np.random.Generator, body: str, plural: bool = False) -> str:
    prefix = _pick(rng, CAPTION_PREFIXES)
    if prefix == "there is" and plural:
        prefix = "there are"
    return f"{prefix} {body}" if prefix else body


def relation_text(rel: Rel, rng: np.random.Generator, style: str = "caption", prefix: bool = True) -> str:
    """Text of an existential relation. ``style``: ``caption`` (with a caption prefix unless not ``prefix``,
    possibly the converse), ``statement`` (a full sentence), ``question`` (a yes/no question) or
    ``nlvr:<side>``. The random choices do not depend on the words, so two relations that differ only in
    their colours (twins) get texts with the same words."""
    rel_words = _pick(rng, REL_WORDS[rel.rel])
    np1, np2 = _a(np_text(rel.d1, rng)), _a(np_text(rel.d2, rng))
    form = int(rng.integers(3))
    if style == "caption":
        if form == 1:
            return f"{np1} is {rel_words} {np2}"
        if form == 0:
            body = f"{np1} {rel_words} {np2}"
        else:
            body = f"{np2} {_pick(rng, REL_WORDS[CONVERSE[rel.rel]])} {np1}"
        return _with_prefix(rng, body) if prefix else body
    if style == "statement":
        return f"there is {np1} {rel_words} {np2}" if form == 0 else f"{np1} is {rel_words} {np2}"
    if style == "question":
        return f"is there {np1} {rel_words} {np2}?"
    if style.startswith("nlvr:"):
        return f"in the {style[5:]} image {np1} is {rel_words} {np2}"
    raise ValueError(f"unknown style {style!r}")


def _desc_of(o: Obj, rng: np.random.Generator, forms: Sequence[str] = ("cs", "cs", "zcs", "zs", "s")) -> Desc:
    """A description that matches ``o``: forms are letters z (size), c (colour), s (shape)."""
    form = _pick(rng, forms)
    return Desc(
        o.shape if "s" in form else None, o.color if "c" in form else None, o.size if "z" in form else None
    )


def _absent_desc(
    scene: Scene, rng: np.random.Generator, forms: Sequence[str] = ("s", "cs", "cs", "zcs")
) -> Desc:
    """A description that matches no object of the scene, of a form drawn once: redrawing the form too would
    favour the specific forms (a "big red circle" is more often absent than a "circle"), a hint in the words."""
    form = _pick(rng, forms)
    for _ in range(100):
        desc = Desc(
            _pick(rng, SHAPES) if "s" in form else None,
            _pick(rng, tuple(COLORS)) if "c" in form else None,
            _pick(rng, tuple(SIZES)) if "z" in form else None,
        )
        if scene.count(desc) == 0:
            return desc
    shape = next(s for s in SHAPES if scene.count(Desc(s)) == 0)  # 7 shapes, at most 4 objects
    return Desc(shape, next(c for c in COLORS if scene.count(Desc(color=c)) == 0) if "c" in form else None)


def unique_descs(scene: Scene, o: Obj, with_color: bool = True) -> list[Desc]:
    """Descriptions that pick out exactly ``o`` in the scene ("the circle", "the big red circle", ...)."""
    forms = [
        Desc(o.shape),
        Desc(o.shape, size=o.size),
        Desc(o.shape, o.color),
        Desc(o.shape, o.color, o.size),
        Desc(color=o.color),
        Desc(size=o.size),
    ]
    return [d for d in forms if (with_color or d.color is None) and scene.count(d) == 1]


# ----------------------------------------------------------------------------------------------------------
# Captions (pretraining and retrieval)
# ----------------------------------------------------------------------------------------------------------


def _listing(objects: Sequence[Obj], rng: np.random.Generator, with_size: bool) -> tuple[str, bool]:
    """Every object of ``objects`` by colour and shape (and size), grouped with their counts, in random order
    ("a big red circle, two blue squares and a green star"); and whether the first group is plural."""
    groups: Counter[Desc] = Counter(Desc(o.shape, o.color, o.size if with_size else None) for o in objects)
    items = list(groups.items())
    items = [items[i] for i in rng.permutation(len(items))]
    return _join([_counted(n, d, rng) for d, n in items]), items[0][1] > 1


def _cap_listing(scene: Scene, rng: np.random.Generator) -> str | None:
    body, plural = _listing(scene.objects, rng, with_size=bool(rng.random() < 0.5))
    if rng.random() < 0.4:
        body += " on " + _pick(rng, BACKGROUND_WORDS[scene.background])
    return _with_prefix(rng, body, plural=plural)


def _relation_caption(rel: Rel, rest: Sequence[Obj], rng: np.random.Generator, with_size: bool) -> str:
    """A relation between two objects after a listing of the scene's other objects ``rest`` ("a green star,
    and a red circle left of a blue square"): the whole scene in one caption. The random choices do not
    depend on the words, so twins (same ``rest``, swapped colours in ``rel``) get the same words."""
    if not rest:
        return relation_text(rel, rng, "caption")
    listing, plural = _listing(rest, rng, with_size)
    return _with_prefix(rng, f"{listing}, and " + relation_text(rel, rng, "caption", prefix=False), plural)


def _cap_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    if len(scene.objects) < 2:
        return None
    i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
    a, b = scene.objects[i], scene.objects[j]
    rel = _pick(rng, [r for r in RELATIONS if relation_holds(a, r, b)])
    with_size = bool(rng.random() < 0.5)
    forms = ("zcs",) if with_size else ("cs",)
    rest = [o for k, o in enumerate(scene.objects) if k not in (i, j)]
    return _relation_caption(Rel(_desc_of(a, rng, forms), rel, _desc_of(b, rng, forms)), rest, rng, with_size)


CAPTION_KINDS: dict[str, Callable[[Scene, np.random.Generator], str | None]] = {
    "listing": _cap_listing,
    "relation": _cap_relation,
}


def captions(scene: Scene, rng: np.random.Generator, k: int, near_miss: str | None = None) -> list[str]:
    """``k`` distinct true captions, in random order, each of which describes the whole scene: listings of
    every object and relations between two objects after a listing of the others (vague captions such as "a
    blue object" or "four shapes" are true of many images, which caps retrieval and makes in-batch negatives
    true matches). ``near_miss`` (a twin's relation caption) replaces the first relation caption."""
    out = [near_miss] if near_miss else []
    kinds = [kind for kind in CAPTION_KINDS if not (near_miss and kind == "relation")]
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    for attempt in range(200):
        if len(out) >= k:
            break
        kind = order[attempt] if attempt < len(order) else _pick(rng, tuple(CAPTION_KINDS))
        text = CAPTION_KINDS[kind](scene, rng)
        if text and text not in out:
            out.append(text)
    return [out[i] for i in rng.permutation(len(out))][:k]


# ----------------------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    text: str
    answer: str  # canonical answer
    qtype: str  # one of VQA_TYPES
    atype: str  # VQA answer type: "yes/no", "number", "other"


COLOR_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "purple"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "white"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
    "white": ("yellow", "gray"),
    "black": ("gray", "purple"),
}
SHAPE_CONFUSIONS: dict[str, tuple[str, ...]] = {
    "circle": ("disk", "hexagon"),
    "square": ("diamond", "rectangle"),
    "triangle": ("diamond",),
    "star": ("cross",),
    "diamond": ("rhombus", "square"),
    "hexagon": ("circle",),
    "cross": ("plus sign", "plus", "star"),
}


def vqa_answers(q: Question, rng: np.random.Generator) -> list[str]:
    """Ten human-like answers: mostly the canonical one, sometimes a few alternatives or mistakes (at most
    3, so the canonical answer always has at least 7 of the 10 votes)."""
    n_noisy = int(_pick(rng, (0, 0, 0, 1, 1, 2, 3)))
    noisy = []
    for _ in range(n_noisy):
        if q.atype == "yes/no":
            noisy.append("no" if q.answer == "yes" else "yes")
        elif q.atype == "number":
            n = int(q.answer)
            noisy.append(NUMBER_WORDS[n] if rng.random() < 0.5 else str(max(n + _pick(rng, (-1, 1)), 0)))
        elif q.qtype == "color":
            noisy.append(_pick(rng, COLOR_CONFUSIONS[q.answer]))
        else:
            noisy.append(_pick(rng, SHAPE_CONFUSIONS[q.answer]))
    answers = [q.answer] * (10 - n_noisy) + noisy
    return [answers[i] for i in rng.permutation(10)]


def _q_color(scene: Scene, rng: np.random.Generator) -> Question | None:
    o = _pick(rng, scene.objects)
    descs = unique_descs(scene, o, with_color=False)
    if descs:
        subject = np_text(_pick(rng, descs), rng)
    else:
        candidates = [
            w for w, (_, axis, sign) in EXTREMES.items() if _is_extreme(scene, o, Desc(), axis, sign)
        ]
        if not candidates:
            return None
        subject = f"{_pick(rng, tuple(candidates))} {_pick(rng, GENERIC_WORDS)}"
    template = _pick(
        rng, ("what color is the {}?", "which color does the {} have?", "what is the color of the {}?")
    )
    return Question(template.format(subject), o.color, "color", "other")


def _q_shape(scene: Scene, rng: np.random.Generator) -> Question | None:
    options: list[tuple[str, str]] = []
    for o in scene.objects:
        if scene.count(Desc(color=o.color)) == 1:
            options.append((f"what shape is the {o.color} object?", o.shape))
        for ref in scene.objects:
            if ref is o:
                continue
            ref_descs = unique_descs(scene, ref)
            if not ref_descs:
                continue
            for rel in RELATIONS:
                hits = [t for t in scene.objects if t is not ref and relation_holds(t, rel, ref)]
                if hits == [o]:
                    ref_text = np_text(_pick(rng, ref_descs), rng)
                    options.append((f"what shape is {_pick(rng, REL_WORDS[rel])} the {ref_text}?", o.shape))
    if not options:
        return None
    text, answer = _pick(rng, options)
    return Question(text, answer, "shape", "other")


def _q_count(scene: Scene, rng: np.random.Generator) -> Question:
    # The description's form first ("" is every object), then the answer uniformly over the counts that form
    # offers in this scene, then a description with that count: drawn the other way round most answers would
    # be "1", which the question's words alone would guess.
    form = _pick(rng, ("s", "cs", "c", "zs", ""))
    descs = [_desc_of(o, rng, (form,)) for o in scene.objects]
    if form:
        descs.append(_absent_desc(scene, rng, (form,)))
    by_count: dict[int, list[Desc]] = {}
    for d in descs:
        by_count.setdefault(scene.count(d), []).append(d)
    desc = _pick(rng, by_count[_pick(rng, sorted(by_count))])
    template = _pick(
        rng, ("how many {} are there?", "how many {} can you see?", "how many {} are in the picture?")
    )
    return Question(
        template.format(np_text(desc, rng, plural=True)), str(scene.count(desc)), "count", "number"
    )


def _q_existence(scene: Scene, rng: np.random.Generator) -> Question:
    present = bool(rng.random() < 0.5)
    forms = ("s", "cs", "zcs")  # the same for present and absent objects: the words do not hint at the answer
    desc = _desc_of(_pick(rng, scene.objects), rng, forms) if present else _absent_desc(scene, rng, forms)
    if rng.random() < 0.5:
        text = f"is there {_a(np_text(desc, rng))}?"
    else:
        text = f"are there any {np_text(desc, rng, plural=True)}?"
    return Question(text, "yes" if present else "no", "existence", "yes/no")


def _q_relation(scene: Scene, rng: np.random.Generator) -> Question | None:
    if len(scene.objects) < 2:
        return None
    want = bool(rng.random() < 0.5)
    definite = [(o, unique_descs(scene, o)) for o in scene.objects]
    definite = [(o, [d for d in ds if d.shape]) for o, ds in definite]
    definite = [(o, ds) for o, ds in definite if ds]
    if len(definite) >= 2:
        i, j = (int(k) for k in rng.choice(len(definite), size=2, replace=False))
        (a, da), (b, db) = definite[i], definite[j]
        rel = _pick(rng, RELATIONS)
        if relation_holds(a, rel, b) != want:
            rel = CONVERSE[rel]
        text = f"is the {np_text(_pick(rng, da), rng)} {_pick(rng, REL_WORDS[rel])} the {np_text(_pick(rng, db), rng)}?"
        return Question(text, "yes" if want else "no", "relation", "yes/no")
    rel = _true_or_false_rel(scene, rng, want)
    if rel is None:
        return None
    return Question(relation_text(rel, rng, "question"), "yes" if want else "no", "relation", "yes/no")


def _true_or_false_rel(scene: Scene, rng: np.random.Generator, truth: bool) -> Rel | None:
    """An existential relation with the given truth value in the scene (None if none was found). The forms of
    the two descriptions are drawn once, whatever the truth: false relations are easier to find between
    specific descriptions, and redrawing the forms would let them hint at the truth."""
    if len(scene.objects) < 2:
        return None
    forms = [(_pick(rng, ("cs", "s", "zcs")),), (_pick(rng, ("cs", "s", "zcs")),)]
    for _ in range(30):
        i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
        a, b = scene.objects[i], scene.objects[j]
        rel = _pick(rng, [r for r in RELATIONS if relation_holds(a, r, b) == truth])
        cand = Rel(_desc_of(a, rng, forms[0]), rel, _desc_of(b, rng, forms[1]))
        if cand.holds(scene) == truth:
            return cand
    return None


def vqa_questions(scene: Scene, rng: np.random.Generator, near_miss: Sequence[str] = ()) -> list[Question]:
    """One question per type where the scene allows it. ``near_miss``: for a twin, the two existential
    relation questions of the pair as ``(text_true_here, text_false_here)`` replace the relation type."""
    qs = [_q_color(scene, rng), _q_shape(scene, rng), _q_count(scene, rng), _q_existence(scene, rng)]
    if near_miss:
        qs += [
            Question(near_miss[0], "yes", "relation", "yes/no"),
            Question(near_miss[1], "no", "relation", "yes/no"),
        ]
    else:
        qs.append(_q_relation(scene, rng))
    return [q for q in qs if q is not None]


# ----------------------------------------------------------------------------------------------------------
# SNLI-VE
# ----------------------------------------------------------------------------------------------------------

# The subjects of the definite claims: which of (size, colour, shape) the description names.
CLAIM_SUBJECTS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color",),
    ("size",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
)
CLAIM_VALUES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}


@dataclass(frozen=True)
class Claim:
    """The definite claim "the <subject> is <value>" ("the big object is red", "the red shape is a circle").

    It is about whichever object the subject means, so its label needs the picture: entailment when every
    object the subject describes has the value, contradiction when none has, neutral when some have and some
    have not (the picture cannot tell which one the sentence is about). The same words take each label in
    some picture, so the hypothesis alone does not give the label away."""

    subject: Desc
    attribute: str  # "color", "shape" or "size"
    value: str

    def label(self, scene: Scene) -> str:
        referents = scene.select(self.subject)
        n = sum(getattr(o, self.attribute) == self.value for o in referents)
        return "entailment" if n == len(referents) else "contradiction" if n == 0 else "neutral"

    def text(self, rng: np.random.Generator) -> str:
        if self.attribute == "shape":
            value = _a(_pick(rng, SHAPE_WORDS[self.value]))
        elif self.attribute == "size":
            value = _pick(rng, SIZE_WORDS[self.value])
        else:
            value = self.value
        return f"the {np_text(self.subject, rng)} is {value}"

    @property
    def form(self) -> tuple[tuple[str, ...], str]:
        """What the subject names and what the claim is about: ``(("size",), "color")`` for "the big object is
        red"."""
        named = tuple(a for a in ("shape", "color", "size") if getattr(self.subject, a) is not None)
        return named, self.attribute


def ve_claims(scene: Scene) -> dict[tuple[tuple[str, ...], str], dict[str, list[Claim]]]:
    """The definite claims about the scene's objects, by form and label, for the forms that take all three
    labels in this scene (sorted, so a choice among them is a function of the generator). Drawing the three
    hypotheses of a picture from one form leaves their words nothing that tells the labels apart."""
    found: dict[tuple[tuple[str, ...], str], dict[str, set[Claim]]] = {}
    for o in scene.objects:
        for named in CLAIM_SUBJECTS:
            subject = Desc(*(getattr(o, a) if a in named else None for a in ("shape", "color", "size")))
            for attribute in (a for a in ("color", "shape", "size") if a not in named):
                for value in CLAIM_VALUES[attribute]:
                    claim = Claim(subject, attribute, value)
                    found.setdefault(claim.form, {}).setdefault(claim.label(scene), set()).add(claim)
    return {
        form: {label: sorted(by_label[label], key=repr) for label in VE_LABELS}
        for form, by_label in sorted(found.items())
        if len(by_label) == len(VE_LABELS)
    }


def ve_statements(
    scene: Scene, rng: np.random.Generator, near_miss: Sequence[str] = ()
) -> list[tuple[str, str]] | None:
    """One entailment, one neutral, one contradiction hypothesis, in random order, all three definite claims
    of one form; None when no form takes all three labels in this scene (the caller draws another scene).
    ``near_miss``: for a twin, ``(text_true_here, text_false_here)`` are the entailment and the contradiction
    (the neutral one is still a claim)."""
    claims = ve_claims(scene)
    if not claims:
        return None
    by_label = claims[_pick(rng, list(claims))]
    texts = {label: _pick(rng, by_label[label]).text(rng) for label in VE_LABELS}
    if near_miss:
        texts["entailment"], texts["contradiction"] = near_miss
    items = [(texts[label], label) for label in VE_LABELS]
    return [items[i] for i in rng.permutation(3)]


# ----------------------------------------------------------------------------------------------------------
# NLVR2
# ----------------------------------------------------------------------------------------------------------


def _pair_desc(left: Scene, right: Scene, rng: np.random.Generator) -> Desc:
    """A description for a statement about an image pair: mostly of a depicted object, sometimes absent."""
    if rng.random() < 0.8:
        return _desc_of(_pick(rng, _pick(rng, (left, right)).objects), rng, ("s", "cs", "c"))
    return _absent_desc(left, rng, ("s", "cs"))


def nlvr_statements(
    left: Scene, right: Scene, rng: np.random.Generator, near_miss: Sequence[str] = ()
) -> list[tuple[str, bool]]:
    """One true and one false statement about the pair (random order), of the same kind, so the label is
    balanced per kind. ``near_miss``: for a twin pair, ``(true_text, false_text)``."""
    if near_miss:
        items = [(near_miss[0], True), (near_miss[1], False)]
        return [items[i] for i in rng.permutation(2)]
    sides = {"left": left, "right": right}
    cands: dict[str, list[tuple[str, bool]]] = {}

    def add(kind: str, text: str, truth: bool) -> None:
        cands.setdefault(kind, []).append((text, truth))

    for _ in range(6):
        side = _pick(rng, ("left", "right"))
        other = "right" if side == "left" else "left"
        desc = _pair_desc(left, right, rng)
        c, c_other = sides[side].count(desc), sides[other].count(desc)
        plural = np_text(desc, rng, plural=True)
        n = c if rng.random() < 0.5 else c + _pick(rng, (-1, 1))
        if 0 <= n <= 4:
            amount = (
                f"no {plural}" if n == 0 else f"exactly {NUMBER_WORDS[n]} {np_text(desc, rng, plural=n != 1)}"
            )
            add("count", f"the {side} image contains {amount}", n == c)
        add("both", f"both images contain {_a(np_text(desc, rng))}", c > 0 and c_other > 0)
        add("neither", f"neither image contains {_a(np_text(desc, rng))}", c == 0 and c_other == 0)
        add("exactly_one", f"exactly one image contains {plural}", (c > 0) != (c_other > 0))
        if c != c_other:
            add("more", f"there are more {plural} in the {side} image than in the {other} image", c > c_other)
        n_side, n_other = len(sides[side].objects), len(sides[other].objects)
        if n_side != n_other:
            noun = PLURALS[_pick(rng, GENERIC_WORDS)]
            add("more_objects", f"the {side} image has more {noun} than the {other} image", n_side > n_other)
        rel = _true_or_false_rel(sides[side], rng, bool(rng.random() < 0.5))
        if rel is not None:
            add("relation", relation_text(rel, rng, f"nlvr:{side}"), rel.holds(sides[side]))
        total = n_side + n_other + _pick(rng, (0, 0, -1, 1))
        if total >= 2:
            noun = PLURALS[_pick(rng, GENERIC_WORDS)]
            add("total", f"there are {NUMBER_WORDS[total]} {noun} in total", total == n_side + n_other)
    n_all = len(left.objects) + len(right.objects)  # guarantees one kind with both truths
    add("total", f"there are {NUMBER_WORDS[n_all]} objects in total", True)
    add("total", f"there are {NUMBER_WORDS[n_all + 1]} objects in total", False)
    kinds = sorted(cands)
    for k in rng.permutation(len(kinds)):
        texts = cands[kinds[k]]
        true = sorted({t for t, v in texts if v})
        false = sorted({t for t, v in texts if not v} - set(true))
        if true and false:
            items = [(_pick(rng, true), True), (_pick(rng, false), False)]
            return [items[i] for i in rng.permutation(2)]
    raise AssertionError("unreachable: the 'total' kind always has both truths")


# ----------------------------------------------------------------------------------------------------------
# Grounding (RefCOCO+ layout)
# ----------------------------------------------------------------------------------------------------------


def _is_extreme(scene: Scene, o: Obj, desc: Desc, axis: int, sign: int) -> bool:
    group = scene.select(desc)
    if o not in group:
        return False
    key = (lambda p: p.x) if axis == 0 else (lambda p: p.y)
    best = max(group, key=key) if sign > 0 else min(group, key=key)
    return best is o


def referring_expressions(scene: Scene, o: Obj, rng: np.random.Generator) -> list[str]:
    """Every expression the grammar has that picks out exactly ``o`` (deduplicated, in a fixed order):
    attribute ("the red circle", "the big triangle"), superlative ("the leftmost circle") and relational
    ("the square left of the blue star")."""
    out: list[str] = []
    for d in unique_descs(scene, o):
        out.append("the " + np_text(d, rng))
    for word, (_, axis, sign) in EXTREMES.items():
        for d in (Desc(), Desc(o.shape), Desc(color=o.color)):
            if scene.count(d) >= 2 and _is_extreme(scene, o, d, axis, sign):
                out.append(f"the {word} {np_text(d, rng)}")
    for ref in scene.objects:
        if ref is o:
            continue
        ref_descs = [d for d in unique_descs(scene, ref) if d.shape]
        if not ref_descs:
            continue
        for target in (Desc(o.shape), Desc(o.shape, o.color)):
            for rel in RELATIONS:
                hits = [
                    t
                    for t in scene.objects
                    if t is not ref and target.matches(t) and relation_holds(t, rel, ref)
                ]
                if hits == [o]:
                    ref_text = np_text(_pick(rng, ref_descs), rng)
                    out.append(f"the {np_text(target, rng)} {_pick(rng, REL_WORDS[rel])} the {ref_text}")
    return list(dict.fromkeys(out))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes with the official ``computeIoU``'s inclusive-pixel convention."""
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (ix1 - ix0 + 1) * (iy1 - iy0 + 1) if ix0 < ix1 and iy0 < iy1 else 0.0
    return float(inter) / (a[2] * a[3] + b[2] * b[3] - inter)


def _clip_box(x0: float, y0: float, x1: float, y1: float, size: int) -> list[float]:
    x0, y0 = min(max(x0, 0.0), size - 2.0), min(max(y0, 0.0), size - 2.0)
    x1, y1 = min(max(x1, x0 + 2.0), float(size)), min(max(y1, y0 + 2.0), float(size))
    return [x0, y0, x1 - x0, y1 - y0]


def proposals(scene: Scene, rng: np.random.Generator) -> list[list[float]]:
    """Detector-like proposals ``[x, y, w, h, score]``, by decreasing score: a jittered true box per
    object (IoU >= 0.6 with it), and distractors (shifted halves, loose boxes, unions, random boxes)."""
    size = scene.size
    out: list[list[float]] = []
    for o in scene.objects:
        x, y, w, h = o.bbox
        box = [x, y, w, h]
        for _ in range(20):
            jx, jy = rng.uniform(-0.08, 0.08, size=2)
            sw, sh = 1.0 + rng.uniform(-0.12, 0.12, size=2)
            cx, cy = x + w / 2 + jx * w, y + h / 2 + jy * h
            cand = _clip_box(cx - sw * w / 2, cy - sh * h / 2, cx + sw * w / 2, cy + sh * h / 2, size)
            if box_iou(cand, o.bbox) >= 0.6:
                box = cand
                break
        out.append([*box, float(rng.uniform(0.7, 0.99))])
        dx, dy = _pick(rng, ((0.6, 0.0), (-0.6, 0.0), (0.0, 0.6), (0.0, -0.6)))
        shifted = _clip_box(x + dx * w, y + dy * h, x + dx * w + w, y + dy * h + h, size)
        out.append([*shifted, float(rng.uniform(0.1, 0.8))])
        out.append(
            [*_clip_box(x - w / 2, y - h / 2, x + 1.5 * w, y + 1.5 * h, size), float(rng.uniform(0.1, 0.8))]
        )
    if len(scene.objects) >= 2:
        i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
        a, b = scene.objects[i].bbox, scene.objects[j].bbox
        union = _clip_box(
            min(a[0], b[0]),
            min(a[1], b[1]),
            max(a[0] + a[2], b[0] + b[2]),
            max(a[1] + a[3], b[1] + b[3]),
            size,
        )
        out.append([*union, float(rng.uniform(0.1, 0.7))])
    for _ in range(int(rng.integers(2, 5))):
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        out.append([*_clip_box(x0, y0, x0 + w, y0 + h, size), float(rng.uniform(0.05, 0.6))])
    out.sort(key=lambda b: -b[4])
    return [[round(float(v), 2) for v in b] for b in out]


# ----------------------------------------------------------------------------------------------------------
# Configuration and the per-image work
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """Sizes of every split. Three-way splits (VE, NLVR2, grounding) are 70/15/15 (train/dev/test)."""

    seed: int = 0
    image_size: int = 96  # square images
    pretrain_images: int = 2000  # each gets 2 captions -> 2 records
    retrieval_train_images: int = 1500  # 5 captions each
    retrieval_val_images: int = 200  # 5 captions each
    retrieval_test_images: int = 500
    vqa_train_images: int = 600  # several questions per image
    vqa_test_images: int = 200
    ve_images: int = 600  # 3 hypotheses each (one per label)
    nlvr_pairs: int = 600  # 2 images and 2 statements (one true, one false) per pair
    grounding_images: int = 600
    shifted_test_images: int = 150  # 5 captions each; another distribution (zero-shot transfer)
    twin_period: int = 4  # one image pair in every `twin_period` is an attribute-swapped twin pair
    workers: int = 2  # processes; does not change any output byte

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"synth.{f.name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"synth.{f.name} must be >= 0, got {value}")
        if self.image_size < 32:
            raise ValueError(f"synth.image_size must be >= 32, got {self.image_size}")
        if self.workers < 1 or self.twin_period < 1:
            raise ValueError("synth.workers and synth.twin_period must be >= 1")
        if 0 < self.grounding_images < 14:
            raise ValueError(
                f"synth.grounding_images must be 0 or >= 14 (val, testA and testB must be non-empty: the official "
                f"grounding_eval divides by each), got {self.grounding_images}"
            )

    def split_sizes(self) -> dict[str, int]:
        """Items per split (images, or image pairs for NLVR2)."""
        sizes = {
            "pretrain": self.pretrain_images,
            "retrieval_train": self.retrieval_train_images,
            "retrieval_val": self.retrieval_val_images,
            "retrieval_test": self.retrieval_test_images,
            "vqa_train": self.vqa_train_images,
            "vqa_test": self.vqa_test_images,
            "shifted_test": self.shifted_test_images,
        }
        for task, n, names in (
            ("ve", self.ve_images, ("train", "dev", "test")),
            ("nlvr", self.nlvr_pairs, ("train", "dev", "test")),
            ("grounding", self.grounding_images, ("train", "val", "test")),
        ):
            dev = test = n * 15 // 100
            for name, k in zip(names, (n - dev - test, dev, test)):
                sizes[f"{task}_{name}"] = k
        return sizes

    def total_images(self) -> int:
        return sum(n * (2 if split.startswith("nlvr") else 1) for split, n in self.split_sizes().items())


def _task(split: str) -> str:
    return split.rsplit("_", 1)[0] if "_" in split else split


def image_name(split: str, index: int, part: int | None = None) -> str:
    """The image path relative to the output directory (its image root)."""
    stem = f"{index:06d}" if part is None else f"{index:06d}-{part}"
    return f"images/{split}/{stem}.jpg"


@dataclass(frozen=True)
class _Chunk:
    seed: int
    image_size: int
    twin_period: int
    out_dir: str
    split: str
    n: int  # items in the split
    start: int
    stop: int


def _save(image: Image.Image, out_dir: str, rel: str) -> None:
    # 4:4:4 chroma: small saturated shapes keep their colour edges.
    image.save(Path(out_dir) / rel, "JPEG", quality=95, subsampling=0)


def _build_item(c: _Chunk, index: int) -> dict[str, Any]:
    code = SPLITS.index(c.split)
    task = _task(c.split)

    def rng(*stream: int) -> np.random.Generator:
        return np.random.default_rng([c.seed, code, *stream])

    if task == "nlvr":
        return _build_nlvr(c, index, rng)
    if c.split in SHIFTED_SPLITS:
        return _build_shifted(c, index, rng)
    pair = index // 2
    twin = pair % c.twin_period == 0 and 2 * pair + 1 < c.n
    near: tuple[Rel, Rel] | None = None
    # SNLI-VE wants a form of claim that takes every label in each scene; the scenes without one are drawn
    # again from the same generator.
    if twin:
        twin_rng = rng(2 * pair, 1)
        a, b, rel_a, rel_b = make_twins(twin_rng, c.image_size)
        while task == "ve" and not (ve_claims(a) and ve_claims(b)):
            a, b, rel_a, rel_b = make_twins(twin_rng, c.image_size)
        scene, near = (a, (rel_a, rel_b)) if index % 2 == 0 else (b, (rel_b, rel_a))
    else:
        scene_rng = rng(index, 0)
        scene = make_scene(scene_rng, c.image_size)
        while task == "ve" and not ve_claims(scene):
            scene = make_scene(scene_rng, c.image_size)
    text_rng = rng(index, 2)

    def near_text(style: str) -> tuple[str, str]:
        # The same generator state for both relations and both twins: same words, different bindings.
        assert near is not None
        mine, other = near
        if style == "caption":  # the whole scene: the twins' other objects are the same
            rest = [o for o, o_twin in zip(a.objects, b.objects) if o == o_twin]
            return (
                _relation_caption(mine, rest, rng(2 * pair, 3), with_size=False),
                _relation_caption(other, rest, rng(2 * pair, 3), with_size=False),
            )
        return relation_text(mine, rng(2 * pair, 3), style), relation_text(other, rng(2 * pair, 3), style)

    rel = image_name(c.split, index)
    _save(render(scene), c.out_dir, rel)
    item: dict[str, Any] = {
        "image": rel,
        "scene": scene.to_dict(),
        "twin": image_name(c.split, index ^ 1) if twin else None,
    }
    if task in ("pretrain", "retrieval"):
        k = 2 if task == "pretrain" else 5
        item["captions"] = captions(scene, text_rng, k, near_text("caption")[0] if near else None)
    elif task == "vqa":
        qs = vqa_questions(scene, text_rng, near_text("question") if near else ())
        item["questions"] = [(q.text, vqa_answers(q, text_rng), q.qtype, q.atype) for q in qs]
    elif task == "ve":
        item["statements"] = ve_statements(scene, text_rng, near_text("statement") if near else ())
    elif task == "grounding":
        refs = []
        for k, o in enumerate(scene.objects):
            exprs = referring_expressions(scene, o, text_rng)
            if exprs:
                n = min(len(exprs), int(text_rng.integers(1, 4)))
                refs.append(
                    (k, [exprs[i] for i in sorted(text_rng.choice(len(exprs), size=n, replace=False))])
                )
        item["refs"] = refs
        item["proposals"] = proposals(scene, text_rng)
    else:  # pragma: no cover - SPLITS and the tasks above are kept in sync
        raise ValueError(f"no builder for split {c.split!r}")
    return item


def _build_shifted(c: _Chunk, index: int, rng: Callable[..., np.random.Generator]) -> dict[str, Any]:
    """A retrieval test image of the shifted distribution with 5 captions (no twins: a plain test set)."""
    scene = make_scene(rng(index, 0), c.image_size, n_objects_p=SHIFT_N_OBJECTS_P)
    rel = image_name(c.split, index)
    _save(render_shifted(scene, rng(index, 6)), c.out_dir, rel)
    return {
        "image": rel,
        "scene": scene.to_dict(),
        "twin": None,
        "captions": captions(scene, rng(index, 2), 5),
    }


def _build_nlvr(c: _Chunk, index: int, rng: Callable[..., np.random.Generator]) -> dict[str, Any]:
    near: tuple[str, str] | None = None
    if index % c.twin_period == 0:
        a, b, rel_a, rel_b = make_twins(rng(index, 1), c.image_size)
        a_left = bool(rng(index, 5).random() < 0.5)
        left, right = (a, b) if a_left else (b, a)
        # "in the left image <rel_a>" is true iff a is on the left; "<rel_b>" the other way round.
        t_a, t_b = (
            relation_text(rel_a, rng(index, 3), "nlvr:left"),
            relation_text(rel_b, rng(index, 3), "nlvr:left"),
        )
        near = (t_a, t_b) if a_left else (t_b, t_a)
    else:
        left = make_scene(rng(index, 0), c.image_size)
        rng_right = rng(index, 4)
        include: list[tuple[str, str, str]] = []
        if rng_right.random() < 0.5:  # correlated pairs make "both"/"more" statements interesting
            k = int(rng_right.integers(1, len(left.objects) + 1))
            picks = rng_right.choice(len(left.objects), size=k, replace=False)
            include = [
                (left.objects[i].shape, left.objects[i].color, left.objects[i].size) for i in sorted(picks)
            ]
        right = make_scene(rng_right, c.image_size, include=include)
    names = [image_name(c.split, index, 0), image_name(c.split, index, 1)]
    for scene, rel in zip((left, right), names):
        _save(render(scene), c.out_dir, rel)
    return {
        "images": names,
        "scenes": [left.to_dict(), right.to_dict()],
        "twin": near is not None,
        "statements": nlvr_statements(left, right, rng(index, 2), near or ()),
    }


def _run_chunk(c: _Chunk) -> list[dict[str, Any]]:
    return [_build_item(c, i) for i in range(c.start, c.stop)]


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    seps = (",", ": ") if indent else (",", ":")
    path.write_text(json.dumps(obj, sort_keys=True, separators=seps, indent=indent, ensure_ascii=True) + "\n")


@dataclass
class _Outputs:
    files: dict[str, Any] = field(default_factory=dict)  # annotation file name -> JSON object
    texts: list[str] = field(default_factory=list)  # every in-domain text, for the vocabulary
    scenes: dict[str, Any] = field(default_factory=dict)
    shifted_scenes: dict[str, Any] = field(default_factory=dict)  # scenes_shifted.json
    labels: dict[str, Counter[str]] = field(default_factory=dict)
    twins: Counter[str] = field(default_factory=Counter)


def _assemble(cfg: SynthConfig, items: dict[str, list[dict[str, Any]]]) -> _Outputs:
    out = _Outputs()
    labels = {
        k: Counter() for k in ("ve", "nlvr", "vqa_answer_types", "vqa_question_types", "grounding_splits")
    }
    out.labels = labels
    for split, its in items.items():
        for it in its:
            if split in SHIFTED_SPLITS:
                out.shifted_scenes[it["image"]] = {**it["scene"], "twin": None}
            elif "scene" in it:
                out.scenes[it["image"]] = {**it["scene"], "twin": it["twin"]}
                out.twins[split] += it["twin"] is not None
            else:
                a, b = it["images"]
                out.scenes[a] = {**it["scenes"][0], "twin": b if it["twin"] else None}
                out.scenes[b] = {**it["scenes"][1], "twin": a if it["twin"] else None}
                out.twins[split] += 2 * it["twin"]
    out.twins = Counter({k: v // 2 for k, v in out.twins.items()})  # pairs

    out.files["pretrain.json"] = [
        {"image": it["image"], "caption": c} for it in items["pretrain"] for c in it["captions"]
    ]
    out.files["retrieval_train.json"] = [
        {"image": it["image"], "caption": c, "image_id": Path(it["image"]).stem}
        for it in items["retrieval_train"]
        for c in it["captions"]
    ]
    for split in ("retrieval_val", "retrieval_test"):
        out.files[f"{split}.json"] = [
            {"image": it["image"], "caption": it["captions"]} for it in items[split]
        ]
    for split in SHIFTED_SPLITS:  # kept out of texts and scenes: the in-domain card stays as it was
        out.files[f"{split}.json"] = [
            {"image": it["image"], "caption": it["captions"]} for it in items[split]
        ]
    for split in ("pretrain", "retrieval_train", "retrieval_val", "retrieval_test"):
        out.texts += [c for it in items[split] for c in it["captions"]]

    qid = 0
    test_answers: dict[str, list[str]] = {}
    answer_set: set[str] = set()
    for split in ("vqa_train", "vqa_test"):
        records = []
        for it in items[split]:
            for text, answers, qtype, atype in it["questions"]:
                qid += 1
                rec = {"question_id": qid, "image": it["image"], "question": text, "dataset": "vqa"}
                if split == "vqa_train":
                    rec["answer"] = answers
                else:
                    test_answers[str(qid)] = answers
                records.append(rec)
                answer_set.update(answers)
                labels["vqa_answer_types"][atype] += 1
                labels["vqa_question_types"][qtype] += 1
                out.texts += [text, *sorted(set(answers))]  # each distinct answer once
        out.files[f"{split}.json"] = records
    out.files["vqa_test_answers.json"] = test_answers
    out.files["answer_list.json"] = sorted(answer_set)

    for split in ("ve_train", "ve_dev", "ve_test"):
        out.files[f"{split}.json"] = [
            {"image": it["image"][: -len(".jpg")], "sentence": s, "label": lab}
            for it in items[split]
            for s, lab in it["statements"]
        ]
        for it in items[split]:
            for s, lab in it["statements"]:
                labels["ve"][lab] += 1
                out.texts.append(s)
    for split in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        out.files[f"{split}.json"] = [
            {"images": it["images"], "sentence": s, "label": str(truth)}
            for it in items[split]
            for s, truth in it["statements"]
        ]
        for it in items[split]:
            for s, truth in it["statements"]:
                labels["nlvr"][str(truth)] += 1
                out.texts.append(s)
    _assemble_grounding(cfg, items, out)
    return out


def _assemble_grounding(cfg: SynthConfig, items: dict[str, list[dict[str, Any]]], out: _Outputs) -> None:
    size = cfg.image_size
    images, annotations, refs = [], [], []
    dets: dict[str, list[list[float]]] = {}
    image_id = ann_id = ref_id = sent_id = 0
    for split in ("grounding_train", "grounding_val", "grounding_test"):
        records = []
        n = len(items[split])
        for index, it in enumerate(items[split]):
            image_id += 1
            images.append({"id": image_id, "file_name": it["image"], "width": size, "height": size})
            first_ann = ann_id + 1
            for o in it["scene"]["objects"]:
                ann_id += 1
                x, y, w, h = o["bbox"]
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "bbox": [x, y, w, h],
                        "area": round(w * h, 2),
                        "category_id": SHAPES.index(o["shape"]) + 1,
                        "iscrowd": 0,
                    }
                )
            dets[str(image_id)] = it["proposals"]
            ref_split = {"grounding_train": "train", "grounding_val": "val"}.get(
                split, "testA" if index < (n + 1) // 2 else "testB"
            )
            for obj_index, sentences in it["refs"]:
                sents = []
                for s in sentences:
                    sents.append({"sent": s, "raw": s, "sent_id": sent_id, "tokens": s.split()})
                    sent_id += 1
                    rec = {"image": it["image"], "text": s}
                    if split != "grounding_train":
                        rec["ref_id"] = ref_id
                    records.append(rec)
                    out.texts.append(s)
                refs.append(
                    {
                        "ref_id": ref_id,
                        "ann_id": first_ann + obj_index,
                        "image_id": image_id,
                        "split": ref_split,
                        "sentences": sents,
                        "sent_ids": [s["sent_id"] for s in sents],
                        "category_id": SHAPES.index(it["scene"]["objects"][obj_index]["shape"]) + 1,
                        "file_name": it["image"],
                    }
                )
                out.labels["grounding_splits"][ref_split] += 1
                ref_id += 1
        name = {"grounding_train": "train", "grounding_val": "val", "grounding_test": "test"}[split]
        out.files[f"refcoco+_{name}.json"] = records
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    out.files["refcoco+/instances.json"] = {
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    out.files["refcoco+/dets.json"] = dets
    out.files["refcoco+/cocos.json"] = []  # Grounding.py loads config['coco_file'] but never uses it
    out.files["refcoco+/refs(unc).p"] = refs


def _vocabulary(texts: Sequence[str]) -> Counter[str]:
    words: Counter[str] = Counter()
    for t in texts:
        words.update(pre_caption(t, 10**6).split())
    return words


def _card(cfg: SynthConfig, out: _Outputs, counts: dict[str, int]) -> dict[str, Any]:
    vocab = _vocabulary(out.texts)
    objects = [o for s in out.scenes.values() for o in s["objects"]]
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}  # workers changes no output byte
    return {
        "name": "albef-synth",
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "config": config,
        "images_total": len(out.scenes) + len(out.shifted_scenes),
        "images_per_split": counts,
        "twin_pairs_per_split": {s: out.twins.get(s, 0) for s in SPLITS},
        # lists: records; dicts: keys; instances.json: annotations (one per object)
        "records_per_file": {
            name: len(obj["annotations"]) if name.endswith("instances.json") else len(obj)
            for name, obj in sorted(out.files.items())
        },
        "labels": {k: dict(sorted(v.items())) for k, v in out.labels.items()},
        "objects": {
            "shapes": dict(sorted(Counter(o["shape"] for o in objects).items())),
            "colors": dict(sorted(Counter(o["color"] for o in objects).items())),
            "sizes": dict(sorted(Counter(o["size"] for o in objects).items())),
            "per_image": {
                str(k): v for k, v in sorted(Counter(len(s["objects"]) for s in out.scenes.values()).items())
            },
            "backgrounds": dict(sorted(Counter(s["background"] for s in out.scenes.values()).items())),
        },
        "vocabulary": {"size": len(vocab), "words": dict(sorted(vocab.items()))},
        "shifted": _shifted_card(out.shifted_scenes),
        "semantics": (
            "relations compare object centres (left: x smaller; above: y smaller, image y grows downwards); every "
            f"pair of objects differs by >= {CRISP} x image size on both axes; indefinite statements are "
            "existential, definite ones ('the red circle') name exactly one object, counts are exact; an SNLI-VE "
            "claim ('the big object is red') is about whichever object its subject means: entailment when all "
            "of them have the value, contradiction when none has, neutral when some have"
        ),
    }


def _shifted_card(scenes: dict[str, Any]) -> dict[str, Any]:
    """What differs in the shifted split (its objects and texts are not in the in-domain counts)."""
    return {
        "splits": list(SHIFTED_SPLITS),
        "objects_per_image": {
            str(k): v for k, v in sorted(Counter(len(s["objects"]) for s in scenes.values()).items())
        },
        "object_count_p": list(SHIFT_N_OBJECTS_P),
        "contrast": list(SHIFT_CONTRAST),
        "blur_radius": list(SHIFT_BLUR),
        "note": "read by no training stage; captions from the same grammar; scenes in scenes_shifted.json",
    }


def _card_markdown(card: dict[str, Any]) -> str:
    lines = [
        "# albef-synth data card",
        "",
        "Synthetic shapes scenes (ShapeWorld/CLEVR style) with texts in the official ALBEF annotation formats.",
        f"Seed {card['seed']}, {card['image_size']}x{card['image_size']} px JPEG (quality 95), "
        f"{card['images_total']} images. Regenerate with the same config for byte-identical files.",
        "",
        f"Semantics: {card['semantics']}.",
        "",
        "## Images per split",
        "",
        "| split | images | twin pairs |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {s} | {n} | {card['twin_pairs_per_split'][s]} |" for s, n in card["images_per_split"].items()
    ]
    lines += [
        "",
        "## Records per file",
        "",
        "(lists: records; dicts: keys; `instances.json`: annotations)",
        "",
    ]
    lines += ["| file | records |", "|---|---:|"]
    lines += [f"| `{f}` | {n} |" for f, n in card["records_per_file"].items()]
    for name, counts in card["labels"].items():
        total = sum(counts.values()) or 1
        lines += ["", f"## Labels: {name}", "", "| label | count | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {v / total:.1%} |" for k, v in counts.items()]
    shifted = card["shifted"]
    lines += [
        "",
        "## Shifted split (zero-shot transfer)",
        "",
        f"{', '.join(shifted['splits'])}: objects per image {shifted['objects_per_image']} (probabilities "
        f"{shifted['object_count_p']} of 1-4), contrast x{shifted['contrast']}, blur radius "
        f"{shifted['blur_radius']} px; {shifted['note']}.",
    ]
    lines += ["", "## Objects", ""]
    for name, counts in card["objects"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    vocab = card["vocabulary"]["words"]
    top = sorted(vocab.items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [
        "",
        f"## Vocabulary ({card['vocabulary']['size']} words after the official `pre_caption`)",
        "",
        ", ".join(f"{w} {n}" for w, n in top),
        "",
    ]
    return "\n".join(lines)


def _samples_png(out_dir: Path, pairs: Sequence[tuple[str, str]], path: Path, grid: int = 4) -> None:
    """A grid of images with a caption under each (Pillow only: fast and byte-deterministic)."""
    tile, text_h, pad = 192, 54, 6
    font = ImageFont.load_default(size=12)
    rows = max(1, math.ceil(len(pairs) / grid))
    sheet = Image.new("RGB", (grid * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (rel, caption) in enumerate(pairs):
        x = pad + (k % grid) * (tile + pad)
        y = pad + (k // grid) * (tile + text_h + pad)
        with Image.open(out_dir / rel) as im:
            sheet.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        lines, line = [], ""
        for word in caption.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) > tile and line:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
        draw.multiline_text((x, y + tile + 2), "\n".join(lines[:3]), fill="black", font=font, spacing=2)
    sheet.save(path, "PNG")


def generate(cfg: SynthConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Generate every image and annotation file under ``out_dir`` and return the data card.

    ``out_dir`` is the image root of every task: annotation image paths are relative to it. The image
    folders of the known splits are replaced; other files in ``out_dir`` are left alone.
    """

    out = Path(out_dir)
    sizes = cfg.split_sizes()
    for split in SPLITS:
        folder = out / "images" / split
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    (out / "refcoco+").mkdir(parents=True, exist_ok=True)

    total = cfg.total_images()
    per_chunk = max(4, min(64, total // (cfg.workers * 8) or 1))
    chunks = [
        _Chunk(
            cfg.seed,
            cfg.image_size,
            cfg.twin_period,
            str(out),
            split,
            sizes[split],
            start,
            min(start + per_chunk, sizes[split]),
        )
        for split in SPLITS
        for start in range(0, sizes[split], per_chunk)
    ]
    items: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    with tqdm(total=total, disable=not progress, desc="synth images", unit="img") as bar:
        pool = multiprocessing.Pool(cfg.workers) if cfg.workers > 1 else None
        try:
            results = pool.imap(_run_chunk, chunks) if pool else map(_run_chunk, chunks)
            for chunk, result in zip(chunks, results):
                items[chunk.split] += result
                bar.update((chunk.stop - chunk.start) * (2 if chunk.split.startswith("nlvr") else 1))
        finally:
            if pool:
                pool.close()
                pool.join()

    outputs = _assemble(cfg, items)
    for name, obj in outputs.files.items():
        if name.endswith(".p"):
            (out / name).write_bytes(pickle.dumps(obj, protocol=2))
        else:
            _write_json(out / name, obj)
    _write_json(out / "scenes.json", outputs.scenes)
    _write_json(out / "scenes_shifted.json", outputs.shifted_scenes)
    counts = {s: n * (2 if s.startswith("nlvr") else 1) for s, n in sizes.items()}
    card = _card(cfg, outputs, counts)
    _write_json(out / "data_card.json", card, indent=2)
    (out / "data_card.md").write_text(_card_markdown(card))
    samples = [(r["image"], r["caption"]) for r in outputs.files["pretrain.json"][::2]]
    samples += [(r["image"], r["caption"]) for r in outputs.files["retrieval_train.json"][::5]]
    _samples_png(out, samples[:16], out / "samples.png")
    return card
