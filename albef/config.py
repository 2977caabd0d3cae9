"""Typed, validated model configuration.

The model section of ``params.yaml`` looks like::

    model:
      preset: small            # base | small | tiny
      vision: {image_size: 96} # any field below overrides the preset
      temp: 0.07

Every error names the offending key (``model.vision.width``) so a typo in ``params.yaml`` is found at load
time, not after an hour of training.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration value is missing, mistyped, unknown or inconsistent."""


# ---------------------------------------------------------------------- the typed reader of params.yaml sections
# Every section of params.yaml is read into a dataclass by build_dataclass: unknown keys are named, each value is
# checked against its field's type (a number YAML 1.1 left as a string, `1e-4`, is read as the number), and
# against its field's range when the field declares one (metadata=POSITIVE, ...). Errors name `section.key`.


def in_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False
) -> dict[str, Any]:
    """Field metadata: the values a setting may take (``low`` < or <= value <= ``high``); None is always allowed
    for an optional field."""
    return {"range": (low, high, low_open)}


POSITIVE = in_range(0, low_open=True)
NON_NEGATIVE = in_range(0)
AT_LEAST_ONE = in_range(1)
FRACTION = in_range(0, 1)

# YAML 1.1 (PyYAML) reads `1e-4` and `5E3` as strings: a float needs a dot there. Such strings are numbers.
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]) if args else 'values'}" + (
            f" ({len(args)} of them)" if origin is tuple and args and args[-1] is not Ellipsis else ""
        )
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as the type ``annotation`` says, or a :class:`ConfigError` naming ``key`` and what it expects."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = value
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            number = float(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(number)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}")
                return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return build_dataclass(annotation, value, key)
    else:
        return value  # a type this reader does not know: the dataclass checks it itself
    raise ConfigError(f"{key} must be {_describe(annotation)}, got {value!r}")


def check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    """The field's declared range (``metadata=in_range(...)``), if any."""
    bounds = f.metadata.get("range")
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_open = bounds
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high:g}, got {value!r}")


def range_problems(obj: Any, prefix: str = "") -> list[str]:
    """What breaks the declared ranges of the dataclass instance ``obj``'s fields, each naming
    ``<prefix>.<field>``: build_dataclass checks them as it reads params.yaml, a ``__post_init__`` calling
    :func:`check_ranges` checks a direct construction too."""
    problems = []
    for f in dataclasses.fields(obj):
        try:
            check_range(getattr(obj, f.name), f, f"{prefix}.{f.name}" if prefix else f.name)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def check_ranges(obj: Any, prefix: str = "") -> None:
    """A :class:`ConfigError` listing :func:`range_problems`, if any."""
    if problems := range_problems(obj, prefix):
        raise ConfigError("; ".join(problems))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming something only imported for type checking
        return {}


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of the ``params.yaml`` section ``name`` (a stage pops its own keys from it); a missing section is
    a :class:`ConfigError` naming it."""
    if name not in params or not isinstance(params[name], dict):
        raise ConfigError(f"params.yaml has no '{name}' section")
    return dict(params[name])


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """The section ``values`` as a ``cls``: unknown keys named, every value typed and range-checked (see above),
    and what ``cls`` itself refuses (its ``__post_init__``) reported under ``prefix``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        kwargs[name] = coerce(value, hints.get(name, Any), key)
        check_range(kwargs[name], known[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(prefix.split(".")[0]):  # already names its section (or this key of it)
            raise
        # a check naming the field by its place in the class ("gate.direction: ...") gets the section in front
        last = prefix.rsplit(".", 1)[-1]
        if message.startswith(f"{last}."):
            raise ConfigError(f"{prefix}{message[len(last) :]}") from exc
        raise ConfigError(f"{prefix}: {message}") from exc
    except (TypeError, ValueError) as exc:  # a check of the dataclass's own, or a missing required key
        raise ConfigError(f"{prefix}: {exc}") from exc


@dataclass
class VisionConfig:
    """ViT image encoder (timm ``VisionTransformer`` with ALBEF's choices)."""

    image_size: int = field(default=256, metadata=POSITIVE)
    patch_size: int = field(default=16, metadata=POSITIVE)
    width: int = field(default=768, metadata=POSITIVE)
    depth: int = field(default=12, metadata=POSITIVE)
    heads: int = field(default=12, metadata=POSITIVE)
    mlp_ratio: float = 4.0
    drop_path: float = 0.0

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid_size**2


@dataclass
class TextConfig:
    """BERT text encoder whose upper ``fusion_layers`` layers also cross-attend to image tokens."""

    vocab_size: int = field(default=30522, metadata=POSITIVE)
    hidden: int = field(default=768, metadata=POSITIVE)
    text_layers: int = field(default=6, metadata=NON_NEGATIVE)
    fusion_layers: int = field(default=6, metadata=AT_LEAST_ONE)  # ALBEF fuses in the upper layers
    heads: int = field(default=12, metadata=POSITIVE)
    intermediate: int = field(default=3072, metadata=POSITIVE)
    max_positions: int = field(default=512, metadata=POSITIVE)
    type_vocab: int = field(default=2, metadata=POSITIVE)
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    # Layers of the VQA answer decoder, each with cross-attention to the question states and initialised
    # from the fusion layers. None: as many as the fusion layers (the official 6 of 6).
    decoder_layers: int | None = field(default=None, metadata=AT_LEAST_ONE)

    def __post_init__(self) -> None:
        if self.decoder_layers is None:
            self.decoder_layers = self.fusion_layers

    @property
    def num_layers(self) -> int:
        return self.text_layers + self.fusion_layers


@dataclass
class QuirksConfig:
    """Switches for the official code's behaviours that change numbers (ALBEF-SPEC §1.6, §9).

    The defaults reproduce the official code wherever that is not a bug that crashes or corrupts.
    """

    # Official tokenizer: a single sentence is "[CLS] tokens" with no trailing [SEP].
    single_sentence_sep: bool = False
    # Pretraining clamps the learnable temperature to [0.001, 0.5] at every forward; finetuning does not.
    temp_min: float = 0.001
    temp_max: float = 0.5
    # Additive mask value for padded text keys (official: -10000; -inf would change nothing in practice).
    text_mask_value: float = -10000.0
    # NLVR.py copies the online weights into the momentum teacher BEFORE loading the TA checkpoint, which has
    # no momentum weights, so the NLVR2 teacher starts as the random initialisation and only catches up
    # through EMA (ALBEF-SPEC §1.6-6). False copies the loaded online weights into absent twins (LAVIS).
    nlvr_teacher_copy_before_load: bool = True


#: the loss switches a pretraining section may set, and those of a finetuning section with distillation
PRETRAIN_LOSS_KEYS = ("itc", "itm_hard_negatives", "mod_itc", "mod_mlm")
FINETUNE_LOSS_KEYS = ("mod",)


@dataclass(frozen=True)
class LossSwitches:
    """Which loss terms a training forward computes: the paper's ablation (ALBEF Table 1). The defaults are the
    full model; ITM and MLM (pretraining) and each task's own loss (finetuning) are always on, so no
    combination leaves a step without a loss.

    A pretraining section sets the first four, a finetuning section with distillation ``mod`` (each model
    reads only its own: :data:`PRETRAIN_LOSS_KEYS`, :data:`FINETUNE_LOSS_KEYS`). A switched-off term is not
    computed, and neither is what only it needs (momentum teacher predictions, ITC similarities).
    """

    itc: bool = True  # pretraining: the image-text contrastive loss
    itm_hard_negatives: bool = True  # pretraining: ITM negatives drawn by ITC similarity; off: random ones
    mod_itc: bool = True  # pretraining: momentum-distilled (soft) ITC targets; off: the hard ones
    mod_mlm: bool = True  # pretraining: momentum-distilled (soft) MLM targets; off: the hard ones
    mod: bool = True  # finetuning: momentum distillation of the task's targets (retrieval/grounding: ITC)

    def validate(self, prefix: str = "pretrain") -> LossSwitches:
        problems = []
        if not self.itc and self.itm_hard_negatives:
            problems.append(
                f"{prefix}.itm_hard_negatives: true needs {prefix}.itc: true (hard negatives are drawn in "
                f"proportion to the ITC similarities); set {prefix}.itm_hard_negatives: false (random "
                f"negatives) or {prefix}.itc: true"
            )
        if not self.itc and self.mod_itc:
            problems.append(
                f"{prefix}.mod_itc: true needs {prefix}.itc: true (it distils the ITC targets); set "
                f"{prefix}.mod_itc: false"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    @classmethod
    def pop_from(cls, values: dict[str, Any], keys: tuple[str, ...], prefix: str) -> LossSwitches:
        """Take the switches ``keys`` out of a flat section ``values`` (others stay, for the caller's
        unknown-key check), typed and validated; every error names ``<prefix>.<key>``."""
        given = {key: values.pop(key) for key in keys if key in values}
        for key, value in given.items():
            if not isinstance(value, bool):
                raise ConfigError(f"{prefix}.{key} must be true or false, got {value!r}")
        return cls(**given).validate(prefix)


@dataclass
class ModelConfig:
    """Everything needed to build an ALBEF model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = field(default=256, metadata=POSITIVE)
    temp: float = 0.07
    queue_size: int = field(default=65536, metadata=POSITIVE)
    momentum: float = 0.995
    mlm_probability: float = 0.15
    distill: bool = True
    quirks: QuirksConfig = field(default_factory=QuirksConfig)

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "model") -> ModelConfig:
        v, t = self.vision, self.text
        for obj, where in ((v, ".vision"), (t, ".text"), (self, "")):  # built directly: not range-checked yet
            check_ranges(obj, prefix + where)
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"{prefix}.vision.image_size ({v.image_size}) must be a multiple of "
                f"{prefix}.vision.patch_size ({v.patch_size})"
            )
        if v.width % v.heads:
            raise ConfigError(
                f"{prefix}.vision.width ({v.width}) is not divisible by {prefix}.vision.heads ({v.heads})"
            )
        if t.hidden % t.heads:
            raise ConfigError(
                f"{prefix}.text.hidden ({t.hidden}) is not divisible by {prefix}.text.heads ({t.heads})"
            )
        if not 0.0 <= v.drop_path < 1.0:
            raise ConfigError(f"{prefix}.vision.drop_path must be in [0, 1), got {v.drop_path}")
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError(f"{prefix}.momentum must be in (0, 1), got {self.momentum}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"{prefix}.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        q = self.quirks
        if not 0.0 < q.temp_min <= self.temp <= q.temp_max:
            raise ConfigError(
                f"{prefix}.temp ({self.temp}) must lie in [quirks.temp_min, quirks.temp_max] = "
                f"[{q.temp_min}, {q.temp_max}]"
            )
        for key in (f"{name}_token_id" for name in ("pad", "cls", "sep", "mask")):
            if not 0 <= getattr(t, key) < t.vocab_size:
                raise ConfigError(
                    f"{prefix}.text.{key} ({getattr(t, key)}) is outside the vocabulary [0, {t.vocab_size})"
                )
        return self

    def check_global_batch(self, global_batch: int, prefix: str = "model") -> None:
        """The queue is a ring buffer advanced by the gathered batch: its size must be a multiple of it."""
        if global_batch <= 0:
            raise ConfigError(f"global batch must be positive, got {global_batch}")
        if self.queue_size % global_batch:
            raise ConfigError(
                f"{prefix}.queue_size ({self.queue_size}) is not divisible by the global batch "
                f"({global_batch} = per-device batch x world size); choose a queue size that is a multiple of it"
            )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        """Build from a plain dict: a ``preset`` name plus overrides, or a full dict."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
        data = copy.deepcopy(data)
        preset = data.pop("preset", None)
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f"{prefix}.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        merged = _merge(PRESETS[preset or "base"]().to_dict(), data, cls, prefix)  # base: ModelConfig()
        return build_dataclass(cls, merged, prefix).validate(prefix)


def flatten(values: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}``: nested mappings become dotted keys."""
    out: dict[str, Any] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            out.update(flatten(value, name, sep))
    elif prefix:
        out[prefix] = values
    return out


# Keys a ModelConfig once had, with where the setting lives now: params.yaml naming one is told where to go, and a
# model exported before is read without it.
RETIRED_MODEL_KEYS = {
    "alpha": "momentum distillation's weight is a training setting, one per stage (pretrain.alpha, "
    "finetune_retrieval.alpha, ...), passed to the model's forward",
}


def _merge(base: dict, override: dict, schema: type, prefix: str) -> dict:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in override.items():
        if schema is ModelConfig and key in RETIRED_MODEL_KEYS:
            raise ConfigError(f"{prefix}.{key}: no longer a model setting: {RETIRED_MODEL_KEYS[key]}")
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown key; expected one of {sorted(fields)}")
        sub = _hints(schema).get(key)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}.{key} must be a mapping, got {type(value).__name__}")
            base[key] = _merge(base[key], value, sub, f"{prefix}.{key}")
        else:
            base[key] = value
    if schema is TextConfig and "fusion_layers" in override and "decoder_layers" not in override:
        base["decoder_layers"] = None  # follows the new fusion depth (configs saved before VQA lack it)
    return base


# ---------------------------------------------------------------------- presets
def base_config() -> ModelConfig:
    """The official ALBEF: ViT-B/16 at 256 px, BERT-base with fusion from layer 6."""
    return ModelConfig()


def small_config() -> ModelConfig:
    """What the embedded default trains on a laptop CPU in minutes."""
    return ModelConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=192, depth=4, heads=3),
        text=TextConfig(
            vocab_size=1000,
            hidden=192,
            text_layers=2,
            fusion_layers=2,
            heads=3,
            intermediate=768,
            max_positions=64,
            pad_token_id=0,
            cls_token_id=2,
            sep_token_id=3,
            mask_token_id=4,
        ),
        embed_dim=128,
        queue_size=1024,
    )


def tiny_config() -> ModelConfig:
    """The smallest model that exercises every code path; for tests."""
    return ModelConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=32, depth=2, heads=2),
        text=TextConfig(
            vocab_size=100,
            hidden=32,
            text_layers=1,
            fusion_layers=1,
            heads=2,
            intermediate=64,
            max_positions=32,
            pad_token_id=0,
            cls_token_id=1,
            sep_token_id=2,
            mask_token_id=3,
        ),
        embed_dim=16,
        queue_size=32,
    )


PRESETS = {"base": base_config, "small": small_config, "tiny": tiny_config}


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """A ``params.yaml`` as a dict of sections; a missing file or bad YAML is a :class:`ConfigError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    return params


def load_model_config(
    params_path: str | Path, section: str = "model", global_batch: int | None = None
) -> ModelConfig:
    """Read the ``model`` section (or another one) of a ``params.yaml``.

    With ``global_batch`` (per-device batch x world size) the queue size is checked against it too, so a
    run that could never fill its queue fails here rather than at its first step.
    """
    params = read_params(params_path)
    if section not in params:
        raise ConfigError(f"{params_path}: no '{section}' section")
    cfg = ModelConfig.from_dict(params[section], prefix=section)
    if global_batch is not None:
        cfg.check_global_batch(global_batch, prefix=section)
    return cfg
