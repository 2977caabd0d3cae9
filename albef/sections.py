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
    # read as they are by albef.train.stages (grounding finetuning is retrieval training on other data)
    if name in ("pretrain", "finetune_retrieval", "finetune_grounding"):
        from albef.train.stages import split_train_section

        return lambda p: split_train_section(p[name], name)
    if name == "evaluate":
        from albef.train.stages import EvaluateConfig

        return lambda p: build_dataclass(EvaluateConfig, p["evaluate"], "evaluate")
    if name == "evaluate_grounding":
        from albef.eval.grounding import GroundingEvalConfig

        return lambda p: build_dataclass(GroundingEvalConfig, p[name], name)
    if name == "mlflow" or name == "register" or name.startswith("register_"):
        try:  # the tracking sections' loaders (albef.tracking) where that package is present
            from albef.tracking import config as tracking
        except ImportError:
            return None
        if name == "mlflow":
            return tracking.tracking_config
        task = {section: task for task, section in tracking.REGISTER_SECTIONS.items()}.get(name)
        return None if task is None else lambda p: tracking.register_config(p, task)
    if name in ("finetune_vqa", "evaluate_vqa"):  # read as albef.train.vqa reads them
        from albef.train import vqa

        read = vqa.vqa_train_settings if name == "finetune_vqa" else vqa.vqa_eval_settings
        return lambda p: read(p, name)
    from albef.train.classify import EVAL_SECTIONS, TRAIN_SECTIONS

    train_task = {section: task for task, section in TRAIN_SECTIONS.items()}.get(name)
    if train_task is not None:
        from albef.train.classify import classifier_train_settings

        return lambda p: classifier_train_settings(p, train_task)
    eval_task = {section: task for task, section in EVAL_SECTIONS.items()}.get(name)
    if eval_task is not None:
        from albef.train.classify import classifier_eval_settings

        return lambda p: classifier_eval_settings(p, eval_task)
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
