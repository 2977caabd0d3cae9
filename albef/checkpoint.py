"""Loading official ALBEF checkpoints and saving/loading albef's own format.

Official checkpoints (``ALBEF.pth``, ``ALBEF_4M.pth``, ``mscoco.pth``, ``flickr30k.pth``, training snapshots)
come as ``{'model': state_dict, ...}`` or as a raw state dict, with or without momentum encoders and queues,
in the pretraining layout (``text_encoder.bert.*`` + ``text_encoder.cls.*``) or the finetuning layout
(``text_encoder.*``), or the VQA layout (``text_decoder.*`` besides). :func:`load_official` maps any of them
onto an albef model of any task and reports every key it could not place, with the official scripts'
remappings: a VQA model from a pretraining checkpoint (:func:`decoder_from_encoder`), the two-image models
(NLVR2 and its text-assignment pretraining) from a single-image one (:func:`duplicate_fusion_layers`; one
already in the two-image layout loads as it is).

albef's own format is a directory with ``model.safetensors`` (no pickle on load) and ``config.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from albef.config import ConfigError, ModelConfig, TextConfig, VisionConfig, base_config, flatten
from albef.io import atomic_write
from albef.model_files import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE, read_config
from albef.models.nlvr import ALBEFNLVR, ALBEFTextAssignment
from albef.models.pretrain import ALBEFPretrain
from albef.models.retrieval import ALBEFRetrieval
from albef.models.ve import ALBEFVE
from albef.models.vision import resample_pos_embed
from albef.models.vqa import ALBEFVQA
from albef.safe_load import CheckpointError, UnreadableCheckpoint, describe_failure, load_torch

log = logging.getLogger(__name__)

#: Every albef model: the ITC + ITM models, the VQA encoder-decoder and the VE/NLVR2 classifiers.
ALBEFModel = nn.Module

TASKS: dict[str, type[ALBEFModel]] = {
    "pretrain": ALBEFPretrain,
    "retrieval": ALBEFRetrieval,
    "vqa": ALBEFVQA,
    "ve": ALBEFVE,
    "nlvr": ALBEFNLVR,
    "nlvr_ta": ALBEFTextAssignment,  # text-assignment pretraining of the NLVR2 model
}

_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
_MOMENTUM_PREFIXES = (
    "visual_encoder_m.",
    "vision_proj_m.",
    "text_encoder_m.",
    "text_proj_m.",
    "text_decoder_m.",
    "cls_head_m.",
)
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.*)")
# Task heads a model of another task cannot provide: a new task starts them from their initialisation.
_NEW_HEADS = {
    "ve": ("cls_head.", "cls_head_m."),
    "nlvr": ("cls_head.", "cls_head_m."),
    "nlvr_ta": ("ta_head.",),
}
_TWO_IMAGE = (ALBEFNLVR, ALBEFTextAssignment)
_TEXT_LAYER_KEY = re.compile(r"(text_encoder(?:_m)?\.(?:bert\.)?encoder\.layer\.)(\d+)(\..*)")


def build_model(task: str, cfg: ModelConfig) -> ALBEFModel:
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    return TASKS[task](cfg)


# ---------------------------------------------------------------------------- reading


def read_official_state_dict(source: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint file (or dict), unwrapped from ``model``/``module.``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        # weights_only: never execute pickled code from a downloaded file.
        obj = load_torch(path, "not a readable PyTorch checkpoint")
    else:
        obj = source
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}checkpoint holds a {type(obj).__name__}, expected a state dict")
    for wrapper in ("model", "state_dict", "module"):
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{where}checkpoint holds no tensors")
    return state


# ---------------------------------------------------------------------------- configuration


def config_from_official(
    config: dict[str, Any], bert_config: dict[str, Any], vit: dict[str, Any] | None = None
) -> ModelConfig:
    """An albef config from the official yaml config, ``config_bert.json`` and (optionally) ViT sizes."""
    vit = vit or {}
    cfg = base_config()
    layers = int(bert_config["num_hidden_layers"])
    fusion = int(bert_config.get("fusion_layer", 6))
    cfg.vision = VisionConfig(
        image_size=int(vit.get("img_size", config.get("image_res", 256))),
        patch_size=int(vit.get("patch_size", 16)),
        width=int(vit.get("embed_dim", config.get("vision_width", 768))),
        depth=int(vit.get("depth", 12)),
        heads=int(vit.get("num_heads", 12)),
        mlp_ratio=float(vit.get("mlp_ratio", 4.0)),
    )
    cfg.text = TextConfig(
        vocab_size=int(bert_config["vocab_size"]),
        hidden=int(bert_config["hidden_size"]),
        text_layers=fusion,
        fusion_layers=layers - fusion,
        heads=int(bert_config["num_attention_heads"]),
        intermediate=int(bert_config["intermediate_size"]),
        max_positions=int(bert_config["max_position_embeddings"]),
        type_vocab=int(bert_config.get("type_vocab_size", 2)),
        dropout=float(bert_config.get("hidden_dropout_prob", 0.1)),
        layer_norm_eps=float(bert_config.get("layer_norm_eps", 1e-12)),
        initializer_range=float(bert_config.get("initializer_range", 0.02)),
        pad_token_id=int(bert_config.get("pad_token_id", 0)),
    )
    for key in ("embed_dim", "queue_size"):
        if key in config:
            setattr(cfg, key, int(config[key]))
    for key in ("temp", "momentum", "mlm_probability"):  # (alpha is the training loop's: forward's argument)
        if key in config:
            setattr(cfg, key, float(config[key]))
    if "distill" in config:
        cfg.distill = bool(config["distill"])
    return cfg


def infer_config(
    state: dict[str, torch.Tensor], base: ModelConfig, image_size: int | None = None
) -> ModelConfig:
    """Adapt ``base`` (which supplies what shapes cannot tell: heads, special token ids) to a state dict."""
    cfg = ModelConfig.from_dict(base.to_dict())

    def find(suffix: str) -> torch.Tensor | None:
        for k, v in state.items():
            if k.startswith(("visual_encoder.", "text_encoder.")) and k.endswith(suffix):
                return v
        return None

    if (pe := state.get("visual_encoder.pos_embed")) is not None:
        cfg.vision.width = pe.shape[-1]
        grid = round((pe.shape[1] - 1) ** 0.5)
        if (patch := state.get("visual_encoder.patch_embed.proj.weight")) is not None:
            cfg.vision.patch_size = patch.shape[-1]
        cfg.vision.image_size = image_size or grid * cfg.vision.patch_size
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"visual_encoder\.blocks\.(\d+)\.", k))}
    if blocks:
        cfg.vision.depth = max(blocks) + 1
    if (fc1 := state.get("visual_encoder.blocks.0.mlp.fc1.weight")) is not None:
        cfg.vision.mlp_ratio = fc1.shape[0] / fc1.shape[1]
    if (we := find("embeddings.word_embeddings.weight")) is not None:
        cfg.text.vocab_size, cfg.text.hidden = we.shape
    if (pos := find("embeddings.position_embeddings.weight")) is not None:
        cfg.text.max_positions = pos.shape[0]
    if (tt := find("embeddings.token_type_embeddings.weight")) is not None:
        cfg.text.type_vocab = tt.shape[0]
    if (inter := find("encoder.layer.0.intermediate.dense.weight")) is not None:
        cfg.text.intermediate = inter.shape[0]
    layers, cross = set(), set()
    for k in state:
        if m := re.match(r"text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.(crossattention)?", k):
            layers.add(int(m.group(1)))
            if m.group(2):
                cross.add(int(m.group(1)))
    if layers:
        start = min(cross) if cross else max(layers) + 1
        cfg.text.text_layers, cfg.text.fusion_layers = start, max(layers) + 1 - start
        if is_two_image_layout(state, start):  # NLVR2 / TA: a config names the single-image fusion depth
            cfg.text.fusion_layers //= 2
    decoder = {
        int(m.group(1)) for k in state if (m := re.match(r"text_decoder\.bert\.encoder\.layer\.(\d+)\.", k))
    }
    if decoder:
        cfg.text.decoder_layers = max(decoder) + 1
    elif base.text.decoder_layers == base.text.fusion_layers:  # the default rule: as deep as the fusion
        cfg.text.decoder_layers = cfg.text.fusion_layers
    if (proj := state.get("vision_proj.weight")) is not None:
        cfg.embed_dim = proj.shape[0]
    if (queue := state.get("image_queue")) is not None:
        cfg.queue_size = queue.shape[1]
    if (temp := state.get("temp")) is not None:
        cfg.temp = min(max(float(temp), cfg.quirks.temp_min), cfg.quirks.temp_max)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint shapes give an inconsistent model: {exc}. The number of heads cannot be read from the "
            "weights: take it from a preset or params.yaml that matches the checkpoint (--preset/--params)"
        ) from exc


# ---------------------------------------------------------------------------- official -> albef


@dataclass
class LoadReport:
    """What happened to every key while loading a foreign checkpoint."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    resampled: list[str] = field(default_factory=list)  # position embeddings resized
    momentum_from_online: list[str] = field(default_factory=list)  # twins initialised from online weights
    reset: list[str] = field(default_factory=list)  # buffers kept at their fresh value (queue size changed)
    # VQA answer-decoder keys initialised from text-encoder weights (pretraining checkpoint -> VQA)
    decoder_from_encoder: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for f in fields(self):
            keys = getattr(self, f.name)
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"{f.name}: {shown}")
        return "\n".join(lines) if lines else "all keys matched"


def decoder_from_encoder(
    state: dict[str, torch.Tensor], text_layers: int, decoder_layers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The official VQA script's remapping of a pretraining state dict (ALBEF-SPEC §5.3), generalised from its
    hard-coded 6 to ``text_layers``: for ``text_encoder`` and ``text_encoder_m``, fusion layer
    ``text_layers + j`` also becomes decoder layer ``j`` of ``text_decoder(_m).bert``; the embeddings are
    copied to the decoder and the MLM head (``cls.*``) moves to it. The encoder keeps every layer.

    Returns the new state dict and the decoder keys it created."""
    out: dict[str, torch.Tensor] = {}
    created: list[str] = []
    for key, value in state.items():
        prefix = next((p for p in ("text_encoder.", "text_encoder_m.") if key.startswith(p)), None)
        # (position_ids: a buffer old transformers saved; dropped on conversion anyway)
        if prefix is None or key.endswith("position_ids"):
            out[key] = value
            continue
        dec = prefix.replace("text_encoder", "text_decoder")
        rest = key[len(prefix) :].removeprefix("bert.")
        if rest.startswith("cls."):  # the MLM head becomes the decoder's LM head
            new = dec + rest
        else:
            out[key] = value
            m = _LAYER_KEY.match(rest)
            if m is None:  # embeddings
                new = dec + "bert." + rest
            elif text_layers <= int(m.group(1)) < text_layers + decoder_layers:
                new = f"{dec}bert.encoder.layer.{int(m.group(1)) - text_layers}.{m.group(2)}"
            else:
                continue
        out[new] = value
        created.append(new)
    return out, created


def is_two_image_layout(state: dict[str, torch.Tensor], text_layers: int) -> bool:
    """Whether the text encoder in ``state`` holds each fusion layer twice with shared cross-attention keys
    and values (an official NLVR2 or TA checkpoint), rather than once (pretraining, retrieval, VE)."""
    keys: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        m = _TEXT_LAYER_KEY.fullmatch(key)
        if m and m.group(1).startswith("text_encoder.") and m.group(3) == ".crossattention.self.key.weight":
            keys[int(m.group(2))] = value
    fusion = sorted(i for i in keys if i >= text_layers)
    if not fusion or len(fusion) % 2 or fusion != list(range(text_layers, text_layers + len(fusion))):
        return False
    return all(torch.equal(keys[i], keys[i + 1]) for i in fusion[::2])


def duplicate_fusion_layers(state: dict[str, torch.Tensor], text_layers: int) -> dict[str, torch.Tensor]:
    """The official ``Pretrain_nlvr.py`` remapping: text-encoder layer ``L >= T`` (online and momentum) is
    written to layers ``T + 2(L - T)`` and ``T + 2(L - T) + 1``; every other key is kept."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _TEXT_LAYER_KEY.fullmatch(key)
        if m and int(m.group(2)) >= text_layers:
            first = text_layers + 2 * (int(m.group(2)) - text_layers)
            out[f"{m.group(1)}{first}{m.group(3)}"] = value
            out[f"{m.group(1)}{first + 1}{m.group(3)}"] = value
        else:
            out[key] = value
    return out


def _keeps_initial_teacher(model: nn.Module) -> bool:
    """Official NLVR2 quirk (§1.6-6): absent momentum twins keep their initialisation."""
    return isinstance(model, ALBEFNLVR) and model.cfg.quirks.nlvr_teacher_copy_before_load


def convert_official_state_dict(
    state: dict[str, torch.Tensor], model: ALBEFModel
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename, resample and filter an official state dict so it loads into ``model``."""
    report = LoadReport()
    target = model.state_dict()
    wants_mlm = isinstance(model, ALBEFPretrain)
    if isinstance(model, ALBEFVQA) and not any(k.startswith("text_decoder.") for k in state):
        state, report.decoder_from_encoder = decoder_from_encoder(
            state, model.cfg.text.text_layers, model.cfg.text.decoder_layers
        )
    if isinstance(model, _TWO_IMAGE):
        text_layers = model.cfg.text.text_layers
        if not is_two_image_layout(state, text_layers):
            state = duplicate_fusion_layers(state, text_layers)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):  # a buffer old transformers saved; recomputed here
            continue
        new = _rename_text_key(key, wants_mlm)
        if new is None:
            report.unexpected.append(key)
            continue
        if new.endswith("pos_embed") and new in target and value.shape != target[new].shape:
            value = resample_pos_embed(value, target[new].shape[1])
            report.resampled.append(new)
        out[new] = value

    bad_shapes = []
    for key in list(out):
        if key not in target:
            report.unexpected.append(key)
            del out[key]
        elif out[key].shape != target[key].shape:
            if key in _QUEUE_KEYS:  # another queue size: start this model's queues fresh
                report.reset.append(key)
                del out[key]
            else:
                bad_shapes.append(
                    f"{key}: checkpoint {tuple(out[key].shape)}, model {tuple(target[key].shape)}"
                )
    if bad_shapes:
        raise CheckpointError(
            "checkpoint does not fit this architecture (wrong config or wrong task?); "
            f"{len(bad_shapes)} shape mismatches: " + "; ".join(bad_shapes[:6])
        )
    if "queue_ptr" in report.reset or any(k in report.reset for k in ("image_queue", "text_queue")):
        for key in _QUEUE_KEYS:
            if key in out:
                del out[key]
                report.reset.append(key)

    # Tied parameters (MLM/LM decoder = word embeddings) are saved once by safetensors: any name of a tied
    # group fills the others.
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    for names in groups.values():
        present = [k for k in names if k in out]
        if present and len(present) < len(names):
            for k in names:
                out.setdefault(k, out[present[0]])

    # Momentum twins absent from the checkpoint (released finetuned weights strip them) start as copies of
    # the online weights, as LAVIS does, not as random networks; except in NLVR2 while the official quirk
    # (quirks.nlvr_teacher_copy_before_load) is on: there they keep the model's initialisation.
    for prefix in () if _keeps_initial_teacher(model) else _MOMENTUM_PREFIXES:
        online_prefix = prefix.replace("_m.", ".")
        twin_keys = [k for k in target if k.startswith(prefix)]
        if twin_keys and not any(k in out for k in twin_keys):
            for k in twin_keys:
                src = online_prefix + k[len(prefix) :]
                if src in out:
                    out[k] = out[src]
                    report.momentum_from_online.append(k)
    report.missing = sorted(k for k in target if k not in out and k not in report.reset)
    return out, report


def _rename_text_key(key: str, wants_mlm: bool) -> str | None:
    for prefix in ("text_encoder.", "text_encoder_m."):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if wants_mlm:
                return key if rest.startswith(("bert.", "cls.")) else prefix + "bert." + rest
            if rest.startswith("cls."):
                return None  # the MLM head has no place in a finetuning model
            return prefix + rest.removeprefix("bert.")
    return key


def load_official(model: ALBEFModel, source: str | Path | dict[str, Any], strict: bool = False) -> LoadReport:
    """Load an official ALBEF checkpoint into ``model``; with ``strict`` any missing weight is an error."""
    state, report = convert_official_state_dict(read_official_state_dict(source), model)
    missing_weights = [k for k in report.missing if k not in _QUEUE_KEYS]
    if strict and missing_weights:
        raise CheckpointError(f"checkpoint lacks {len(missing_weights)} weights: {missing_weights[:8]}")
    model.load_state_dict(state, strict=False)
    if report.missing:
        log.warning(
            "official checkpoint: %d model keys not in the checkpoint: %s",
            len(report.missing),
            report.missing[:8],
        )
    if report.unexpected:
        log.info("official checkpoint: %d keys unused: %s", len(report.unexpected), report.unexpected[:8])
    return report


# ---------------------------------------------------------------------------- albef format


def save_pretrained(model: ALBEFModel, directory: str | Path, task: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (each atomically) into ``directory``."""
    from safetensors.torch import _remove_duplicate_names, save_file

    task = task or next(name for name, cls in TASKS.items() if type(model) is cls)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": task,
        "model": model.cfg.to_dict(),
    }
    # What safetensors' save_model writes, less its map of tied names in the metadata: safetensors writes
    # metadata in hash-map order, so with several entries the same weights gave different bytes each save
    # (and DVC saw a new file). Loading (safetensors' load_model) re-ties from the model, not the metadata.
    state = model.state_dict()
    for tied in _remove_duplicate_names(state).values():
        for name in tied:
            del state[name]
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"task": task}))
    atomic_write(
        out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True))
    )
    return out


def load_pretrained(directory: str | Path, task: str | None = None, strict: bool = True) -> ALBEFModel:
    """Build and load a model saved by :func:`save_pretrained`. Strict by default: every key must match."""
    from safetensors.torch import load_model

    saved_task, cfg = read_config(directory)
    if task is not None and task != saved_task:
        raise CheckpointError(f"{directory} holds a {saved_task!r} model, not {task!r}")
    model = build_model(saved_task, cfg)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    try:
        missing, unexpected = load_model(model, str(weights), strict=strict)
    except RuntimeError as exc:  # read fine, but the tensors do not fit the model config.json describes
        raise CheckpointError(f"{weights} does not match its config.json: {exc}") from exc
    except Exception as exc:  # SafetensorError (truncated, not a safetensors file), OSError
        raise UnreadableCheckpoint(weights, describe_failure(weights, exc)) from exc
    if missing or unexpected:
        log.warning("non-strict load of %s: missing %s, unexpected %s", weights, missing, unexpected)
    return model


def load_task_model(
    model_dir: str | Path,
    task: str,
    tokenizer_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
):
    """The ``task`` model exported in ``model_dir`` and its tokenizer: ``tokenizer_dir``, else the one exported
    with the model, else ``<data_dir>/tokenizer``. A folder holding another task's model is a
    :class:`~albef.checkpoint.CheckpointError` naming both tasks, raised before any weight is read."""
    from albef.tokenizer import load_tokenizer, model_tokenizer_dir

    saved, _ = read_config(model_dir)
    if saved != task:
        raise CheckpointError(
            f"{model_dir} does not hold a {task!r} model: its {CONFIG_FILE} says task {saved!r}"
        )
    model = load_pretrained(model_dir, task=task)
    return model, load_tokenizer(model_tokenizer_dir(model_dir, tokenizer_dir, data_dir), model.cfg)


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    # parameters() yields a parameter shared by several modules once
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def warn_unhonoured(base: ModelConfig, source: ModelConfig, where: Path) -> None:
    """Say which of params.yaml's model settings (``base``) a stage starting from the model in ``where``
    (``source``) ignores: all of them but the quirks (the sizes, queue, temperature and momentum are the source
    model's)."""
    wanted, saved = flatten(base.to_dict(), "model"), flatten(source.to_dict(), "model")
    differ = {k: v for k, v in wanted.items() if not k.startswith("model.quirks.") and saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k} = {mine!r} (the model: {saved.get(k)!r})" for k, mine in differ.items())
        log.warning(
            "params.yaml's model section differs from the model this stage starts from (%s), whose settings "
            "win: %s; retrain the source model to change them",
            where,
            shown,
        )


def load_for_task(
    source: str | Path, task: str, base: ModelConfig | None = None
) -> tuple[ALBEFModel, LoadReport | None]:
    """A ``task`` model initialised from ``source``: an albef model directory of any task (a pretraining
    export starts a retrieval, VQA, VE or NLVR2 finetuning, the official scripts' key remapping;
    ``base.quirks`` then applies), or an official checkpoint file (sizes inferred from its weights, the rest
    from ``base``, default the ``base`` preset).

    Weights the source lacks are an error, except the queues (a new task or queue size starts them fresh),
    the heads of a new task (``cls_head``, ``ta_head``) and, in NLVR2 under the official teacher quirk, the
    momentum twins (they keep their initialisation, as the official ``NLVR.py``).
    """
    source = Path(source)
    if source.is_dir():
        saved_task, cfg = read_config(source)
        if base is not None:
            warn_unhonoured(base, cfg, source)
        if saved_task == task:
            return load_pretrained(source, task), None
        if base is not None:  # a new task: the sizes are the source's, the quirk switches this run's
            cfg.quirks = copy.deepcopy(base.quirks)
        model = build_model(task, cfg)
        # through the source's own model: safetensors stores a shared tensor (tied weights, NLVR2's shared
        # cross-attention keys/values) under one of its names only; the model's state dict has them all
        state, report = convert_official_state_dict(load_pretrained(source, saved_task).state_dict(), model)
    elif source.is_file():
        state = read_official_state_dict(source)
        cfg = infer_config(state, base or base_config())
        model = build_model(task, cfg)
        state, report = convert_official_state_dict(state, model)
    else:
        raise CheckpointError(f"initial weights not found: {source} (an albef model folder or a .pth file)")
    allowed = _NEW_HEADS.get(task, ()) + (_MOMENTUM_PREFIXES if _keeps_initial_teacher(model) else ())
    missing = [k for k in report.missing if k not in _QUEUE_KEYS and not k.startswith(allowed)]
    if missing:
        raise CheckpointError(
            f"{source} cannot initialise a {task!r} model: {len(missing)} weights missing ({missing[:6]})"
        )
    model.load_state_dict(state, strict=False)
    return model, report
