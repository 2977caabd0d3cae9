"""The synthetic benchmark written out: its configuration, the per-image work (in worker processes), the
annotation files in the official formats, the scenes, the data card and the sample sheet."""

from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from albef.data.synth.language import (
    captions,
    nlvr_statements,
    proposals,
    referring_expressions,
    relation_caption,
    relation_text,
    ve_claims,
    ve_statements,
    vqa_answers,
    vqa_questions,
)
from albef.data.synth.scenes import (
    CRISP,
    SHAPES,
    SHIFT_BLUR,
    SHIFT_CONTRAST,
    SHIFT_N_OBJECTS_P,
    SHIFTED_SPLITS,
    SPLITS,
    Rel,
    make_scene,
    make_twins,
    render,
    render_shifted,
)
from albef.data.text import pre_caption

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


def _task(split: str) -> str:
    return split.rsplit("_", 1)[0] if "_" in split else split


def image_name(split: str, index: int, part: int | None = None) -> str:
    """The image path relative to the output directory (its image root)."""
    stem = f"{index:06d}" if part is None else f"{index:06d}-{part}"
    return f"images/{split}/{stem}.jpg"


@dataclass(frozen=True)
class _Chunk:
    cfg: SynthConfig
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
        return np.random.default_rng([c.cfg.seed, code, *stream])

    if task == "nlvr":
        return _build_nlvr(c, index, rng)
    if c.split in SHIFTED_SPLITS:
        return _build_shifted(c, index, rng)
    pair = index // 2
    twin = pair % c.cfg.twin_period == 0 and 2 * pair + 1 < c.n
    near: tuple[Rel, Rel] | None = None
    # SNLI-VE wants a form of claim that takes every label in each scene; the scenes without one are drawn
    # again from the same generator.
    if twin:
        twin_rng = rng(2 * pair, 1)
        a, b, rel_a, rel_b = make_twins(twin_rng, c.cfg.image_size)
        while task == "ve" and not (ve_claims(a) and ve_claims(b)):
            a, b, rel_a, rel_b = make_twins(twin_rng, c.cfg.image_size)
        scene, near = (a, (rel_a, rel_b)) if index % 2 == 0 else (b, (rel_b, rel_a))
    else:
        scene_rng = rng(index, 0)
        scene = make_scene(scene_rng, c.cfg.image_size)
        while task == "ve" and not ve_claims(scene):
            scene = make_scene(scene_rng, c.cfg.image_size)
    text_rng = rng(index, 2)

    def near_text(style: str) -> tuple[str, ...]:
        # The same generator state for both relations and both twins: same words, different bindings.
        assert near is not None
        if style == "caption":  # the whole scene: the twins' other objects are the same
            rest = [o for o, o_twin in zip(a.objects, b.objects) if o == o_twin]
            return tuple(relation_caption(r, rest, rng(2 * pair, 3), with_size=False) for r in near)
        return tuple(relation_text(r, rng(2 * pair, 3), style) for r in near)

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
    scene = make_scene(rng(index, 0), c.cfg.image_size, n_objects_p=SHIFT_N_OBJECTS_P)
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
    if index % c.cfg.twin_period == 0:
        a, b, rel_a, rel_b = make_twins(rng(index, 1), c.cfg.image_size)
        a_left = bool(rng(index, 5).random() < 0.5)
        left, right = (a, b) if a_left else (b, a)
        # "in the left image <rel_a>" is true iff a is on the left; "<rel_b>" the other way round.
        t_a, t_b = (relation_text(r, rng(index, 3), "nlvr:left") for r in (rel_a, rel_b))
        near = (t_a, t_b) if a_left else (t_b, t_a)
    else:
        left = make_scene(rng(index, 0), c.cfg.image_size)
        rng_right = rng(index, 4)
        include: list[tuple[str, str, str]] = []
        if rng_right.random() < 0.5:  # correlated pairs make "both"/"more" statements interesting
            k = int(rng_right.integers(1, len(left.objects) + 1))
            picks = rng_right.choice(len(left.objects), size=k, replace=False)
            include = [
                (left.objects[i].shape, left.objects[i].color, left.objects[i].size) for i in sorted(picks)
            ]
        right = make_scene(rng_right, c.cfg.image_size, include=include)
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
    # the shifted split is kept out of texts and scenes: the in-domain card stays as it was
    for split in ("retrieval_val", "retrieval_test", *SHIFTED_SPLITS):
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

    for split in ("ve_train", "ve_dev", "ve_test", "nlvr_train", "nlvr_dev", "nlvr_test"):
        task = split.split("_")[0]
        records = []
        for it in items[split]:
            image = {"image": it["image"][: -len(".jpg")]} if task == "ve" else {"images": it["images"]}
            for s, label in it["statements"]:  # VE: a class name; NLVR2: the truth, "True" / "False"
                records.append({**image, "sentence": s, "label": str(label)})
                labels[task][str(label)] += 1
                out.texts.append(s)
        out.files[f"{split}.json"] = records
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


def _card(cfg: SynthConfig, out: _Outputs, counts: dict[str, int]) -> dict[str, Any]:
    vocab = Counter(word for t in out.texts for word in pre_caption(t, 10**6).split())
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

    per_item = {s: 2 if s.startswith("nlvr") else 1 for s in sizes}  # images per item: an NLVR2 pair has two
    counts = {s: n * per_item[s] for s, n in sizes.items()}  # images per split
    total = sum(counts.values())
    per_chunk = max(4, min(64, total // (cfg.workers * 8) or 1))
    chunks = [
        _Chunk(cfg, str(out), split, sizes[split], start, min(start + per_chunk, sizes[split]))
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
                bar.update((chunk.stop - chunk.start) * per_item[chunk.split])
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
    card = _card(cfg, outputs, counts)
    _write_json(out / "data_card.json", card, indent=2)
    (out / "data_card.md").write_text(_card_markdown(card))
    samples = [(r["image"], r["caption"]) for r in outputs.files["pretrain.json"][::2]]
    samples += [(r["image"], r["caption"]) for r in outputs.files["retrieval_train.json"][::5]]
    _samples_png(out, samples[:16], out / "samples.png")
    return card
