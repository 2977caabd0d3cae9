"""The official ALBEF annotation formats (ALBEF-SPEC §4.1): reading, validating and walking records.

Every annotation file is a JSON list of objects. The schema depends on the task:

==================  ===========================================================================
task                keys (types)
==================  ===========================================================================
pretrain            image (str), caption (str or list of str)
retrieval_train     image (str), caption (str), image_id (str or int)
retrieval_eval      image (str), caption (list of str; 5 in COCO/Flickr30K)
vqa                 question_id (int), image (str), question (str), [answer (str or list)], [dataset]
ve                  image (str: a bare id gets ".jpg"; a path with an extension is kept), sentence (str),
                    label (str)
nlvr                images (list of 2 str), sentence (str), label ("True" / "False" strings)
grounding_train     image (str), text (str)
grounding_eval      image (str), text (str), ref_id (int)
==================  ===========================================================================

Image paths are relative to an image root given separately (the official configs keep it outside the
annotation files).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VE_LABELS = ("contradiction", "neutral", "entailment")  # official ids 0, 1, 2
NLVR_LABELS = ("False", "True")


class AnnotationError(ValueError):
    """An annotation file cannot be read, or a record does not fit its task's schema."""


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    required: bool = True
    check: Callable[[Any], str | None] | None = None  # returns a problem description or None


def _str_list(value: Any, n: int | None = None) -> str | None:
    if not all(isinstance(v, str) for v in value):
        return "must be a list of strings"
    if n is not None and len(value) != n:
        return f"must hold exactly {n} entries, got {len(value)}"
    if not value:
        return "must not be empty"
    return None


def _one_of(*allowed: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"must be one of {list(allowed)}, got {v!r}"


SCHEMAS: dict[str, dict[str, Field]] = {
    "pretrain": {
        "image": Field((str,)),
        "caption": Field((str, list), check=lambda v: _str_list(v) if isinstance(v, list) else None),
    },
    "retrieval_train": {"image": Field((str,)), "caption": Field((str,)), "image_id": Field((str, int))},
    "retrieval_eval": {"image": Field((str,)), "caption": Field((list,), check=_str_list)},
    "vqa": {
        "question_id": Field((int,)),
        "image": Field((str,)),
        "question": Field((str,)),
        "answer": Field(
            (str, list), required=False, check=lambda v: _str_list(v) if isinstance(v, list) else None
        ),
        "dataset": Field((str,), required=False, check=_one_of("vqa", "vg")),
    },
    "ve": {
        "image": Field((str,)),
        "sentence": Field((str,)),
        "label": Field((str,), check=_one_of(*VE_LABELS)),
    },
    "nlvr": {
        "images": Field((list,), check=lambda v: _str_list(v, 2)),
        "sentence": Field((str,)),
        "label": Field((str,), check=_one_of(*NLVR_LABELS)),
    },
    "grounding_train": {"image": Field((str,)), "text": Field((str,))},
    "grounding_eval": {"image": Field((str,)), "text": Field((str,)), "ref_id": Field((int,))},
}

#: which key holds the text of each task (a string or a list of strings)
TEXT_KEY = {
    "pretrain": "caption",
    "retrieval_train": "caption",
    "retrieval_eval": "caption",
    "vqa": "question",
    "ve": "sentence",
    "nlvr": "sentence",
    "grounding_train": "text",
    "grounding_eval": "text",
}


def check_task(task: str) -> None:
    if task not in SCHEMAS:
        raise AnnotationError(f"unknown task {task!r}; choose one of {sorted(SCHEMAS)}")


def record_problem(record: Any, task: str) -> str | None:
    """Why ``record`` does not fit the schema of ``task`` (a short reason naming the key), or None."""
    check_task(task)
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    for key, spec in SCHEMAS[task].items():
        if key not in record:
            if spec.required:
                return f"missing key '{key}'"
            continue
        value = record[key]
        # bool is an int in Python, but a JSON true is never a valid id or label here
        if isinstance(value, bool) or not isinstance(value, spec.types):
            names = " or ".join(t.__name__ for t in spec.types)
            return f"key '{key}' must be {names}, got {type(value).__name__}"
        if spec.check is not None and (problem := spec.check(value)):
            return f"key '{key}' {problem}"
    return None


#: extensions that mark an SNLI-VE ``image`` as a file name rather than a bare Flickr30K id
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")


def ve_image_path(image: str) -> str:
    """The file of an SNLI-VE ``image``: the official files hold bare Flickr30K ids (``"2248275918"``) and the
    official loader appends ``.jpg``; a value that already ends in an image extension (``"x.jpg"``, a
    custom file) is used as it is."""
    return image if image.lower().endswith(IMAGE_EXTENSIONS) else image + ".jpg"


def image_paths(record: dict, task: str) -> list[str]:
    """Relative image paths of a record (see :func:`ve_image_path` for SNLI-VE)."""
    if task == "nlvr":
        return list(record["images"])
    if task == "ve":
        return [ve_image_path(record["image"])]
    return [record["image"]]


def image_path_note(record: dict, task: str) -> str:
    """For a record whose image is missing: how its path was made from the record, when it is not the
    record's value verbatim (SNLI-VE's appended ``.jpg``); else empty."""
    if task == "ve" and isinstance(record.get("image"), str):
        image = record["image"]
        tried = ve_image_path(image)
        if tried != image:
            return (
                f"SNLI-VE image {image!r} has no image extension, so {tried!r} was tried ('.jpg' appended, "
                f"as the official loader does)"
            )
        return f"SNLI-VE image {image!r} has an image extension, so it was tried as it is"
    return ""


def texts(record: dict, task: str) -> list[str]:
    value = record[TEXT_KEY[task]]
    return list(value) if isinstance(value, list) else [value]


def read_json_list(path: str | Path) -> list:
    """A JSON file holding a list; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    return data


def load_annotations(path: str | Path, task: str) -> list[dict]:
    """Read an official annotation file and validate every record; the first bad record is an error naming
    the file, its index and the key. (Preprocessing instead drops bad records and reports them.)"""
    check_task(task)
    records = read_json_list(path)
    for index, record in enumerate(records):
        if problem := record_problem(record, task):
            raise AnnotationError(f"{path}: record {index}: {problem}")
    return records
