"""The RefCOCO+ evaluation assets the official ``Grounding.py`` reads, loaded and checked safely.

A folder holds ``instances.json`` (COCO style: images with sizes, annotations with ``[x, y, w, h]`` boxes),
``refs(unc).p`` (the REFER API's pickle: ``ref_id`` -> ``ann_id``, split, sentences) and ``dets.json``
(proposal boxes per image id). The pickle is read with an unpickler that only builds plain containers
and numbers, so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

REFS_FILE = "refs(unc).p"


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # every global is refused
        raise pickle.UnpicklingError(
            f"{REFS_FILE} may only hold plain lists, dicts, strings and numbers; found {module}.{name}"
        )


def load_refs(path: str | Path) -> list[dict]:
    data = _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of ref dicts")
    return data


@dataclass
class GroundingAssets:
    boxes: dict[int, tuple[list[float], int, int]]  # ref_id -> (box [x, y, w, h], image width, image height)
    split: dict[int, str]  # ref_id -> val / testA / testB / train
    proposals: dict[str, list[list[float]]]  # image id -> [[x, y, w, h, score], ...]

    @classmethod
    def load(cls, folder: str | Path) -> GroundingAssets:
        folder = Path(folder)
        for name in ("instances.json", REFS_FILE, "dets.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"grounding assets: {folder / name} not found")
        instances = json.loads((folder / "instances.json").read_text())
        sizes = {img["id"]: (img["width"], img["height"]) for img in instances["images"]}
        anns = {ann["id"]: ann for ann in instances["annotations"]}
        boxes, split = {}, {}
        for ref in load_refs(folder / REFS_FILE):
            split[ref["ref_id"]] = ref.get("split", "")
            ann = anns.get(ref.get("ann_id"))
            if ann is not None and ann["image_id"] in sizes:
                boxes[ref["ref_id"]] = (list(ann["bbox"]), *sizes[ann["image_id"]])
        proposals = json.loads((folder / "dets.json").read_text())
        return cls(boxes, split, proposals)

    def box_problem(self, ref_id: int) -> str | None:
        """Why the ground-truth box of ``ref_id`` cannot be used (missing, empty, outside its image), or None."""
        if ref_id not in self.boxes:
            return f"ref_id {ref_id} has no box in instances.json/{REFS_FILE}"
        (x, y, w, h), width, height = self.boxes[ref_id]
        if w <= 0 or h <= 0:
            return f"ref_id {ref_id}: empty box {[x, y, w, h]}"
        if x < 0 or y < 0 or x + w > width + 1 or y + h > height + 1:  # +1: inclusive pixel coordinates
            return f"ref_id {ref_id}: box {[x, y, w, h]} lies outside its {width}x{height} image"
        return None
