"""An exported albef model folder: its file names, its format tag and its config (torch-free, so that what only
reads a model's description, such as registration and serving set-up, loads no model code)."""

from __future__ import annotations

import json
from pathlib import Path

from albef.config import RETIRED_MODEL_KEYS, ModelConfig
from albef.safe_load import CheckpointError

FORMAT_NAME = "albef"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def read_config(directory: str | Path) -> tuple[str, ModelConfig]:
    """``(task, model config)`` of the model exported in ``directory``; a folder that is not one is a
    :class:`CheckpointError` naming the file."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not an albef model directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from exc
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an albef config (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer albef (format_version {meta['format_version']})")
    model = {k: v for k, v in meta["model"].items() if k not in RETIRED_MODEL_KEYS}  # (saved by older albef)
    return meta["task"], ModelConfig.from_dict(model, prefix=f"{path.name}:model")
