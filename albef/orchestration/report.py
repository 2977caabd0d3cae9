"""What a stage publishes to Prefect, read from what the stage wrote and ``dvc.yaml`` declares.

* the metrics files a stage declares (``metrics:``) -> one Markdown table,
* the PNG plots ``dvc.yaml`` declares inside the stage's outputs (training curves, example queries) ->
  Markdown images, inlined as data URIs so the Prefect UI shows them with no file server.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from albef import config

MAX_INLINE_IMAGE_BYTES = 2 << 20


@dataclass
class StageFiles:
    metrics: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def _paths(entries: Any) -> list[str]:
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(str(k) for k in entry)
    return out


def stage_files(project: str | Path, stage: str) -> StageFiles:
    """The metrics files and PNG plots of DVC stage ``stage`` (paths relative to the project)."""
    spec = yaml.safe_load((Path(project) / "dvc.yaml").read_text()) or {}
    body = (spec.get("stages") or {}).get(stage) or {}
    outs = [Path(p) for p in _paths(body.get("outs")) + _paths(body.get("plots"))]
    plots = [Path(p) for p in _paths(spec.get("plots")) + _paths(body.get("plots"))]
    images = {
        str(p) for p in plots if p.suffix.lower() == ".png" and any(p == o or o in p.parents for o in outs)
    }
    return StageFiles(metrics=_paths(body.get("metrics")), images=sorted(images))


def read_metrics(project: str | Path, files: list[str]) -> dict[str, Any]:
    """The stage's metrics, one dict per file (a missing or unreadable file is left out)."""
    out: dict[str, Any] = {}
    for name in files:
        try:
            out[name] = json.loads((Path(project) / name).read_text())
        except (OSError, ValueError):
            continue
    return out


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """The scalars of ``data`` (numbers, strings, booleans, None) under dotted keys; lists are left out."""
    return {
        k: v for k, v in config.flatten(data).items() if isinstance(v, int | float | str | bool) or v is None
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_markdown(stage: str, metrics: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """A Markdown table of every metric of the stage (nested keys dotted), with the run's summary above."""
    lines = [f"# {stage}", ""]
    for key, value in (summary or {}).items():
        if value is not None:
            lines.append(f"- **{key}**: {_cell(value)}")
    if summary:
        lines.append("")
    if not metrics:
        lines.append("_The stage declares no metrics file, or wrote none._")
    for name, data in metrics.items():
        rows = flatten(data) if isinstance(data, dict) else {"value": data}
        lines += [f"`{name}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows.items()]
        lines.append("")
    return "\n".join(lines)


def image_markdown(project: str | Path, image: str, title: str) -> str | None:
    """A Markdown image of ``image`` inlined as a data URI (None when the file is missing)."""
    path = Path(project) / image
    if not path.is_file():
        return None
    data = path.read_bytes()
    if len(data) > MAX_INLINE_IMAGE_BYTES:
        return f"# {title}\n\n`{image}` ({len(data) / 1e6:.1f} MB, too large to inline): {path.resolve()}\n"
    encoded = base64.b64encode(data).decode()
    return f"# {title}\n\n`{image}`\n\n![{title}](data:image/png;base64,{encoded})\n"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")
