"""The data stages as plain functions of a ``params.yaml``: the CLI, ``dvc.yaml`` and Prefect all call these.

``synth``      generate the synthetic benchmark (``params.synth``) into ``synth.out``
``preprocess`` validate + shard a dataset (``params.preprocess``) and build its tokenizer
               (``params.tokenizer``) into ``preprocess.out``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from albef.config import ConfigError, build_dataclass, section

log = logging.getLogger(__name__)


def synth_stage(params: dict[str, Any], progress: bool = True) -> dict:
    from albef.data.synth import SynthConfig, generate

    values = section(params, "synth")
    out = values.pop("out", "data/synth")
    cfg = build_dataclass(SynthConfig, values, "synth")
    return generate(cfg, out, progress=progress)


def preprocess_stage(params: dict[str, Any], progress: bool = True) -> dict:
    from albef.data.preprocess import PreprocessConfig, preprocess

    values = section(params, "preprocess")
    metrics_path = values.pop("metrics", None)
    cfg = build_dataclass(PreprocessConfig, values, "preprocess")
    report = preprocess(cfg, progress=progress)
    tokenizer_dir = build_tokenizer(params, Path(cfg.out_dir))
    summary = {
        "records_in": report.records_in,
        "records_kept": report.records_kept,
        "records_dropped": len(report.dropped),
        "images_kept": report.images_kept,
        "up_to_date": report.up_to_date,
        "tokenizer": str(tokenizer_dir),
    }
    log.info("preprocess: %s", summary)
    if metrics_path:
        metrics = {k: v for k, v in summary.items() if isinstance(v, int) and not isinstance(v, bool)}
        metrics["drop_fraction"] = summary["records_dropped"] / max(summary["records_in"], 1)
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_path).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return summary


def build_tokenizer(params: dict[str, Any], processed_dir: Path) -> Path:
    """Copy a pretrained tokenizer (``tokenizer.source``) or build one from the training texts."""
    from albef.data.formats import texts
    from albef.data.vocab import train_wordpiece
    from albef.tokenizer import ALBEFTokenizer

    cfg = section(params, "tokenizer")
    out = processed_dir / "tokenizer"
    source = cfg.get("source")
    if source:
        ALBEFTokenizer.from_pretrained(source).save(out)
        return out
    files = section(params, "preprocess")["files"]
    corpus = []
    for name in cfg.get("train_files", []):
        if name not in files:
            raise ConfigError(f"tokenizer.train_files: {name} is not one of preprocess.files")
        for record in json.loads((processed_dir / name).read_text()):
            corpus.extend(texts(record, files[name]))
    answer_list = section(params, "preprocess").get("answer_list")
    if answer_list and (processed_dir / answer_list).is_file():
        corpus.extend(json.loads((processed_dir / answer_list).read_text()))
    return train_wordpiece(corpus, out, vocab_size=int(cfg.get("vocab_size", 1000)))
