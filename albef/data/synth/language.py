"""What the synthetic benchmark says about a scene: captions, VQA questions and answers, SNLI-VE claims, NLVR2
statements and referring expressions, each true or false of the scene by construction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from albef.data.synth.scenes import (
    BACKGROUND_WORDS,
    CAPTION_PREFIXES,
    COLORS,
    CONVERSE,
    EXTREMES,
    GENERIC_WORDS,
    NUMBER_WORDS,
    PLURALS,
    REL_WORDS,
    RELATIONS,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    VE_LABELS,
    Desc,
    Obj,
    Rel,
    Scene,
    pick,
    relation_holds,
)

# ----------------------------------------------------------------------------------------------------------
# Surface text
# ----------------------------------------------------------------------------------------------------------


def _noun(desc: Desc, rng: np.random.Generator, plural: bool = False) -> str:
    word = pick(rng, SHAPE_WORDS[desc.shape] if desc.shape else GENERIC_WORDS)
    return PLURALS[word] if plural else word


def np_text(desc: Desc, rng: np.random.Generator, plural: bool = False) -> str:
    """A bare noun phrase: ``[size] [colour] noun`` ("big red circle", "red objects")."""
    words = []
    if desc.size:
        words.append(pick(rng, SIZE_WORDS[desc.size]))
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
    prefix = pick(rng, CAPTION_PREFIXES)
    if prefix == "there is" and plural:
        prefix = "there are"
    return f"{prefix} {body}" if prefix else body


def relation_text(rel: Rel, rng: np.random.Generator, style: str = "caption", prefix: bool = True) -> str:
    """Text of an existential relation. ``style``: ``caption`` (with a caption prefix unless not ``prefix``,
    possibly the converse), ``statement`` (a full sentence), ``question`` (a yes/no question) or
    ``nlvr:<side>``. The random choices do not depend on the words, so two relations that differ only in
    their colours (twins) get texts with the same words."""
    rel_words = pick(rng, REL_WORDS[rel.rel])
    np1, np2 = _a(np_text(rel.d1, rng)), _a(np_text(rel.d2, rng))
    form = int(rng.integers(3))
    if style == "caption":
        if form == 1:
            return f"{np1} is {rel_words} {np2}"
        if form == 0:
            body = f"{np1} {rel_words} {np2}"
        else:
            body = f"{np2} {pick(rng, REL_WORDS[CONVERSE[rel.rel]])} {np1}"
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
    form = pick(rng, forms)
    return Desc(
        o.shape if "s" in form else None, o.color if "c" in form else None, o.size if "z" in form else None
    )


def _absent_desc(
    scene: Scene, rng: np.random.Generator, forms: Sequence[str] = ("s", "cs", "cs", "zcs")
) -> Desc:
    """A description that matches no object of the scene, of a form drawn once: redrawing the form too would
    favour the specific forms (a "big red circle" is more often absent than a "circle"), a hint in the words."""
    form = pick(rng, forms)
    for _ in range(100):
        desc = Desc(
            pick(rng, SHAPES) if "s" in form else None,
            pick(rng, tuple(COLORS)) if "c" in form else None,
            pick(rng, tuple(SIZES)) if "z" in form else None,
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
        body += " on " + pick(rng, BACKGROUND_WORDS[scene.background])
    return _with_prefix(rng, body, plural=plural)


def relation_caption(rel: Rel, rest: Sequence[Obj], rng: np.random.Generator, with_size: bool) -> str:
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
    rel = pick(rng, [r for r in RELATIONS if relation_holds(a, r, b)])
    with_size = bool(rng.random() < 0.5)
    forms = ("zcs",) if with_size else ("cs",)
    rest = [o for k, o in enumerate(scene.objects) if k not in (i, j)]
    return relation_caption(Rel(_desc_of(a, rng, forms), rel, _desc_of(b, rng, forms)), rest, rng, with_size)


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
        kind = order[attempt] if attempt < len(order) else pick(rng, tuple(CAPTION_KINDS))
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
    n_noisy = int(pick(rng, (0, 0, 0, 1, 1, 2, 3)))
    noisy = []
    for _ in range(n_noisy):
        if q.atype == "yes/no":
            noisy.append("no" if q.answer == "yes" else "yes")
        elif q.atype == "number":
            n = int(q.answer)
            noisy.append(NUMBER_WORDS[n] if rng.random() < 0.5 else str(max(n + pick(rng, (-1, 1)), 0)))
        elif q.qtype == "color":
            noisy.append(pick(rng, COLOR_CONFUSIONS[q.answer]))
        else:
            noisy.append(pick(rng, SHAPE_CONFUSIONS[q.answer]))
    answers = [q.answer] * (10 - n_noisy) + noisy
    return [answers[i] for i in rng.permutation(10)]


def _q_color(scene: Scene, rng: np.random.Generator) -> Question | None:
    o = pick(rng, scene.objects)
    descs = unique_descs(scene, o, with_color=False)
    if descs:
        subject = np_text(pick(rng, descs), rng)
    else:
        candidates = [
            w for w, (_, axis, sign) in EXTREMES.items() if _is_extreme(scene, o, Desc(), axis, sign)
        ]
        if not candidates:
            return None
        subject = f"{pick(rng, tuple(candidates))} {pick(rng, GENERIC_WORDS)}"
    template = pick(
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
                    ref_text = np_text(pick(rng, ref_descs), rng)
                    options.append((f"what shape is {pick(rng, REL_WORDS[rel])} the {ref_text}?", o.shape))
    if not options:
        return None
    text, answer = pick(rng, options)
    return Question(text, answer, "shape", "other")


def _q_count(scene: Scene, rng: np.random.Generator) -> Question:
    # The description's form first ("" is every object), then the answer uniformly over the counts that form
    # offers in this scene, then a description with that count: drawn the other way round most answers would
    # be "1", which the question's words alone would guess.
    form = pick(rng, ("s", "cs", "c", "zs", ""))
    descs = [_desc_of(o, rng, (form,)) for o in scene.objects]
    if form:
        descs.append(_absent_desc(scene, rng, (form,)))
    by_count: dict[int, list[Desc]] = {}
    for d in descs:
        by_count.setdefault(scene.count(d), []).append(d)
    desc = pick(rng, by_count[pick(rng, sorted(by_count))])
    template = pick(
        rng, ("how many {} are there?", "how many {} can you see?", "how many {} are in the picture?")
    )
    return Question(
        template.format(np_text(desc, rng, plural=True)), str(scene.count(desc)), "count", "number"
    )


def _q_existence(scene: Scene, rng: np.random.Generator) -> Question:
    present = bool(rng.random() < 0.5)
    forms = ("s", "cs", "zcs")  # the same for present and absent objects: the words do not hint at the answer
    desc = _desc_of(pick(rng, scene.objects), rng, forms) if present else _absent_desc(scene, rng, forms)
    if rng.random() < 0.5:
        text = f"is there {_a(np_text(desc, rng))}?"
    else:
        text = f"are there any {np_text(desc, rng, plural=True)}?"
    return Question(text, "yes" if present else "no", "existence", "yes/no")


def _q_relation(scene: Scene, rng: np.random.Generator) -> Question | None:
    if len(scene.objects) < 2:
        return None
    want = bool(rng.random() < 0.5)
    definite = [(o, [d for d in unique_descs(scene, o) if d.shape]) for o in scene.objects]
    definite = [(o, ds) for o, ds in definite if ds]
    if len(definite) >= 2:
        i, j = (int(k) for k in rng.choice(len(definite), size=2, replace=False))
        (a, da), (b, db) = definite[i], definite[j]
        rel = pick(rng, RELATIONS)
        if relation_holds(a, rel, b) != want:
            rel = CONVERSE[rel]
        text = f"is the {np_text(pick(rng, da), rng)} {pick(rng, REL_WORDS[rel])} the {np_text(pick(rng, db), rng)}?"
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
    forms = [(pick(rng, ("cs", "s", "zcs")),), (pick(rng, ("cs", "s", "zcs")),)]
    for _ in range(30):
        i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
        a, b = scene.objects[i], scene.objects[j]
        rel = pick(rng, [r for r in RELATIONS if relation_holds(a, r, b) == truth])
        cand = Rel(_desc_of(a, rng, forms[0]), rel, _desc_of(b, rng, forms[1]))
        if cand.holds(scene) == truth:
            return cand
    return None


def vqa_questions(scene: Scene, rng: np.random.Generator, near_miss: Sequence[str] = ()) -> list[Question]:
    """One question per type where the scene allows it. ``near_miss``: for a twin, the two existential
    relation questions of the pair as ``(text_true_here, text_false_here)`` replace the relation type."""
    qs = [_q_color(scene, rng), _q_shape(scene, rng), _q_count(scene, rng), _q_existence(scene, rng)]
    if near_miss:
        qs += [Question(text, answer, "relation", "yes/no") for text, answer in zip(near_miss, ("yes", "no"))]
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
            value = _a(pick(rng, SHAPE_WORDS[self.value]))
        elif self.attribute == "size":
            value = pick(rng, SIZE_WORDS[self.value])
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
    by_label = claims[pick(rng, list(claims))]
    texts = {label: pick(rng, by_label[label]).text(rng) for label in VE_LABELS}
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
        return _desc_of(pick(rng, pick(rng, (left, right)).objects), rng, ("s", "cs", "c"))
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
        side = pick(rng, ("left", "right"))
        other = "right" if side == "left" else "left"
        desc = _pair_desc(left, right, rng)
        c, c_other = sides[side].count(desc), sides[other].count(desc)
        plural = np_text(desc, rng, plural=True)
        n = c if rng.random() < 0.5 else c + pick(rng, (-1, 1))
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
            noun = PLURALS[pick(rng, GENERIC_WORDS)]
            add("more_objects", f"the {side} image has more {noun} than the {other} image", n_side > n_other)
        rel = _true_or_false_rel(sides[side], rng, bool(rng.random() < 0.5))
        if rel is not None:
            add("relation", relation_text(rel, rng, f"nlvr:{side}"), rel.holds(sides[side]))
        total = n_side + n_other + pick(rng, (0, 0, -1, 1))
        if total >= 2:
            noun = PLURALS[pick(rng, GENERIC_WORDS)]
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
            items = [(pick(rng, true), True), (pick(rng, false), False)]
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
                    ref_text = np_text(pick(rng, ref_descs), rng)
                    out.append(f"the {np_text(target, rng)} {pick(rng, REL_WORDS[rel])} the {ref_text}")
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
        dx, dy = pick(rng, ((0.6, 0.0), (-0.6, 0.0), (0.0, 0.6), (0.0, -0.6)))
        shifted = _clip_box(x + dx * w, y + dy * h, x + dx * w + w, y + dy * h + h, size)
        out.append([*shifted, float(rng.uniform(0.1, 0.8))])
        out.append(
            [*_clip_box(x - w / 2, y - h / 2, x + 1.5 * w, y + 1.5 * h, size), float(rng.uniform(0.1, 0.8))]
        )
    if len(scene.objects) >= 2:
        i, j = (int(k) for k in rng.choice(len(scene.objects), size=2, replace=False))
        a, b = scene.objects[i].bbox, scene.objects[j].bbox
        x0, y0 = min(a[0], b[0]), min(a[1], b[1])
        x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
        out.append([*_clip_box(x0, y0, x1, y1, size), float(rng.uniform(0.1, 0.7))])
    for _ in range(int(rng.integers(2, 5))):
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        out.append([*_clip_box(x0, y0, x0 + w, y0 + h, size), float(rng.uniform(0.05, 0.6))])
    out.sort(key=lambda b: -b[4])
    return [[round(float(v), 2) for v in b] for b in out]
