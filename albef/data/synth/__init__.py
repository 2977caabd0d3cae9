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
      means (its label: :class:`~albef.data.synth.language.Claim`); a picture's three share one form.
    * Captions describe the whole scene (:func:`~albef.data.synth.language.captions`), so that a caption is
      true of few images besides its own.

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

The package by concern: :mod:`~albef.data.synth.scenes` (the vocabulary, scenes and their rendering),
:mod:`~albef.data.synth.language` (every text the benchmark says about a scene) and
:mod:`~albef.data.synth.writers` (the configuration, the per-image work and the files written).
"""

from albef.data.synth.language import captions, relation_text
from albef.data.synth.scenes import (
    COLORS,
    CRISP,
    SHAPES,
    SHIFTED_SPLITS,
    SPLITS,
    make_scene,
    make_twins,
    render,
)
from albef.data.synth.writers import SynthConfig, generate

__all__ = [
    "COLORS",
    "CRISP",
    "SHAPES",
    "SHIFTED_SPLITS",
    "SPLITS",
    "SynthConfig",
    "captions",
    "generate",
    "make_scene",
    "make_twins",
    "relation_text",
    "render",
]
