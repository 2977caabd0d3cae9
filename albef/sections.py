"""Which typed reader each section of ``params.yaml`` goes through: the one list that validates a section before
any work, for the CLI and DVC stages (:func:`check_sections`, before loading data or weights and before an MLflow
run is opened) and for the flows' overrides (:mod:`albef.orchestration.pipeline`). The readers themselves are
:func:`albef.config.build_dataclass` over each stage's settings dataclass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from albef.config import ConfigError


def _strip(values: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in keys}


def section_reader(name: str) -> Callable[[dict[str, Any]], Any] | None:
    """The typed reader a stage applies to section ``name``, as a function of the whole params (None: the
    section has no typed config, so only keys already in params.yaml may be set there)."""
    from albef.config import build_dataclass

    if name == "synth":
        from albef.data.synth import SynthConfig

        return lambda p: build_dataclass(SynthConfig, _strip(p["synth"], "out"), "synth")
    if name == "preprocess":
        from albef.data.preprocess import PreprocessConfig

        return lambda p: build_dataclass(PreprocessConfig, _strip(p["preprocess"], "metrics"), "preprocess")
    if name == "model":
        from albef.config import ModelConfig

        return lambda p: ModelConfig.from_dict(p["model"], prefix="model")
    if name == "unimodal":
        from albef.train.unimodal import UnimodalConfig

        return lambda p: build_dataclass(UnimodalConfig, p["unimodal"], "unimodal")
    from albef.tasks import TASKS

    for task in TASKS.values():  # the training and evaluation sections, read as each task's stages read them
        readers = task.section_readers()
        if name in readers:
            return readers[name]
    if name == "mlflow" or name == "register" or name.startswith("register_"):
        try:  # the tracking sections' loaders (albef.tracking) where that package is present
            from albef.tracking import config as tracking
        except ImportError:
            return None
        if name == "mlflow":
            return tracking.tracking_config
        task = {section: task for task, section in tracking.REGISTER_SECTIONS.items()}.get(name)
        return None if task is None else lambda p: tracking.register_config(p, task)
    return None


def check_sections(params: dict[str, Any], names: Iterable[str]) -> None:
    """Read every section of ``names`` that ``params`` has through its typed reader; the first bad value raises
    a :class:`ConfigError` naming its key."""
    for name in names:
        reader = section_reader(name)
        if reader is None or not isinstance(params.get(name), dict):
            continue
        try:
            reader(params)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: {exc}") from exc
