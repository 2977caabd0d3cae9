"""Named sets of ``params.yaml`` overrides: the same pipeline at another size, switched on with one word.

* ``gpu``: the embedded benchmark on one GPU, with a model big enough to learn it (96 px images, width 384,
  6 vision + 4 text + 4 fusion layers, batch 128, bf16) and more epochs than two CPU cores allow.
* ``smoke``: every stage on the smallest data and model it runs on, for a check that the whole pipeline
  still works (about a minute or two on a CPU).

A profile is a flat mapping of ``section.key`` to a value, the form of ``dvc exp run -S`` and of a Prefect
flow run's ``overrides``; it is validated against ``params.yaml`` by the same code that validates those
(:func:`albef.orchestration.pipeline.merge_overrides`), so a profile that names a key the project does not
have fails before any stage runs. A YAML file of the same form can be used as a profile too.

    dvc exp run $(albef profile gpu)                    # DVC: the profile as -S overrides
    albef profile gpu --write params-gpu.yaml           # a whole params file, for albef <stage> --params
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from albef.config import ConfigError

_TRAIN_STAGES = (
    "pretrain",
    "finetune_retrieval",
    "finetune_vqa",
    "finetune_ve",
    "pretrain_nlvr",
    "finetune_nlvr",
    "finetune_grounding",
)


def _every(stages: tuple[str, ...], **values: Any) -> dict[str, Any]:
    return {f"{stage}.{key}": value for stage in stages for key, value in values.items()}


# One H200 (or any GPU with bf16): ~16 CPU cores feed the loaders. Epochs are set so that the whole
# pipeline stays within about 10 minutes there; the data is the default benchmark (the generator and
# preprocessing run on the CPU and are not worth enlarging for a 10-minute run).
GPU: dict[str, Any] = {
    "synth.workers": 8,
    "preprocess.workers": 8,
    "model.vision.image_size": 96,
    "model.vision.patch_size": 8,
    "model.vision.width": 384,
    "model.vision.depth": 6,
    "model.vision.heads": 6,
    "model.text.hidden": 384,
    "model.text.heads": 6,
    "model.text.intermediate": 1536,
    "model.text.text_layers": 4,
    "model.text.fusion_layers": 4,
    "model.embed_dim": 256,
    "model.queue_size": 4096,
    "unimodal.vision_steps": 2000,
    "unimodal.text_steps": 2000,
    "unimodal.batch_size": 128,
    **_every(_TRAIN_STAGES, device="auto", precision="bf16", num_workers=6, checkpoint_every=0),
    "pretrain.batch_size": 128,
    "pretrain.epochs": 20,
    "pretrain.lr": 5.0e-4,
    "finetune_retrieval.batch_size": 64,
    "finetune_retrieval.epochs": 10,
    "finetune_retrieval.lr": 2.0e-4,
    "finetune_vqa.batch_size": 64,
    "finetune_vqa.epochs": 10,
    "finetune_vqa.lr": 2.0e-4,
    "finetune_ve.batch_size": 64,
    "finetune_ve.epochs": 6,
    "finetune_ve.lr": 2.0e-4,
    "pretrain_nlvr.max_steps": 200,
    "pretrain_nlvr.lr": 2.0e-4,
    "finetune_nlvr.batch_size": 32,
    "finetune_nlvr.epochs": 6,
    "finetune_nlvr.lr": 2.0e-4,
    "finetune_grounding.epochs": 3,
    "evaluate.k_test": 32,
}

# The smallest sizes at which every stage still runs: a check of the whole pipeline, not of learning.
SMOKE: dict[str, Any] = {
    "synth.pretrain_images": 16,
    "synth.retrieval_train_images": 8,
    "synth.retrieval_val_images": 4,
    "synth.retrieval_test_images": 4,
    "synth.vqa_train_images": 4,
    "synth.vqa_test_images": 4,
    "synth.ve_images": 8,
    "synth.nlvr_pairs": 8,
    "synth.grounding_images": 14,
    "synth.shifted_test_images": 4,
    "synth.image_size": 64,
    "preprocess.max_side": 64,
    "preprocess.shard_size": 16,
    "model.vision.image_size": 32,
    "model.vision.patch_size": 16,
    "model.vision.width": 32,
    "model.vision.depth": 2,
    "model.vision.heads": 2,
    "model.text.hidden": 32,
    "model.text.heads": 2,
    "model.text.intermediate": 64,
    "model.text.text_layers": 1,
    "model.text.fusion_layers": 1,
    "model.embed_dim": 16,
    "model.queue_size": 16,
    "unimodal.vision_steps": 20,
    "unimodal.text_steps": 20,
    "unimodal.batch_size": 8,
    "unimodal.warmup_steps": 2,
    **_every(_TRAIN_STAGES, batch_size=4, epochs=1, warmup_stair=2, num_workers=0, log_every=1),
    "pretrain_nlvr.max_steps": 0,
    "pretrain.k_test": 4,
    "finetune_retrieval.k_test": 4,
    "finetune_grounding.k_test": 4,
    "evaluate.k_test": 4,
    "evaluate.num_workers": 0,
    "evaluate.examples": 2,
    "evaluate_vqa.k_test": 4,
    "evaluate_grounding.batch_size": 8,
    "evaluate_grounding.num_workers": 0,
    "evaluate_grounding.examples": 1,
}

PROFILES: dict[str, dict[str, Any]] = {"gpu": GPU, "smoke": SMOKE}


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A profile by name (``gpu``, ``smoke``) or from a YAML file of ``section.key: value`` lines."""
    if name_or_path in PROFILES:
        return dict(PROFILES[name_or_path])
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"profile {name_or_path!r}: neither a profile name ({', '.join(PROFILES)}) nor a YAML file"
        )
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"profile {path}: expected a mapping of section.key to values")
    return values


def apply_profile(params: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the profile's overrides, validated like ``dvc exp run -S`` and Prefect overrides."""
    from albef.orchestration.pipeline import merge_overrides

    return merge_overrides(params, profile).params


def as_set_args(profile: dict[str, Any]) -> str:
    """The profile as ``dvc exp run`` arguments: ``-S ++pretrain.epochs=30 ...``, quoted for a POSIX shell.
    ``++`` (Hydra's override syntax, which DVC uses) sets a key whether or not params.yaml spells it out
    (``model.text.text_layers`` comes from the preset); values in JSON form, which DVC parses as YAML."""
    texts = {key: value if isinstance(value, str) else json.dumps(value) for key, value in profile.items()}
    return " ".join(f"-S {shlex.quote(f'++{key}={text}')}" for key, text in texts.items())
