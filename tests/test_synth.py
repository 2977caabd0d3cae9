"""The synthetic benchmark: determinism, official schemas, disjoint splits, truth of every parsed text,
near-miss twins in every split, grounding assets, data card and samples sheet.

Texts are checked by a parser written here from the meaning of the words (not from the generator's own
evaluator), against the object centres, colours, shapes and sizes recorded in ``scenes.json``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from albef.data import synth
from albef.data.synth import SynthConfig, generate

SMALL = {
    "image_size": 64,
    "pretrain_images": 16,
    "retrieval_train_images": 10,
    "retrieval_val_images": 4,
    "retrieval_test_images": 4,
    "vqa_train_images": 10,
    "vqa_test_images": 4,
    "ve_images": 20,
    "nlvr_pairs": 20,
    "grounding_images": 20,
    "shifted_test_images": 12,
}
ANNOTATION_FILES = {  # file -> split of its images
    "pretrain.json": "pretrain",
    "retrieval_train.json": "retrieval_train",
    "retrieval_val.json": "retrieval_val",
    "retrieval_test.json": "retrieval_test",
    "vqa_train.json": "vqa_train",
    "vqa_test.json": "vqa_test",
    "ve_train.json": "ve_train",
    "ve_dev.json": "ve_dev",
    "ve_test.json": "ve_test",
    "nlvr_train.json": "nlvr_train",
    "nlvr_dev.json": "nlvr_dev",
    "nlvr_test.json": "nlvr_test",
    "refcoco+_train.json": "grounding_train",
    "refcoco+_val.json": "grounding_val",
    "refcoco+_test.json": "grounding_test",
    "shifted_test.json": "shifted_test",
}

# ---------------------------------------------------------------------------------------------------------
# An independent reading of the texts. The meaning of each word is written down here, not imported.
# ---------------------------------------------------------------------------------------------------------

SHAPE_OF = {
    "circle": "circle",
    "disk": "circle",
    "square": "square",
    "triangle": "triangle",
    "star": "star",
    "diamond": "diamond",
    "rhombus": "diamond",
    "hexagon": "hexagon",
    "cross": "cross",
    "plus sign": "cross",
    "shape": None,
    "object": None,
}
SHAPE_OF.update(
    {"circles": "circle", "disks": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}
    | {"diamonds": "diamond", "rhombuses": "diamond", "hexagons": "hexagon", "crosses": "cross"}
    | {"plus signs": "cross", "shapes": None, "objects": None}
)
SIZE_OF = {"big": "big", "large": "big", "small": "small", "little": "small"}
COLOR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
REL_OF = {
    "left of": "left",
    "to the left of": "left",
    "on the left of": "left",
    "right of": "right",
    "to the right of": "right",
    "on the right of": "right",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}
NUMBER_OF = {
    "no": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def NP(p: str) -> str:
    return rf"(?:(?P<{p}size>{_alt(SIZE_OF)}) )?(?:(?P<{p}color>{_alt(COLOR_WORDS)}) )?(?P<{p}noun>{_alt(SHAPE_OF)})"


REL = rf"(?P<rel>{_alt(REL_OF)})"
ART = r"(?:a|an)"
EXISTENTIAL_REL = re.compile(rf"\b{ART} {NP('a')} (?:is )?{REL} {ART} {NP('b')}$")


def desc(m: re.Match, p: str) -> tuple[str | None, str | None, str | None]:
    size = SIZE_OF[m[f"{p}size"]] if m[f"{p}size"] else None
    return (SHAPE_OF[m[f"{p}noun"]], m[f"{p}color"], size)


def matches(o: dict, d: tuple) -> bool:
    shape, color, size = d
    return (
        (shape is None or o["shape"] == shape)
        and (color is None or o["color"] == color)
        and (size is None or o["size"] == size)
    )


def rel_true(a: dict, rel: str, b: dict) -> bool:
    # Image coordinates: x grows to the right, y grows downwards.
    return {
        "left": a["x"] < b["x"],
        "right": a["x"] > b["x"],
        "above": a["y"] < b["y"],
        "below": a["y"] > b["y"],
    }[rel]


def existential_rel(objects: list[dict], m: re.Match) -> bool:
    d1, d2, rel = desc(m, "a"), desc(m, "b"), REL_OF[m["rel"]]
    return any(
        i != j and matches(a, d1) and matches(b, d2) and rel_true(a, rel, b)
        for i, a in enumerate(objects)
        for j, b in enumerate(objects)
    )


def count(objects: list[dict], d: tuple) -> int:
    return sum(matches(o, d) for o in objects)


EXTREME = re.compile(rf"^the (?P<ext>leftmost|rightmost|topmost|bottommost) {NP('a')}$")
DEFINITE_REL = re.compile(rf"^the {NP('a')} {REL} the {NP('b')}$")
DEFINITE = re.compile(rf"^the {NP('a')}$")


def resolve(objects: list[dict], phrase: str) -> list[int] | None:
    """Indices of the objects a definite phrase ("the red circle", "the leftmost star", "the square left of
    the blue star") refers to; None if the phrase is not in the grammar."""
    if m := EXTREME.match(phrase):
        group = [i for i, o in enumerate(objects) if matches(o, desc(m, "a"))]
        key, sign = {
            "leftmost": ("x", -1),
            "rightmost": ("x", 1),
            "topmost": ("y", -1),
            "bottommost": ("y", 1),
        }[m["ext"]]
        return [max(group, key=lambda i: sign * objects[i][key])] if group else []
    if m := DEFINITE_REL.match(phrase):
        refs = [i for i, o in enumerate(objects) if matches(o, desc(m, "b"))]
        assert len(refs) == 1, f"the reference object of {phrase!r} is not unique"
        r = refs[0]
        rel = REL_OF[m["rel"]]
        return [
            i
            for i, o in enumerate(objects)
            if i != r and matches(o, desc(m, "a")) and rel_true(o, rel, objects[r])
        ]
    if m := DEFINITE.match(phrase):
        return [i for i, o in enumerate(objects) if matches(o, desc(m, "a"))]
    return None


def statement_truth(objects: list[dict], s: str) -> bool | None:
    """The truth of a statement (captions, VE hypotheses) when the parser reads it, else None."""
    if m := re.fullmatch(rf"there is no {NP('a')}", s):
        return count(objects, desc(m, "a")) == 0
    if m := re.fullmatch(rf"there (?:is|are) exactly (?P<num>\w+) {NP('a')}(?: in the picture)?", s):
        return count(objects, desc(m, "a")) == NUMBER_OF[m["num"]]
    if m := re.fullmatch(rf"(?:there is|the picture contains) {ART} {NP('a')}", s):
        return count(objects, desc(m, "a")) >= 1
    if m := re.fullmatch(rf"{ART} {NP('a')} is visible", s):
        return count(objects, desc(m, "a")) >= 1
    if m := EXISTENTIAL_REL.search(s):
        return existential_rel(objects, m)
    return None


def majority(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def question_answer(objects: list[dict], q: str) -> str | None:
    """The right answer to a VQA question when the parser reads it, else None."""
    if m := re.fullmatch(rf"how many {NP('a')} (?:are there|can you see|are in the picture)\?", q):
        return str(count(objects, desc(m, "a")))
    if m := re.fullmatch(rf"is there {ART} {NP('a')}\?", q) or re.fullmatch(rf"are there any {NP('a')}\?", q):
        return "yes" if count(objects, desc(m, "a")) else "no"
    if m := re.fullmatch(
        r"(?:what color is|which color does|what is the color of) (?P<subject>the .+?)(?: have)?\?", q
    ):
        hits = resolve(objects, m["subject"])
        assert hits is not None and len(hits) == 1, q
        return objects[hits[0]]["color"]
    if m := EXISTENTIAL_REL.search(q.rstrip("?")):
        assert q.startswith("is there ")
        return "yes" if existential_rel(objects, m) else "no"
    if m := re.fullmatch(rf"is (?P<x>the .+?) {REL} (?P<y>the .+)\?", q):
        x, y = resolve(objects, m["x"]), resolve(objects, m["y"])
        assert x is not None and y is not None and len(x) == 1 and len(y) == 1, q
        return "yes" if rel_true(objects[x[0]], REL_OF[m["rel"]], objects[y[0]]) else "no"
    return None


def iou(a, b) -> float:  # the official computeIoU (inclusive pixel coordinates)
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (x1 - x0 + 1) * (y1 - y0 + 1) if x0 < x1 and y0 < y1 else 0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "seed0"
    generate(SynthConfig(seed=0, workers=2, **SMALL), path, progress=False)
    return path


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def scenes(out: Path) -> dict:
    return load(out, "scenes.json")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_whatever_the_workers(out: Path, tmp_path: Path) -> None:
    generate(SynthConfig(seed=0, workers=1, **SMALL), tmp_path / "again", progress=False)
    a, b = _files(out), _files(tmp_path / "again")
    assert a.keys() == b.keys()
    assert len(a) > 150
    different = [name for name in a if a[name] != b[name]]
    assert different == []


def test_other_seed_other_bytes(out: Path, tmp_path: Path) -> None:
    generate(SynthConfig(seed=1, workers=2, **SMALL), tmp_path / "seed1", progress=False)
    a, b = _files(out), _files(tmp_path / "seed1")
    assert a.keys() == b.keys()
    for name in (
        "pretrain.json",
        "images/pretrain/000003.jpg",
        "images/nlvr_test/000001-1.jpg",
        "scenes.json",
    ):
        assert a[name] != b[name], name


def test_scene_sampling_is_a_function_of_the_rng() -> None:
    s1 = synth.make_scene(np.random.default_rng([5, 1, 2]), 96)
    s2 = synth.make_scene(np.random.default_rng([5, 1, 2]), 96)
    assert s1 == s2
    assert np.array_equal(np.asarray(synth.render(s1)), np.asarray(synth.render(s2)))


# ---------------------------------------------------------------------------------------------------------
# Schemas (ALBEF-SPEC §4.1)
# ---------------------------------------------------------------------------------------------------------


def _check_image(out: Path, rel: str, split: str) -> None:
    assert isinstance(rel, str) and rel.startswith(f"images/{split}/") and rel.endswith(".jpg"), rel
    assert (out / rel).is_file(), rel


def test_pretrain_and_retrieval_schemas(out: Path) -> None:
    pretrain = load(out, "pretrain.json")
    assert len(pretrain) == 2 * SMALL["pretrain_images"]
    for r in pretrain:
        assert set(r) == {"image", "caption"} and isinstance(r["caption"], str) and r["caption"]
        _check_image(out, r["image"], "pretrain")
    assert set(Counter(r["image"] for r in pretrain).values()) == {2}

    train = load(out, "retrieval_train.json")
    for r in train:
        assert set(r) == {"image", "caption", "image_id"}
        assert isinstance(r["caption"], str) and isinstance(r["image_id"], str)
        _check_image(out, r["image"], "retrieval_train")
    per_image = Counter(r["image"] for r in train)
    assert len(per_image) == SMALL["retrieval_train_images"] and set(per_image.values()) == {5}
    ids = {r["image"]: r["image_id"] for r in train}
    assert len(set(ids.values())) == len(ids)  # one id per image
    for split in ("retrieval_val", "retrieval_test"):
        records = load(out, f"{split}.json")
        assert len(records) == SMALL[f"{split}_images"]
        for r in records:
            assert set(r) == {"image", "caption"}
            _check_image(out, r["image"], split)
            caps = r["caption"]
            assert isinstance(caps, list) and len(caps) == 5 and all(isinstance(c, str) and c for c in caps)
            assert len(set(caps)) == 5  # diverse


def test_vqa_schemas(out: Path) -> None:
    train, test = load(out, "vqa_train.json"), load(out, "vqa_test.json")
    answers, answer_list = load(out, "vqa_test_answers.json"), load(out, "answer_list.json")
    for r in train:
        assert set(r) == {"question_id", "image", "question", "answer", "dataset"}
        assert type(r["question_id"]) is int and isinstance(r["question"], str) and r["dataset"] == "vqa"
        assert (
            isinstance(r["answer"], list)
            and len(r["answer"]) == 10
            and all(isinstance(a, str) for a in r["answer"])
        )
        assert Counter(r["answer"]).most_common(1)[0][1] >= 7  # mostly identical
        _check_image(out, r["image"], "vqa_train")
    assert any(len(set(r["answer"])) > 1 for r in train)  # some noise
    for r in test:
        assert set(r) == {"question_id", "image", "question", "dataset"}
        assert type(r["question_id"]) is int and r["dataset"] == "vqa"
        _check_image(out, r["image"], "vqa_test")
    assert set(answers) == {str(r["question_id"]) for r in test}
    assert all(len(a) == 10 for a in answers.values())
    qids = [r["question_id"] for r in train + test]
    assert len(qids) == len(set(qids))
    assert len(train) >= 3 * SMALL["vqa_train_images"]  # several questions per image
    assert answer_list == sorted(set(answer_list)) and all(isinstance(a, str) for a in answer_list)
    used = {a for r in train for a in r["answer"]} | {a for v in answers.values() for a in v}
    assert used <= set(answer_list)
    assert {"yes", "no", "red", "circle", "2"} <= set(answer_list)


def test_ve_schemas(out: Path) -> None:
    for split in ("ve_train", "ve_dev", "ve_test"):
        records = load(out, f"{split}.json")
        assert records
        for r in records:
            assert set(r) == {"image", "sentence", "label"}
            assert r["label"] in ("entailment", "neutral", "contradiction")
            assert not r["image"].endswith(".jpg")  # the official code appends ".jpg"
            _check_image(out, r["image"] + ".jpg", split)
    n = SMALL["ve_images"]
    assert [len(load(out, f"ve_{s}.json")) for s in ("train", "dev", "test")] == [3 * (n - 6), 9, 9]


def test_nlvr_schemas(out: Path) -> None:
    for split in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        records = load(out, f"{split}.json")
        assert records
        for r in records:
            assert set(r) == {"images", "sentence", "label"}
            assert type(r["label"]) is str and r["label"] in ("True", "False")  # a string, never a JSON bool
            assert isinstance(r["images"], list) and len(r["images"]) == 2
            assert r["images"][0].endswith("-0.jpg") and r["images"][1].endswith("-1.jpg")
            for rel in r["images"]:
                _check_image(out, rel, split)


def test_grounding_schemas(out: Path) -> None:
    train = load(out, "refcoco+_train.json")
    assert train and all(set(r) == {"image", "text"} for r in train)
    for r in train:
        _check_image(out, r["image"], "grounding_train")
    for name, split in (("val", "grounding_val"), ("test", "grounding_test")):
        records = load(out, f"refcoco+_{name}.json")
        assert records
        for r in records:
            assert set(r) == {"image", "text", "ref_id"} and type(r["ref_id"]) is int
            _check_image(out, r["image"], split)
    inst = load(out, "refcoco+/instances.json")
    assert set(inst) >= {"images", "annotations", "categories"}
    assert all(set(i) >= {"id", "file_name", "width", "height"} for i in inst["images"])
    assert all(set(a) >= {"id", "image_id", "bbox", "category_id"} for a in inst["annotations"])
    assert {c["name"] for c in inst["categories"]} == set(synth.SHAPES)
    raw = (out / "refcoco+/refs(unc).p").read_bytes()
    assert raw[:2] == b"\x80\x02"  # pickle protocol 2
    refs = pickle.loads(raw)
    assert isinstance(refs, list) and refs
    for ref in refs:
        assert set(ref) >= {"ref_id", "ann_id", "image_id", "split", "sentences", "category_id"}
        assert ref["split"] in ("train", "val", "testA", "testB")
        assert ref["sentences"] and all(isinstance(s["sent"], str) for s in ref["sentences"])
        # what the REFER API indexes on load
        assert all({"sent_id", "tokens"} <= set(s) for s in ref["sentences"])
    dets = load(out, "refcoco+/dets.json")
    assert set(dets) == {str(i["id"]) for i in inst["images"]}
    for boxes in dets.values():
        assert boxes and all(len(b) == 5 and all(isinstance(v, (int, float)) for v in b) for b in boxes)


# ---------------------------------------------------------------------------------------------------------
# Splits and images
# ---------------------------------------------------------------------------------------------------------


def _referenced(out: Path) -> dict[str, set[str]]:
    refs: dict[str, set[str]] = {split: set() for split in synth.SPLITS}
    for name, split in ANNOTATION_FILES.items():
        for r in load(out, name):
            if "images" in r:
                refs[split].update(r["images"])
            elif split.startswith("ve"):
                refs[split].add(r["image"] + ".jpg")
            else:
                refs[split].add(r["image"])
    for i in load(out, "refcoco+/instances.json")["images"]:
        refs[i["file_name"].split("/")[1]].add(i["file_name"])
    return refs


def test_splits_share_no_image(out: Path) -> None:
    refs = _referenced(out)
    for split, paths in refs.items():
        assert paths, split
        assert all(p.startswith(f"images/{split}/") for p in paths), split
        on_disk = {str(p.relative_to(out)) for p in (out / "images" / split).iterdir()}
        assert on_disk == paths, split  # every image of a split is used by that split only
    digests = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").rglob("*.jpg"))
    assert max(digests.values()) == 1  # no image is stored twice under two names


def test_images_are_rgb_jpegs_of_the_configured_size(out: Path) -> None:
    for path in sorted((out / "images").rglob("*.jpg")):
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64)), path


def test_pixels_match_the_scene_metadata(out: Path, scenes: dict) -> None:
    palette = {name: np.array(rgb, dtype=np.float32) for name, rgb in synth.COLORS.items()}
    checked = 0
    for rel, scene in scenes.items():
        arr = np.asarray(Image.open(out / rel).convert("RGB"), dtype=np.float32)
        for o in scene["objects"]:
            px = arr[int(o["y"]), int(o["x"])]
            nearest = min(palette, key=lambda c: float(np.sum((palette[c] - px) ** 2)))
            assert nearest == o["color"], (rel, o)
            checked += 1
    assert checked > 300


def test_boxes_are_tight_around_the_drawn_shapes(out: Path, scenes: dict) -> None:
    """No pixel of an object's colour lies more than 1.5 px outside its box, and the shape reaches to
    within 2.5 px of every edge of its box (pixels near other objects are ignored)."""
    checked = 0
    for rel, scene in scenes.items():
        arr = np.asarray(Image.open(out / rel).convert("RGB"), dtype=np.float32)
        yy, xx = np.mgrid[0 : arr.shape[0], 0 : arr.shape[1]] + 0.5  # pixel centres
        for k, o in enumerate(scene["objects"]):
            x, y, w, h = o["bbox"]
            near_others = np.zeros(arr.shape[:2], bool)
            for j, p in enumerate(scene["objects"]):
                if j != k:
                    px, py, pw, ph = p["bbox"]
                    near_others |= (xx > px - 2) & (xx < px + pw + 2) & (yy > py - 2) & (yy < py + ph + 2)
            d = np.linalg.norm(arr - np.array(synth.COLORS[o["color"]], dtype=np.float32), axis=2)
            outside = np.maximum(
                np.maximum(np.maximum(x - xx, xx - (x + w)), np.maximum(y - yy, yy - (y + h))), 0
            )
            strong = (d < 60) & ~near_others
            assert not (strong & (outside > 1.5)).any(), (rel, o)
            inside = (d < 100) & ~near_others & (outside == 0)
            assert inside.any(), (rel, o)
            gaps = [
                (xx[inside] - x).min(),
                (x + w - xx[inside]).min(),
                (yy[inside] - y).min(),
                (y + h - yy[inside]).min(),
            ]
            assert max(gaps) <= 2.5, (rel, o, gaps)
            checked += 1
    assert checked > 300


def test_backgrounds_are_far_from_every_object_colour() -> None:
    rng = np.random.default_rng(0)
    palette = np.array(list(synth.COLORS.values()), dtype=np.float32)
    for _ in range(300):
        for c in synth.scenes._muted_colors(rng, 2):
            assert np.linalg.norm(palette - c, axis=1).min() > 90


def test_scene_geometry() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = synth.make_scene(rng, 64)
        assert 1 <= len(s.objects) <= 4
        for o in s.objects:
            x, y, w, h = o.bbox
            assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        for a in s.objects:
            for b in s.objects:
                if a is not b:
                    assert np.hypot(a.x - b.x, a.y - b.y) > a.r + b.r  # bounding circles do not overlap
                    assert abs(a.x - b.x) >= synth.CRISP * 64 and abs(a.y - b.y) >= synth.CRISP * 64


# ---------------------------------------------------------------------------------------------------------
# The texts are true of the pictures
# ---------------------------------------------------------------------------------------------------------


def _captions(out: Path) -> list[tuple[str, str]]:
    pairs = [
        (r["image"], r["caption"]) for r in load(out, "pretrain.json") + load(out, "retrieval_train.json")
    ]
    for split in ("retrieval_val", "retrieval_test"):
        pairs += [(r["image"], c) for r in load(out, f"{split}.json") for c in r["caption"]]
    return pairs


PREFIX = re.compile(
    r"^(?:there is|there are|we see|the picture shows|an image of|a picture of|this image "
    r"contains|you can see|a drawing of) "
)
GROUP = re.compile(rf"(?P<num>{ART}|{_alt(NUMBER_OF)}) {NP('a')}")


def listed_groups(listing: str) -> list[tuple[int, tuple]] | None:
    """``(count, description)`` of each group of a listing ("a red circle, two blue squares and a star");
    None if it is not one."""
    groups = []
    for part in re.split(r", | and ", listing):
        if not (m := GROUP.fullmatch(part)):
            return None
        groups.append((1 if m["num"] in ("a", "an") else NUMBER_OF[m["num"]], desc(m, "a")))
    return groups


def check_caption(objects: list[dict], caption: str) -> str:
    """Asserts that a caption lists every object of the scene (in groups with their exact counts), or relates
    two objects truly after a listing of the others; its kind ("listing" or "relation")."""
    body, _, relation = PREFIX.sub("", caption).partition(", and ")
    if m := EXISTENTIAL_REL.search(relation or caption):
        assert existential_rel(objects, m), caption
        if not relation:  # a two-object scene: the relation is the whole caption
            assert len(objects) == 2, caption
            return "relation"
    else:
        body = re.sub(r" on (?:a |an )?[a-z ]+$", "", body)  # the background
    groups = listed_groups(body)
    assert groups is not None, caption
    for n, d in groups:
        assert count(objects, d) == n, caption
    assert sum(n for n, _ in groups) == len(objects) - (2 if relation else 0), caption
    return "relation" if relation else "listing"


def test_captions_describe_the_whole_scene_truly(out: Path, scenes: dict) -> None:
    kinds = Counter(check_caption(scenes[image]["objects"], caption) for image, caption in _captions(out))
    assert kinds["relation"] >= 15 and kinds["listing"] >= 15


def test_caption_function_relations_are_true() -> None:
    rng = np.random.default_rng(1)
    n = 0
    for _ in range(300):
        scene = synth.make_scene(rng, 96)
        objects = scene.to_dict()["objects"]
        for caption in synth.captions(scene, rng, 5):
            if m := EXISTENTIAL_REL.search(caption):
                assert existential_rel(objects, m), caption
                n += 1
    assert n > 100


CLAIM = re.compile(
    rf"the {NP('a')} is (?:{ART} (?P<shape>{_alt(SHAPE_OF)})|(?P<color>{_alt(COLOR_WORDS)})|(?P<size>{_alt(SIZE_OF)}))"
)


def claim_label(objects: list[dict], m: re.Match) -> str:
    """The label of a definite claim ("the big object is red"): entailment when every object the subject
    describes has the value, contradiction when none has, neutral when some have and some have not."""
    referents = [o for o in objects if matches(o, desc(m, "a"))]
    assert referents, f"{m[0]!r} describes no object"
    if m["shape"]:
        n = sum(o["shape"] == SHAPE_OF[m["shape"]] for o in referents)
    elif m["color"]:
        n = sum(o["color"] == m["color"] for o in referents)
    else:
        n = sum(o["size"] == SIZE_OF[m["size"]] for o in referents)
    return "entailment" if n == len(referents) else "contradiction" if n == 0 else "neutral"


def test_ve_labels_are_true_of_the_picture(out: Path, scenes: dict) -> None:
    checked = Counter()
    for split in ("ve_train", "ve_dev", "ve_test"):
        for r in load(out, f"{split}.json"):
            objects = scenes[r["image"] + ".jpg"]["objects"]
            if m := CLAIM.fullmatch(r["sentence"]):
                assert claim_label(objects, m) == r["label"], r
                checked[r["label"]] += 1
                continue
            truth = statement_truth(objects, r["sentence"])  # a twin's near-miss relation
            assert truth is not None and r["label"] != "neutral", r
            assert truth == (r["label"] == "entailment"), r
            checked["relation"] += 1
    assert min(checked.values()) >= 5 and len(checked) == 4


def test_ve_hypotheses_need_the_picture(out: Path) -> None:
    """Every hypothesis form takes all three labels: the words alone do not give the label away."""
    labels_of_form: dict[str, set[str]] = {}
    for split in ("ve_train", "ve_dev", "ve_test"):
        for r in load(out, f"{split}.json"):
            if m := CLAIM.fullmatch(r["sentence"]):
                named = (bool(m["asize"]), bool(m["acolor"]), SHAPE_OF[m["anoun"]] is not None)
                about = next(k for k in ("shape", "color", "size") if m[k])
                labels_of_form.setdefault(f"{named} {about}", set()).add(r["label"])
    assert len(labels_of_form) >= 3
    assert all(labels == {"entailment", "neutral", "contradiction"} for labels in labels_of_form.values()), (
        labels_of_form
    )


def test_vqa_answers_are_true(out: Path, scenes: dict) -> None:
    test_answers = load(out, "vqa_test_answers.json")
    checked = Counter()
    for r in load(out, "vqa_train.json") + load(out, "vqa_test.json"):
        answers = r.get("answer") or test_answers[str(r["question_id"])]
        expected = question_answer(scenes[r["image"]]["objects"], r["question"])
        if expected is not None:
            assert majority(answers) == expected, r
            checked[r["question"].split()[0]] += 1
    assert checked["how"] >= 5 and checked["is"] >= 5 and (checked["what"] + checked["which"]) >= 3


def test_nlvr_labels_are_true(out: Path, scenes: dict) -> None:
    checked = 0
    for split in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        for r in load(out, f"{split}.json"):
            left, right = (scenes[p]["objects"] for p in r["images"])
            side = {"left": left, "right": right}
            s, truth = r["sentence"], None
            if m := re.fullmatch(
                rf"the (?P<side>left|right) image contains exactly (?P<num>\w+) {NP('a')}", s
            ):
                truth = count(side[m["side"]], desc(m, "a")) == NUMBER_OF[m["num"]]
            elif m := re.fullmatch(rf"the (?P<side>left|right) image contains no {NP('a')}", s):
                truth = count(side[m["side"]], desc(m, "a")) == 0
            elif m := re.fullmatch(rf"both images contain {ART} {NP('a')}", s):
                truth = count(left, desc(m, "a")) > 0 and count(right, desc(m, "a")) > 0
            elif m := re.fullmatch(r"in the (?P<side>left|right) image (?P<rest>.+)", s):
                mm = EXISTENTIAL_REL.search(m["rest"])
                truth = existential_rel(side[m["side"]], mm)
            elif m := re.fullmatch(r"there are (?P<num>\w+) (?:shapes|objects) in total", s):
                truth = len(left) + len(right) == NUMBER_OF[m["num"]]
            if truth is not None:
                assert r["label"] == str(truth), r
                checked += 1
    assert checked >= 10


def test_labels_are_balanced(out: Path) -> None:
    ve = Counter(r["label"] for s in ("train", "dev", "test") for r in load(out, f"ve_{s}.json"))
    assert ve["entailment"] == ve["neutral"] == ve["contradiction"] == SMALL["ve_images"]
    nlvr = Counter(r["label"] for s in ("train", "dev", "test") for r in load(out, f"nlvr_{s}.json"))
    assert nlvr["True"] == nlvr["False"] == SMALL["nlvr_pairs"]
    yes_no = Counter(
        majority(r["answer"]) for r in load(out, "vqa_train.json") if majority(r["answer"]) in ("yes", "no")
    )
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.5 * (yes_no["yes"] + yes_no["no"])


# ---------------------------------------------------------------------------------------------------------
# Near misses: a bag of words is not enough
# ---------------------------------------------------------------------------------------------------------


def _bag(text: str) -> tuple[str, ...]:
    return tuple(sorted(text.rstrip("?").split()))


def _labelled_texts(out: Path, name: str, split: str) -> list[tuple[str, str, bool]]:
    """(image key, text, truth label) of one annotation file."""
    records = load(out, name)
    if split.startswith(("pretrain", "retrieval")):
        items = []
        for r in records:
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            items += [(r["image"], c, True) for c in caps]
        return items
    if split.startswith("vqa"):
        answers = load(out, "vqa_test_answers.json")
        out_items = []
        for r in records:
            a = majority(r.get("answer") or answers[str(r["question_id"])])
            if a in ("yes", "no"):
                out_items.append((r["image"], r["question"], a == "yes"))
        return out_items
    if split.startswith("ve"):
        return [
            (r["image"], r["sentence"], r["label"] == "entailment")
            for r in records
            if r["label"] != "neutral"
        ]
    return [(" ".join(r["images"]), r["sentence"], r["label"] == "True") for r in records]


@pytest.mark.parametrize(  # the shifted test set has no twins (a plain test set of another distribution)
    "name", [n for n in ANNOTATION_FILES if not n.startswith(("refcoco", "shifted"))]
)
def test_near_miss_texts_in_every_split(out: Path, scenes: dict, name: str) -> None:
    split = ANNOTATION_FILES[name]
    items = _labelled_texts(out, name, split)
    by_bag: dict[tuple[str, ...], set[tuple[str, str, bool]]] = {}
    for item in items:
        by_bag.setdefault(_bag(item[1]), set()).add(item)
    found = []
    for group in by_bag.values():
        for img1, t1, v1 in group:
            for img2, t2, v2 in group:
                if t1 == t2:
                    continue
                if split.startswith(("pretrain", "retrieval")):
                    # both captions true, of different images, and each false of the other image
                    m1, m2 = EXISTENTIAL_REL.search(t1), EXISTENTIAL_REL.search(t2)
                    if img1 != img2 and m1 and m2:
                        o1, o2 = scenes[img1]["objects"], scenes[img2]["objects"]
                        if not existential_rel(o2, m1) and not existential_rel(o1, m2):
                            found.append((t1, t2))
                elif img1 == img2 and v1 and not v2:  # same words, same picture, opposite labels
                    found.append((t1, t2))
    assert found, f"no near-miss pair in {name}"


def test_twin_images_in_every_split(scenes: dict) -> None:
    for split in (s for s in synth.SPLITS if s not in synth.SHIFTED_SPLITS):  # a plain test set: no twins
        twins = [
            (a, s["twin"])
            for a, s in scenes.items()
            if a.startswith(f"images/{split}/") and s["twin"] is not None
        ]
        assert twins, split
        for a, b in twins:
            assert b.startswith(f"images/{split}/") and scenes[b]["twin"] == a
            oa, ob = scenes[a]["objects"], scenes[b]["objects"]
            assert [(o["shape"], o["x"], o["y"], o["size"]) for o in oa] == [
                (o["shape"], o["x"], o["y"], o["size"]) for o in ob
            ]
            changed = [i for i, (p, q) in enumerate(zip(oa, ob)) if p["color"] != q["color"]]
            assert len(changed) == 2  # the colours of two objects are swapped
            i, j = changed
            assert (oa[i]["color"], oa[j]["color"]) == (ob[j]["color"], ob[i]["color"])


def test_make_twins_gives_a_same_words_near_miss() -> None:
    for seed in range(40):
        a, b, rel_a, rel_b = synth.make_twins(np.random.default_rng(seed), 96)
        t_a = synth.relation_text(rel_a, np.random.default_rng(seed), "caption")
        t_b = synth.relation_text(rel_b, np.random.default_rng(seed), "caption")
        assert t_a != t_b and _bag(t_a) == _bag(t_b)
        oa, ob = a.to_dict()["objects"], b.to_dict()["objects"]
        ma, mb = EXISTENTIAL_REL.search(t_a), EXISTENTIAL_REL.search(t_b)
        assert existential_rel(oa, ma) and not existential_rel(ob, ma)
        assert existential_rel(ob, mb) and not existential_rel(oa, mb)


# ---------------------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------------------


def test_referring_expressions_pick_exactly_their_object(out: Path, scenes: dict) -> None:
    inst = load(out, "refcoco+/instances.json")
    images = {i["id"]: i for i in inst["images"]}
    anns = {a["id"]: a for a in inst["annotations"]}
    dets = load(out, "refcoco+/dets.json")
    refs = pickle.loads((out / "refcoco+/refs(unc).p").read_bytes())
    n_sent = 0
    for ref in refs:
        image, ann = images[ref["image_id"]], anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"]
        objects = scenes[image["file_name"]]["objects"]
        target = [i for i, o in enumerate(objects) if o["bbox"] == ann["bbox"]]
        assert len(target) == 1
        assert synth.SHAPES[ref["category_id"] - 1] == objects[target[0]]["shape"]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= image["width"] and y + h <= image["height"]
        for s in ref["sentences"]:
            hits = resolve(objects, s["sent"])
            assert hits is not None, f"not in the grammar: {s['sent']!r}"
            assert hits == target, (image["file_name"], s["sent"], hits, target)
            n_sent += 1
        boxes = dets[str(ref["image_id"])]
        assert max(iou(b[:4], ann["bbox"]) for b in boxes) >= 0.5  # the true object is among the proposals
        for bx, by, bw, bh, _score in boxes:
            assert (
                bx >= 0 and by >= 0 and bx + bw <= image["width"] + 1e-6 and by + bh <= image["height"] + 1e-6
            )
    assert n_sent >= 40
    kinds = Counter(
        "extreme"
        if EXTREME.match(s["sent"])
        else "relation"
        if DEFINITE_REL.match(s["sent"])
        else "attribute"
        for ref in refs
        for s in ref["sentences"]
    )
    assert min(kinds.values()) >= 3 and len(kinds) == 3


def test_grounding_splits_follow_refer(out: Path) -> None:
    refs = {r["ref_id"]: r for r in pickle.loads((out / "refcoco+/refs(unc).p").read_bytes())}
    assert {r["split"] for r in refs.values()} == {"train", "val", "testA", "testB"}
    assert {refs[r["ref_id"]]["split"] for r in load(out, "refcoco+_val.json")} == {"val"}
    assert {refs[r["ref_id"]]["split"] for r in load(out, "refcoco+_test.json")} == {"testA", "testB"}
    for name in ("val", "test"):
        for r in load(out, f"refcoco+_{name}.json"):
            assert r["text"] in [s["sent"] for s in refs[r["ref_id"]]["sentences"]]
    train_texts = Counter(r["text"] for r in load(out, "refcoco+_train.json"))
    ref_texts = Counter(s["sent"] for r in refs.values() if r["split"] == "train" for s in r["sentences"])
    assert train_texts == ref_texts


# ---------------------------------------------------------------------------------------------------------
# Data card and samples
# ---------------------------------------------------------------------------------------------------------


def test_data_card_counts_match_files(out: Path) -> None:
    card = load(out, "data_card.json")
    assert card["seed"] == 0 and card["image_size"] == 64
    assert "workers" not in card["config"]
    for name, n in card["records_per_file"].items():
        obj = pickle.loads((out / name).read_bytes()) if name.endswith(".p") else load(out, name)
        expected = len(obj["annotations"]) if name.endswith("instances.json") else len(obj)
        assert n == expected, name
    assert set(ANNOTATION_FILES) <= set(card["records_per_file"])
    for split, n in card["images_per_split"].items():
        assert n == len(list((out / "images" / split).iterdir())), split
    assert card["images_total"] == len(list((out / "images").rglob("*.jpg")))
    ve = Counter(r["label"] for s in ("train", "dev", "test") for r in load(out, f"ve_{s}.json"))
    assert card["labels"]["ve"] == dict(ve)
    nlvr = Counter(r["label"] for s in ("train", "dev", "test") for r in load(out, f"nlvr_{s}.json"))
    assert card["labels"]["nlvr"] == dict(nlvr)
    n_questions = len(load(out, "vqa_train.json")) + len(load(out, "vqa_test.json"))
    assert sum(card["labels"]["vqa_answer_types"].values()) == n_questions
    assert set(card["labels"]["vqa_question_types"]) == {"color", "shape", "count", "existence", "relation"}
    # vocabulary: every word of every text (each distinct VQA answer of a question once), after the
    # official cleaning (only "?" and "," occur)
    texts = [c for _, c in _captions(out)]
    for s in ("train", "test"):
        for r in load(out, f"vqa_{s}.json"):
            texts += [r["question"], *set(r.get("answer", []))]
    texts += [a for v in load(out, "vqa_test_answers.json").values() for a in set(v)]
    for s in ("train", "dev", "test"):
        texts += [r["sentence"] for r in load(out, f"ve_{s}.json") + load(out, f"nlvr_{s}.json")]
    texts += [r["text"] for s in ("train", "val", "test") for r in load(out, f"refcoco+_{s}.json")]
    words = Counter(w for t in texts for w in re.findall(r"[a-z0-9]+", t.lower()))
    assert card["vocabulary"]["words"] == dict(words)
    assert card["vocabulary"]["size"] == len(words)
    md = (out / "data_card.md").read_text()
    assert all(f"`{name}`" in md for name in ANNOTATION_FILES)


def test_samples_png(out: Path) -> None:
    raw = (out / "samples.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "samples.png") as im:
        im.verify()
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.width >= 4 * 192 and im.height >= 4 * 192


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="grounding_images"):
        SynthConfig(grounding_images=5)
    with pytest.raises(ValueError, match="pretrain_images"):
        SynthConfig(pretrain_images=-1)
    with pytest.raises(TypeError, match="image_size"):
        SynthConfig(image_size=96.0)


# ---------------------------------------------------------------------------------------------------------
# The shifted retrieval test set (cross-dataset zero-shot transfer)
# ---------------------------------------------------------------------------------------------------------


def test_shifted_test_set_is_a_valid_retrieval_split_of_another_distribution(out: Path, scenes: dict) -> None:
    from albef.data.formats import record_problem

    records = load(out, "shifted_test.json")
    assert len(records) == SMALL["shifted_test_images"]
    assert all(record_problem(r, "retrieval_eval") is None for r in records)
    assert all(len(r["caption"]) == 5 and r["image"].startswith("images/shifted_test/") for r in records)
    shifted = load(out, "scenes_shifted.json")
    assert set(shifted) == {r["image"] for r in records}
    # no other file (training or not) uses its images, and they are no other split's images re-encoded
    others = {img for split, imgs in _referenced(out).items() if split != "shifted_test" for img in imgs}
    assert not others & set(shifted) and not set(scenes) & set(shifted)
    # busier scenes than in-domain ...
    mean = lambda ss: sum(len(s["objects"]) for s in ss) / len(ss)  # noqa: E731
    assert mean(list(shifted.values())) > mean(list(scenes.values())) + 0.5
    # ... and a lower-contrast camera, yet every object keeps the colour its captions name
    palette = {name: np.array(rgb, dtype=np.float32) for name, rgb in synth.COLORS.items()}
    spread = {"in": [], "shifted": []}
    for table, key in ((scenes, "in"), (shifted, "shifted")):
        for rel, scene in table.items():
            arr = np.asarray(Image.open(out / rel).convert("RGB"), dtype=np.float32)
            spread[key].append(float(arr.std()))
            if key == "shifted":
                for o in scene["objects"]:
                    px = arr[int(o["y"]), int(o["x"])]
                    assert min(palette, key=lambda c: float(np.sum((palette[c] - px) ** 2))) == o["color"]
    assert np.mean(spread["shifted"]) < 0.85 * np.mean(spread["in"])
    # captions are true of the shifted scenes (the same independent reading as in-domain)
    kinds = Counter(check_caption(shifted[r["image"]]["objects"], c) for r in records for c in r["caption"])
    assert kinds["relation"] > 0 and kinds["listing"] > 0
    card = load(out, "data_card.json")
    assert card["images_per_split"]["shifted_test"] == len(records)
    assert sum(card["shifted"]["objects_per_image"].values()) == len(records)


def test_adding_the_shifted_split_leaves_every_other_file_unchanged(out: Path, tmp_path: Path) -> None:
    """The rest of the pipeline's data (and its DVC digests) do not move when the shifted set is added."""
    generate(SynthConfig(seed=0, workers=2, **{**SMALL, "shifted_test_images": 0}), tmp_path / "none", False)
    with_shift, without = _files(out), _files(tmp_path / "none")
    shifted = {"shifted_test.json", "scenes_shifted.json"}  # written empty when the split has no image
    changed = sorted(n for n in without if with_shift.get(n) != without[n] and n not in shifted)
    assert changed == ["data_card.json", "data_card.md"]  # it counts the new split
    added = {n for n in with_shift if n not in without}
    assert added and all(n.startswith("images/shifted_test/") for n in added)


def test_caption_overlap_counts_captions_shared_word_for_word(out: Path, tmp_path: Path) -> None:
    """benchmarks/caption_overlap.py, on the generated files and on a hand-made one."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import caption_overlap

    records = [
        {"image": "a.jpg", "caption": ["a red circle", "two shapes"]},
        {"image": "b.jpg", "caption": ["a blue square", "two shapes"]},
        {"image": "c.jpg", "caption": "two shapes"},
    ]
    row = caption_overlap.overlap(records)
    assert (row["captions"], row["distinct"], row["shared"]) == (5, 3, 3)
    assert row["most_shared"][0] == ["two shapes", 3]
    assert caption_overlap.main([str(out), "--json", str(tmp_path / "overlap.json")]) == 0
    counts = json.loads((tmp_path / "overlap.json").read_text())
    assert {"pretrain.json", "retrieval_test.json"} <= set(counts)
    assert all(0 <= c["shared"] <= c["captions"] for c in counts.values())
