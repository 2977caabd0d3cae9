"""A retrieval model as an MLflow pyfunc: images and texts in, similarities, match scores and rankings out.

Input: a table with the columns ``image`` and ``text``. Each row adds its image (the image file's bytes
base64-encoded; a file name under a configured server folder only where :class:`InputLimits` allows it) and/or its text (a caption); an empty or null cell adds nothing, so a
request may carry more images than texts or the other way round. Output: ``itc`` (images x texts cosine
similarities of the ITC features, unscaled), ``itm`` (images x texts ITM match logits, the score the
official protocol ranks by), and rankings by ITM: ``image_to_text`` (per image, text indices best first)
and ``text_to_image`` (per text, image indices best first). Indices count the non-empty cells of each column.

Every image-text pair is scored by the fusion encoder, so requests are meant to be small (tens of images
and texts); the evaluation stage's top-k protocol is the tool for whole test sets.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow.pyfunc

COLUMNS = ("image", "text")
MODEL_ARTIFACT = "albef_model"
# the file MLflow runs to build the pyfunc when loading
MODEL_CODE = Path(__file__).with_name("model_code.py")
_REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "tokenizers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "mlflow",
)


class InvalidModelInput(ValueError):
    """A request the model cannot answer; the message says which row and column."""


def bad_input(message: str):
    # MLflow's scoring server answers an MlflowException with INVALID_PARAMETER_VALUE as HTTP 400 with this
    # message; any other exception would be a 500 that hides it.
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class InputLimits:
    """What a served model accepts (``model_config`` keys, each overridable when loading:
    ``mlflow.pyfunc.load_model(uri, model_config={"image_root": "/srv/images"})``)."""

    # A server folder that an image cell may name a file under (a relative path, never leaving it); None: images
    # come in the request only, base64 (or bytes), and the model reads no file of the server.
    image_root: str | None = None
    max_pixels: int = 64_000_000  # an image of more pixels is refused before decoding (the CLI's limit)
    max_text_chars: int = 2000  # a longer text cell is refused before cleaning and tokenizing

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> InputLimits:
        """The limits in a model's ``model_config`` (other keys are the predictor's)."""
        known = {f.name for f in fields(cls)}
        limits = cls(**{k: v for k, v in config.items() if k in known})
        if limits.max_pixels < 1 or limits.max_text_chars < 1:
            raise ValueError(f"max_pixels and max_text_chars must be positive, got {limits}")
        return limits


DEFAULT_LIMITS = InputLimits()


def without_limits(config: dict[str, Any]) -> dict[str, Any]:
    """``model_config`` without the :class:`InputLimits` keys: what the task's predictor takes."""
    known = {f.name for f in fields(InputLimits)}
    return {k: v for k, v in config.items() if k not in known}


def decode_image(value: Any, row: int, column: str = "image", limits: InputLimits = DEFAULT_LIMITS):
    """A PIL image (RGB) from raw bytes or base64 text, or, when ``limits.image_root`` is set, from a file
    named relative to it; InvalidModelInput names the row and column.

    Whether a server file exists never shows in a message: a name outside the root (absolute, with ``..``, or
    a link leading out) is answered exactly like a name that is not there. Decoded by
    :func:`albef.data.images.decode_rgb`, the decoder preprocessing and the datasets use (EXIF orientation,
    transparency on white, 16-bit by its real range), so the model sees the pixels it was trained on."""
    from albef.data.images import ImageProblem, decode_rgb

    data: bytes | None
    source = "the image bytes"
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        shown = f"{text[:40]!r}{'...' if len(text) > 40 else ''}"
        data = _under_root(text, limits.image_root) if limits.image_root else None
        if data is not None:
            source = "the image file"
        else:
            source = "the base64 image"
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                if limits.image_root:
                    raise InvalidModelInput(
                        f"row {row}, column {column!r}: neither base64 image data nor the name of an image "
                        f"file under the served image root; got {shown}"
                    ) from exc
                raise InvalidModelInput(
                    f"row {row}, column {column!r}: expected an image file's bytes as base64 text ({exc}); "
                    f"got {shown} (this model reads no file of the server: its image_root is not set)"
                ) from exc
    else:
        raise InvalidModelInput(
            f"row {row}, column {column!r}: expected base64 text or bytes, got {type(value).__name__}"
        )
    try:
        return decode_rgb(data, source, max_pixels=limits.max_pixels)
    except ImageProblem as exc:
        raise InvalidModelInput(
            f"row {row}, column {column!r}: not a decodable image ({exc.reason}: {exc.detail})"
        ) from exc


def _under_root(text: str, root: str) -> bytes | None:
    """The bytes of the file ``text`` names relative to ``root``; None for a name that is not a plain relative
    path, leaves the root (also through a link), or names no file. One answer for all of these, so a caller
    cannot probe the server's files."""
    if not text or len(text) > 1024 or any(c in text for c in "\n\r\0"):
        return None
    name = Path(text)
    if name.is_absolute() or ".." in name.parts:
        return None
    try:
        base = Path(root).resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return None
        return path.read_bytes()
    except (OSError, ValueError):
        return None


def check_text_cell(value: Any, row: int, column: str, limits: InputLimits) -> str:
    """A text cell as a string within ``limits.max_text_chars``; anything else is InvalidModelInput."""
    if not isinstance(value, str):
        raise InvalidModelInput(f"row {row}, column {column!r}: expected text, got {type(value).__name__}")
    if len(value) > limits.max_text_chars:
        raise InvalidModelInput(
            f"row {row}, column {column!r}: {len(value)} characters, more than this model's max_text_chars "
            f"({limits.max_text_chars})"
        )
    return value


def present(value: Any) -> bool:
    if value is None or (isinstance(value, float) and value != value):  # NaN: pandas' missing value
        return False
    return not (isinstance(value, str) and not value.strip())


def as_table(frame, columns: tuple[str, ...]):
    """The request as a DataFrame holding ``columns``; anything else is InvalidModelInput."""
    import pandas as pd

    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        raise InvalidModelInput(f"expected a table with columns {list(columns)}, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InvalidModelInput(
            f"missing column(s) {missing}; the input needs columns {list(columns)} (got {list(frame.columns)})"
        )
    return frame


def split_input(frame, limits: InputLimits = DEFAULT_LIMITS) -> tuple[list[Any], list[str]]:
    """(images, texts) from the request table; missing columns and empty requests are InvalidModelInput."""
    frame = as_table(frame, COLUMNS)
    images = [
        decode_image(v, i, "image", limits) for i, v in enumerate(frame["image"].tolist()) if present(v)
    ]
    texts = [
        check_text_cell(v, i, "text", limits) for i, v in enumerate(frame["text"].tolist()) if present(v)
    ]
    if not images or not texts:
        raise InvalidModelInput(
            f"need at least one image and one text to compare; got {len(images)} image(s), {len(texts)} text(s)"
        )
    return images, texts


class RetrievalModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; the weights, config and tokenizer come from the ``albef_model`` artifact."""

    task = "retrieval"
    columns = COLUMNS
    required: tuple[str, ...] = ()  # files the exported model needs besides its weights and tokenizer

    @staticmethod
    def settings(params: dict[str, Any]) -> dict[str, Any]:
        """The model config from ``params``: the retrieval evaluation's token limit."""
        from albef.config import build_dataclass
        from albef.eval.settings import EvaluateConfig

        cfg = build_dataclass(EvaluateConfig, params.get("evaluate") or {}, "evaluate")
        return {"max_tokens": cfg.max_tokens}

    @staticmethod
    def example():
        """Two rows: a small PNG (base64) with a caption, and a second caption without an image."""
        import pandas as pd

        return pd.DataFrame({"image": [example_png(), ""], "text": ["a red square", "a blue circle"]})

    def load_context(self, context) -> None:
        from albef.serving.predict import TaskPredictor

        config = dict(context.model_config or {})
        self.limits = InputLimits.from_config(config)
        self.max_tokens = int(config.get("max_tokens", 30))
        self.max_words = int(config.get("max_words", 30))  # the evaluation's caption cleaning (pre_caption)
        # a served model has no params.yaml section: it computes on the device rule's auto (the GPU if any)
        self.loaded = TaskPredictor(Path(context.artifacts[MODEL_ARTIFACT]), task="retrieval")
        self.model, self.device = self.loaded.model, self.loaded.device

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, list]:
        from albef.data.text import pre_caption
        from albef.serving.predict import BadInput

        try:
            images, texts = split_input(model_input, self.limits)
            texts = self.loaded.clean(texts, pre_caption, self.max_words)
        except (InvalidModelInput, BadInput) as exc:
            raise bad_input(str(exc)) from exc
        return self.score(images, texts)

    def score(self, images: list, texts: list[str]) -> dict[str, list]:
        import torch

        from albef.models.retrieval import image_features, itm_scores, text_features

        with torch.no_grad():
            pixels = self.loaded.pixels(images)
            ids, mask = self.loaded.tokens(texts, self.max_tokens)
            img_embeds, img_feats = image_features(self.model, pixels)
            txt_embeds, txt_feats = text_features(self.model, ids, mask)
            itc = img_feats @ txt_feats.t()
            grid = torch.cartesian_prod(torch.arange(len(images)), torch.arange(len(texts)))
            itm = itm_scores(self.model, img_embeds, txt_embeds, mask, grid).view(len(images), len(texts))
        itm = itm.float().cpu()
        return {
            "itc": itc.float().cpu().tolist(),
            "itm": itm.tolist(),
            "image_to_text": torch.argsort(itm, dim=1, descending=True, stable=True).tolist(),
            "text_to_image": torch.argsort(itm.t(), dim=1, descending=True, stable=True).tolist(),
        }


def example_png(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A small one-colour PNG, base64-encoded: the input examples' image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def string_signature(columns: tuple[str, ...]):
    """The input signature: every column a string (paths, base64 images, texts)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", c) for c in columns]))


def pip_requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
