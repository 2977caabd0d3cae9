"""Initialising ALBEF from pretrained unimodal encoders: DeiT for the image, BERT for the text.

This is how the official pretraining starts (``init_deit=True`` and ``BertForMaskedLM.from_pretrained``):
layers 0..L-1 of BERT become the text and fusion layers, the cross-attention blocks (which BERT lacks) keep
BERT's own initialisation, and the momentum twins are copied from the result. Sources are local paths or,
when the hub is reachable, hub names. A source that cannot be loaded is an error, never a silent random
initialisation (the official code's failed DeiT download ruined users' pretraining, issue #71).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from albef.models.base import ContrastiveModel
from albef.models.pretrain import ALBEFPretrain
from albef.models.vision import load_deit_weights
from albef.models.xbert import TextEncoder
from albef.safe_load import first_line, load_weights

log = logging.getLogger(__name__)


def bert_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a Hugging Face BERT (folder or hub name), keyed ``bert.*`` / ``cls.*``."""
    from transformers import BertForMaskedLM

    try:
        model = BertForMaskedLM.from_pretrained(str(source))
    except Exception as exc:
        folder = Path(source)
        for name in ("model.safetensors", "pytorch_model.bin") if folder.is_dir() else ():
            if (folder / name).is_file():  # say which file is truncated, corrupt or refused, and why
                load_weights(folder / name, "not readable BERT weights")
        raise FileNotFoundError(
            f"could not load BERT weights from {source!r} ({first_line(exc)}); pass a local bert-base-uncased "
            "folder when the hub is unreachable"
        ) from exc
    return model.state_dict()


def load_bert_weights(
    model: ContrastiveModel, source: str | Path | dict[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Copy BERT's embeddings, layers (and MLM head when the model has one) into the online text encoder."""
    state = bert_state_dict(source) if not isinstance(source, dict) else source
    backbone: TextEncoder = model.text_backbone
    own = backbone.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("bert.") and not key.startswith("bert.pooler."):
            mapped[key.removeprefix("bert.")] = value
    layers_in_source = {int(k.split(".")[2]) for k in mapped if k.startswith("encoder.layer.")}
    if layers_in_source and max(layers_in_source) + 1 < model.cfg.text.num_layers:
        raise ValueError(
            f"BERT has {max(layers_in_source) + 1} layers but the model needs {model.cfg.text.num_layers} "
            "(text.text_layers + text.fusion_layers)"
        )
    mapped = {k: v for k, v in mapped.items() if k in own or not k.startswith("encoder.layer.")}
    bad = [
        f"{k}: BERT {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError("BERT weights do not fit the text encoder: " + "; ".join(bad[:6]))
    unexpected = [k for k in mapped if k not in own]
    result = backbone.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    missing = [k for k in result.missing_keys if ".crossattention." not in k]
    if isinstance(model, ALBEFPretrain):
        head = {k.removeprefix("cls."): v for k, v in state.items() if k.startswith("cls.")}
        if head:
            model.text_encoder.cls.load_state_dict(head, strict=False)
    if missing:
        raise ValueError(f"BERT checkpoint lacks weights the text encoder needs: {missing[:8]}")
    return {"missing": missing, "unexpected": unexpected}


def init_from_pretrained(
    model: ContrastiveModel, bert: str | Path | None = None, deit: str | Path | None = None
) -> None:
    """Load BERT and/or DeiT into the online encoders, then reset the momentum twins to match."""
    if bert is not None:
        load_bert_weights(model, bert)
        log.info("text encoder initialised from %s", bert)
    if deit is not None:
        load_deit_weights(model.visual_encoder, deit)
        log.info("image encoder initialised from %s", deit)
    model.copy_params()
