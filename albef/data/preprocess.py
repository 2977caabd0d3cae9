"""``albef preprocess``: validate official-format annotations and their images, write image shards.

For every annotation file (and its task schema) each record is checked: schema types, text non-empty after
the official cleaning, images inside the image root, decodable, convertible to RGB and large enough.
Good records are kept with cleaned text; bad ones are dropped and counted by reason, naming the file,
the record index and the culprit, in ``report.json`` / ``report.md``. Images are resized to a longest
side and written once each into tar shards with a manifest (record counts, content hashes, byte offsets).

The run is restartable: images are assigned to shards in a fixed order, each finished shard is journalled,
and a rerun skips finished shards; a rerun on unchanged input does nothing at all. If more than
``max_drop_fraction`` of the records are dropped the run fails (after writing the report), naming the
reasons, because silently training on a fraction of the data is worse than stopping.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from albef.data.formats import (
    TEXT_KEY,
    AnnotationError,
    check_task,
    image_path_note,
    image_paths,
    read_json_list,
    record_problem,
    texts,
)
from albef.data.images import DECODER_VERSION, ImageProblem, encode_jpeg, open_rgb, resolve_inside
from albef.data.shards import sha256_file, write_shard
from albef.data.text import pre_caption, pre_question
from albef.io import atomic_write_text

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
MARKDOWN_ROWS = 1000  # report.json always lists every dropped record


class PreprocessError(RuntimeError):
    """Too many records were dropped, or the input cannot be processed at all."""


@dataclass
class PreprocessConfig:
    image_root: str
    out_dir: str
    files: dict[str, str]  # annotation file (relative to annotation_dir) -> task
    annotation_dir: str | None = None  # default: image_root
    answer_list: str | None = None  # VQA answer list, to count answers outside it
    # other files and folders to carry over (answer lists, evaluation assets)
    copy: list[str] = field(default_factory=list)
    # RefCOCO+ folder (instances.json, refs(unc).p, dets.json): grounding records with bad boxes are dropped
    grounding_assets: str | None = None
    max_side: int = 384
    min_side: int = 8
    max_pixels: int = 64_000_000
    max_words: int = 30
    shard_size: int = 1000
    workers: int = 2
    jpeg_quality: int = 95
    max_drop_fraction: float = 0.01

    def validate(self) -> PreprocessConfig:
        if not self.files:
            raise PreprocessError("preprocess.files is empty: name at least one annotation file and its task")
        for name, task in self.files.items():
            try:
                check_task(task)
            except AnnotationError as exc:
                raise PreprocessError(f"preprocess.files.{name}: {exc}") from exc
        for key in ("max_side", "min_side", "shard_size", "workers", "max_words", "max_pixels"):
            if getattr(self, key) <= 0:
                raise PreprocessError(f"preprocess.{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= self.max_drop_fraction <= 1.0:
            raise PreprocessError(
                f"preprocess.max_drop_fraction must be in [0, 1], got {self.max_drop_fraction}"
            )
        return self


@dataclass
class Drop:
    file: str
    index: int
    reason: str
    detail: str


@dataclass
class Report:
    records_in: int = 0
    records_kept: int = 0
    images_kept: int = 0
    dropped: list[Drop] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # kept records with a remark (truncated text, ...)
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)
    up_to_date: bool = False

    def reasons(self) -> Counter:
        return Counter(d.reason for d in self.dropped)

    def to_dict(self) -> dict:
        return {
            "records_in": self.records_in,
            "records_kept": self.records_kept,
            "records_dropped": len(self.dropped),
            "images_kept": self.images_kept,
            "dropped_by_reason": dict(sorted(self.reasons().items())),
            "notes": dict(sorted(self.notes.items())),
            "per_file": self.per_file,
            "dropped": [asdict(d) for d in self.dropped],
        }

    def to_markdown(self) -> str:
        lines = [
            "# Preprocessing report",
            "",
            f"- records in: {self.records_in}",
            f"- records kept: {self.records_kept}",
            f"- records dropped: {len(self.dropped)}",
            f"- images kept: {self.images_kept}",
            "",
            "| file | records | kept | dropped |",
            "|---|---:|---:|---:|",
        ]
        for name, counts in self.per_file.items():
            lines.append(f"| {name} | {counts['in']} | {counts['kept']} | {counts['in'] - counts['kept']} |")
        if self.dropped:
            lines += ["", "## Dropped, by reason", "", "| reason | count |", "|---|---:|"]
            lines += [f"| {reason} | {count} |" for reason, count in sorted(self.reasons().items())]
            lines += [
                "",
                "## Dropped records",
                "",
                "| file | record | reason | culprit |",
                "|---|---:|---|---|",
            ]
            for d in self.dropped[:MARKDOWN_ROWS]:
                lines.append(f"| {d.file} | {d.index} | {d.reason} | {d.detail} |")
            if len(self.dropped) > MARKDOWN_ROWS:
                lines.append(f"| ... | | | {len(self.dropped) - MARKDOWN_ROWS} more in report.json |")
        if self.notes:
            lines += ["", "## Kept with a note", ""]
            lines += [f"- {note}: {count}" for note, count in sorted(self.notes.items())]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- helpers


def _dumps(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, indent=None, separators=(",", ":"))


def _hash(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(_dumps(part).encode())
    return digest.hexdigest()


def _clean_record(record: dict, task: str, max_words: int) -> tuple[dict | None, str | None, list[str]]:
    """Cleaned copy of ``record`` (texts through the official cleaning), or a drop reason; plus notes."""
    notes = []
    clean = pre_question if task == "vqa" else pre_caption
    key = TEXT_KEY[task]
    out = dict(record)
    originals = texts(record, task)
    cleaned = [clean(t, max_words) for t in originals]
    if any(not c.strip() for c in cleaned):
        return None, "empty_text", notes
    if any(len(t.split()) > max_words for t in originals):
        notes.append("text_truncated")
    out[key] = cleaned if isinstance(record[key], list) else cleaned[0]
    return out, None, notes


def _process_image(args: tuple[str, str, int, int, int, int]) -> tuple[str, bytes | None, str | None, str]:
    root, key, max_side, min_side, max_pixels, quality = args
    try:
        path = resolve_inside(Path(root), key)
        image = open_rgb(path, min_side=min_side, max_pixels=max_pixels, max_side=max_side)
        return key, encode_jpeg(image, quality), None, ""
    except ImageProblem as exc:
        return key, None, exc.reason, exc.detail
    except OSError as exc:  # unreadable file (permissions, I/O error)
        return key, None, "unreadable_file", f"{key}: {exc}"


def _image_stat(root: Path, key: str) -> list:
    try:
        st = os.stat(root / key)
        return [key, st.st_size, st.st_mtime_ns]
    except OSError:
        return [key, None, None]


# ---------------------------------------------------------------------------- the stage


def preprocess(cfg: PreprocessConfig, progress: bool = True) -> Report:
    """Run the preprocessing stage. Returns the report; raises :class:`PreprocessError` on too many drops."""
    cfg.validate()
    root = Path(cfg.image_root)
    if not root.is_dir():
        raise PreprocessError(f"image root not found: {root}")
    ann_dir = Path(cfg.annotation_dir or cfg.image_root)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Restart state (shard journal, input fingerprint) lives beside the output, not in it: it holds file
    # times, and the output itself must be the same bytes for the same input content.
    state = out.parent / f".{out.name}.state"
    journal = state / "shards"
    journal.mkdir(parents=True, exist_ok=True)

    answers = set(read_json_list(ann_dir / cfg.answer_list)) if cfg.answer_list else None

    assets = None
    if cfg.grounding_assets:
        from albef.data.grounding import GroundingAssets

        try:
            assets = GroundingAssets.load(ann_dir / cfg.grounding_assets)
        except (OSError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            raise PreprocessError(f"preprocess.grounding_assets: {exc}") from exc

    # 1. records: schema, text, duplicates, image paths
    report = Report()
    kept: dict[str, list[tuple[int, dict]]] = {}
    needs: dict[str, list[tuple[str, int]]] = defaultdict(list)  # image key -> [(file, index)]
    file_hashes = {}
    for name, task in cfg.files.items():
        path = ann_dir / name
        records = read_json_list(path)  # file-level problems (missing, not UTF-8, malformed) are errors
        file_hashes[name] = sha256_file(path)
        report.records_in += len(records)
        report.per_file[name] = {"in": len(records), "kept": 0}
        seen: set[str] = set()
        kept[name] = []
        for index, record in enumerate(records):
            if problem := record_problem(record, task):
                reason = "nlvr_needs_two_images" if task == "nlvr" and "images" in problem else "bad_schema"
                report.dropped.append(Drop(name, index, reason, problem))
                continue
            fingerprint = _dumps(record)
            if fingerprint in seen:
                report.dropped.append(
                    Drop(name, index, "duplicate", "same record appears earlier in the file")
                )
                continue
            seen.add(fingerprint)
            cleaned, reason, notes = _clean_record(record, task, cfg.max_words)
            if cleaned is None:
                report.dropped.append(Drop(name, index, reason, f"text {texts(record, task)!r}"))
                continue
            if (
                task == "grounding_eval"
                and assets is not None
                and (problem := assets.box_problem(record["ref_id"]))
            ):
                reason = "ref_without_box" if "has no box" in problem else "box_outside_image"
                report.dropped.append(Drop(name, index, reason, problem))
                continue
            report.notes.update(notes)
            if task == "vqa" and answers is not None and "answer" in record:
                given = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
                unknown = [a for a in given if a not in answers]
                if unknown:
                    report.notes["vqa_answer_not_in_answer_list"] += len(unknown)
            keys = []
            try:
                for rel in image_paths(record, task):
                    resolve_inside(root, rel)
                    keys.append(os.path.normpath(rel))
            except ImageProblem as exc:
                report.dropped.append(Drop(name, index, exc.reason, exc.detail))
                continue
            for key in keys:
                needs[key].append((name, index))
            kept[name].append((index, cleaned))

    # 2. images, in fixed shard slices; finished slices are journalled and skipped on a rerun
    keys = sorted(needs)
    settings = [cfg.max_side, cfg.min_side, cfg.max_pixels, cfg.jpeg_quality, FORMAT_VERSION, DECODER_VERSION]
    extras = {name: _tree_hash(ann_dir / name) for name in [*cfg.copy, cfg.grounding_assets] if name}
    fingerprint = _hash(asdict(cfg), settings, file_hashes, extras, [_image_stat(root, k) for k in keys])
    manifest_path = out / "manifest.json"
    done_path = state / "done.json"
    if manifest_path.is_file() and done_path.is_file():
        done = json.loads(done_path.read_text())
        current = json.loads(manifest_path.read_text())
        if (
            done.get("fingerprint") == fingerprint
            and done.get("manifest_sha256") == sha256_file(manifest_path)
            and all((out / s["name"]).is_file() for s in current["shards"])
        ):
            log.info("preprocess: inputs unchanged since the last run; nothing to do")
            stored = json.loads((out / "report.json").read_text())
            counts = {k: stored[k] for k in ("records_in", "records_kept", "images_kept", "per_file")}
            dropped = [Drop(**d) for d in stored["dropped"]]
            return Report(**counts, dropped=dropped, notes=Counter(stored["notes"]), up_to_date=True)

    bad_images: dict[str, tuple[str, str]] = {}
    shards = []
    todo = []
    for number, start in enumerate(range(0, len(keys), cfg.shard_size)):
        slice_keys = keys[start : start + cfg.shard_size]
        name = f"images/shard-{number:06d}.tar"
        slice_id = _hash(settings, [_image_stat(root, k) for k in slice_keys])
        entry = journal / f"shard-{number:06d}.json"
        if entry.is_file() and (out / name).is_file():
            done = json.loads(entry.read_text())
            if done.get("slice_id") == slice_id:
                shards.append(done["shard"])
                bad_images.update({k: tuple(v) for k, v in done["bad"].items()})
                continue
        todo.append((number, name, slice_keys, slice_id, entry))

    (out / "images").mkdir(exist_ok=True)
    total = sum(len(t[2]) for t in todo)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="preprocess images", unit="img", disable=not progress)
    # workers == 1: the same code path without processes
    with ProcessPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else nullcontext() as pool:
        for _number, name, slice_keys, slice_id, entry in todo:
            jobs = [
                (str(root), k, cfg.max_side, cfg.min_side, cfg.max_pixels, cfg.jpeg_quality)
                for k in slice_keys
            ]
            good: list[tuple[str, bytes]] = []
            bad: dict[str, tuple[str, str]] = {}
            results = pool.map(_process_image, jobs, chunksize=16) if pool else map(_process_image, jobs)
            for key, data, reason, detail in results:
                if data is None:
                    bad[key] = (reason, detail)
                else:
                    good.append((key, data))
                bar.update(1)
            members = write_shard(out / name, good)
            shard = {
                "name": name,
                "sha256": sha256_file(out / name),
                "count": len(members),
                "members": [[m.key, m.offset, m.size] for m in members],
            }
            atomic_write_text(entry, _dumps({"slice_id": slice_id, "shard": shard, "bad": bad}))
            shards.append(shard)
            bad_images.update(bad)
    bar.close()
    shards.sort(key=lambda s: s["name"])
    for stale in (out / "images").glob("shard-*.tar"):
        if stale.name not in {Path(s["name"]).name for s in shards}:
            stale.unlink()

    # 3. records whose images failed are dropped, naming the image
    outputs = {}
    for name, records in kept.items():
        task = cfg.files[name]
        good_records = []
        for index, record in records:
            failed = [k for k in map(os.path.normpath, image_paths(record, task)) if k in bad_images]
            if failed:
                reason, detail = bad_images[failed[0]]
                if reason == "missing_file" and (note := image_path_note(record, task)):
                    detail = f"{detail} ({note})"
                report.dropped.append(Drop(name, index, reason, detail))
            else:
                good_records.append(record)
        report.per_file[name]["kept"] = len(good_records)
        report.records_kept += len(good_records)
        outputs[name] = good_records
    report.dropped.sort(key=lambda d: (d.file, d.index))
    report.images_kept = sum(s["count"] for s in shards)

    for name, records in outputs.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(records, ensure_ascii=False, indent=0, sort_keys=True))
    for extra in cfg.copy:
        _copy_extra(ann_dir, out, extra)
    atomic_write_text(out / "report.json", json.dumps(report.to_dict(), indent=2))
    atomic_write_text(out / "report.md", report.to_markdown())

    fraction = len(report.dropped) / max(report.records_in, 1)
    if fraction > cfg.max_drop_fraction:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.reasons().most_common())
        # no manifest: the output is not a valid dataset, and a rerun must not think it is up to date
        manifest_path.unlink(missing_ok=True)
        done_path.unlink(missing_ok=True)
        raise PreprocessError(
            f"dropped {len(report.dropped)} of {report.records_in} records ({fraction:.1%}) > "
            f"preprocess.max_drop_fraction ({cfg.max_drop_fraction:.1%}); reasons: {reasons}. "
            f"See {out / 'report.md'}"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": asdict(cfg),
        "files": {
            name: {"task": cfg.files[name], "records": len(outputs[name]), "sha256": sha256_file(out / name)}
            for name in outputs
        },
        "shards": shards,
        "images": report.images_kept,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    atomic_write_text(
        done_path, _dumps({"fingerprint": fingerprint, "manifest_sha256": sha256_file(manifest_path)})
    )
    return report


def _tree_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return _hash(
            sorted((str(p.relative_to(path)), sha256_file(p)) for p in path.rglob("*") if p.is_file())
        )
    return "missing"


def _copy_extra(src_root: Path, out: Path, name: str) -> None:
    import shutil

    src = src_root / name
    if not src.exists():
        raise PreprocessError(f"preprocess.copy: {src} not found")
    dst = out / name
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
