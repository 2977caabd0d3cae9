"""One screen of results: every task's headline metric next to its chance or trivial baseline and the
registry's champion, from the metrics files the pipeline wrote (``albef report``, DVC stage ``summary``).

VQA, SNLI-VE and NLVR2 are shown beside their measured text-only baseline where the evaluation wrote one (a
classifier of the question, hypothesis or statement alone, :mod:`albef.eval.text_baseline`): what the model
reaches above it, it learnt from the image. Without one, SNLI-VE and NLVR2 fall back to the majority class.

It reads files only (no MLflow, no model), so it runs wherever the metrics are: after ``dvc repro``, in a
DVC experiment's workspace, on a bare GPU machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from albef.io import atomic_write_text


@dataclass(frozen=True)
class Task:
    name: str
    metrics: str  # the evaluation's metrics file, relative to the project
    register: str | None  # the registration summary (champion), if the task is registered


TASKS = (
    Task("zero-shot retrieval", "metrics/zeroshot.json", None),
    Task("retrieval (finetuned)", "metrics/retrieval.json", "metrics/register.json"),
    Task("zero-shot transfer (shifted)", "metrics/zeroshot_shifted.json", None),
    Task("VQA", "metrics/vqa.json", "metrics/register_vqa.json"),
    Task("SNLI-VE", "metrics/ve.json", "metrics/register_ve.json"),
    Task("NLVR2", "metrics/nlvr.json", "metrics/register_nlvr.json"),
    Task("grounding (Grad-CAM)", "metrics/grounding.json", "metrics/register_grounding.json"),
)


@dataclass
class Row:
    task: str
    metric: str
    value: float | None
    baseline: float | None
    baseline_name: str
    champion: str  # "v3" (the version the champion alias points at), or why there is none
    detail: str


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _champion(path: Path | None) -> str:
    if path is None:
        return ""
    summary = _read(path)
    if summary is None:
        return "not registered"
    if not summary.get("registered"):
        return f"not registered ({summary.get('reason', 'unknown')})"
    champion = summary["version"] if summary.get("promoted") else summary.get("champion_before")
    return (
        f"v{champion}" if champion is not None else "none (gate rejected v{})".format(summary.get("version"))
    )


def _row(task: Task, metrics: dict[str, Any], champion: str) -> Row:
    row = partial(Row, task.name, champion=champion)  # (metric, value, baseline, baseline_name, detail=...)
    if "r_mean" in metrics:  # retrieval: chance R@1 is 5 captions / all texts (TR), 1 / images (IR)
        chance = metrics.get("chance_r1") or {}
        baseline = (chance["txt"] + chance["img"]) / 2 if {"txt", "img"} <= set(chance) else None
        detail = f"TR@1 {metrics.get('txt_r1', 0):.1f}, IR@1 {metrics.get('img_r1', 0):.1f}"
        value = (metrics["txt_r1"] + metrics["img_r1"]) / 2
        return row(
            "R@1 mean (TR, IR)", value, baseline, "chance", detail=f"{detail}; r_mean {metrics['r_mean']:.1f}"
        )
    if "majority_baseline" in metrics:  # SNLI-VE, NLVR2
        detail = f"{metrics.get('records', '?')} records"
        majority = metrics["majority_baseline"]
        for key, text in (("hypothesis_only_accuracy", "hypothesis"), ("sentence_only_accuracy", "sentence")):
            if metrics.get(key) is not None:
                return row(
                    "accuracy",
                    metrics.get("accuracy"),
                    metrics[key],
                    f"text only ({text})",
                    detail=f"{detail}; majority class {majority:.1f}",
                )
        return row("accuracy", metrics.get("accuracy"), majority, "majority class", detail=detail)
    if "val_d" in metrics or "layer" in metrics:  # grounding: a random proposal per expression
        splits = [v for v in (metrics.get("splits") or {}).values() if "random_proposal" in v]
        total = sum(s.get("expressions", 0) for s in splits)
        chance = (
            sum(s["random_proposal"] * s.get("expressions", 0) for s in splits) / total if total else None
        )
        detail = f"{metrics.get('expressions', '?')} expressions"
        return row("box accuracy", metrics.get("accuracy"), chance, "random proposal", detail=detail)
    # VQA: the question-only classifier from below (when evaluated with it), the answer-list oracle from above
    question_only = metrics.get("question_only_accuracy")
    return row(
        "VQA accuracy",
        metrics.get("accuracy"),
        question_only,
        "text only (question)" if question_only is not None else "",
        detail=f"{metrics.get('questions', '?')} questions; answer-list ceiling "
        f"{metrics.get('answer_list_oracle_accuracy', '?')}",
    )


def summarise(project: str | Path = ".") -> list[Row]:
    project = Path(project)
    rows = []
    for task in TASKS:
        metrics = _read(project / task.metrics)
        champion = _champion(project / task.register if task.register else None)
        if metrics is None:
            rows.append(
                Row(task.name, "", None, None, "", champion, f"not evaluated ({task.metrics} missing)")
            )
        else:
            rows.append(_row(task, metrics, champion))
    return rows


def table(rows: list[Row]) -> str:
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    header = ("task", "metric", "%", "baseline", "champion", "")
    body = [
        (
            r.task,
            r.metric,
            num(r.value),
            f"{num(r.baseline)} {r.baseline_name}".strip() if r.baseline is not None else "-",
            r.champion or "-",
            r.detail,
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def report_stage(project: str | Path = ".", out: str | Path | None = "metrics/summary.json") -> list[Row]:
    """Write ``out`` (one entry per task) and return the rows."""
    rows = summarise(project)
    if out is not None:
        path = Path(project) / out
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({r.task: asdict(r) for r in rows}, indent=2) + "\n")
    return rows
