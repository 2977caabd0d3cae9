"""ViT image encoder: timm's VisionTransformer with the official ALBEF settings.

timm names its parameters exactly as the official ``models/vit.py`` does (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so official
``visual_encoder.*`` weights load with no renaming. timm computes attention with PyTorch's fused SDPA.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from albef.config import VisionConfig

log = logging.getLogger(__name__)


class ImageEncoder(VisionTransformer):
    """ViT returning all tokens after the final LayerNorm: (B, 1 + N patches, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            num_classes=0,
            global_pool="",
            drop_path_rate=cfg.drop_path,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.cfg = cfg

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        check_images(images, self.cfg)
        return self.forward_features(images)


def check_images(images: torch.Tensor, cfg: VisionConfig) -> None:
    """Fail with what was expected and what came, instead of a shape error deep inside a conv."""
    expected = (3, cfg.image_size, cfg.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images: expected a float tensor of shape (batch, {expected[0]}, {expected[1]}, {expected[2]}), "
            f"got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images: expected a floating-point tensor (normalised pixels), got {images.dtype}")


def resample_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize a (1, 1 + g*g, C) position embedding to ``num_tokens`` = 1 + G*G.

    Same as the official ``interpolate_pos_embed``: the CLS row is kept, the grid is resized bicubically with
    ``align_corners=False`` and no antialiasing (224 -> 256 -> 384 all upsample).
    """
    old = pos_embed.shape[1]
    if old == num_tokens:
        return pos_embed
    new_grid = round((num_tokens - 1) ** 0.5)
    old_grid = round((old - 1) ** 0.5)
    if new_grid * new_grid + 1 != num_tokens or old_grid * old_grid + 1 != old:
        raise ValueError(
            f"pos_embed: cannot resample {old} tokens to {num_tokens}: both must be 1 + a square"
        )
    return resample_abs_pos_embed(
        pos_embed,
        new_size=(new_grid, new_grid),
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )


def load_deit_weights(encoder: ImageEncoder, source: str | Path) -> dict[str, list[str]]:
    """Initialise from a DeiT/ViT checkpoint: a local ``.pth``/``.safetensors`` file, or a timm hub name.

    The classification head is ignored and the position embedding is resampled to the encoder's grid.
    Returns the missing and unexpected keys; raises if a weight has the wrong shape.
    """
    path = Path(source)
    if path.exists():
        from albef.safe_load import CheckpointError, load_weights

        # safetensors, or torch.load with weights_only=True: a truncated, corrupt or pickled-code file is a
        # one-line CheckpointError naming it
        state = load_weights(path, "not a readable DeiT checkpoint")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a DeiT state dict")
    else:
        import timm

        log.info("loading %s from the Hugging Face hub through timm", source)
        try:
            state = timm.create_model(str(source), pretrained=True, num_classes=0).state_dict()
        except Exception as exc:  # offline machines end here: say what to do instead
            raise FileNotFoundError(
                f"could not load DeiT weights {source!r}: not a local file and the hub failed ({exc}). "
                "Download deit_base_patch16_224-b5f2ef4d.pth and pass its path."
            ) from exc
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist.", "fc_norm."))}
    if "dist_token" in state:
        raise ValueError(
            "distilled DeiT (with dist_token) is not the ALBEF initialisation; use deit_base_patch16_224"
        )
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], encoder.pos_embed.shape[1])
    own = encoder.state_dict()
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError("DeiT checkpoint does not fit the image encoder: " + "; ".join(bad))
    result = encoder.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
