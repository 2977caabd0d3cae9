"""A retrieval model as an MLflow pyfunc: images and texts in, similarities, match scores and rankings out.

Input: a table with the columns ``image`` and ``text``. Each row adds its image (a file path, or the
image file's bytes base64-encoded) and/or its text (a caption); an empty or null cell adds nothing, so a
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
from pathlib import Path
from typing import Any

import mlflow.pyfunc

COLUMNS = ("image", "text")
MODEL_ARTIFACT = "albef_model"
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


def _bad_input(message: str):
    # MLflow's scoring server answers an MlflowException with INVALID_PARAMETER_VALUE as HTTP 400 with this
    # message; any other exception would be a 500 that hides it.
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_image(value: Any, row: int, column: str = "image"):
    """A PIL image (RGB) from a path, raw bytes or base64 text; InvalidModelInput names the row and column.

    Decoded by :func:`albef.data.images.decode_rgb`, the decoder preprocessing and the datasets use (EXIF
    orientation, transparency on white, 16-bit by its real range), so the model sees the pixels it was
    trained on."""
    from albef.data.images import ImageProblem, decode_rgb

    data: bytes
    source = "the image bytes"
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        # A short string naming an existing file is a path; anything else must be base64 of an image file.
        if len(text) < 4096 and "\n" not in text and _is_file(text):
            data, source = Path(text).read_bytes(), text
        else:
            source = "the base64 image"
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidModelInput(
                    f"row {row}, column {column!r}: neither an existing image file nor base64 data ({exc}); "
                    f"got {text[:40]!r}{'...' if len(text) > 40 else ''}"
                ) from exc
    else:
        raise InvalidModelInput(
            f"row {row}, column {column!r}: expected a path or base64 text, got {type(value).__name__}"
        )
    try:
        return decode_rgb(data, source)
    except ImageProblem as exc:
        raise InvalidModelInput(
            f"row {row}, column {column!r}: not a decodable image ({exc.reason}: {exc.detail})"
        ) from exc


def _is_file(text: str) -> bool:
    """Whether ``text`` names an existing file; a name the system refuses (base64 longer than a file name may
    be) is not one."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN: pandas' missing value
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


def split_input(frame) -> tuple[list[Any], list[str]]:
    """(images, texts) from the request table; missing columns and empty requests are InvalidModelInput."""
    frame = as_table(frame, COLUMNS)
    images = [decode_image(v, i) for i, v in enumerate(frame["image"].tolist()) if _present(v)]
    texts = []
    for i, v in enumerate(frame["text"].tolist()):
        if _present(v):
            if not isinstance(v, str):
                raise InvalidModelInput(f"row {i}, column 'text': expected text, got {type(v).__name__}")
            texts.append(v)
    if not images or not texts:
        raise InvalidModelInput(
            f"need at least one image and one text to compare; got {len(images)} image(s), {len(texts)} text(s)"
        )
    return images, texts


class RetrievalModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper; the weights, config and tokenizer come from the ``albef_model`` artifact."""

    def load_context(self, context) -> None:
        from albef.serving.predict import TaskPredictor

        config = dict(context.model_config or {})
        self.max_tokens = int(config.get("max_tokens", 30))
        # a served model has no params.yaml section: it computes on the device rule's auto (the GPU if any)
        self.loaded = TaskPredictor(Path(context.artifacts[MODEL_ARTIFACT]), task="retrieval")
        self.model, self.device = self.loaded.model, self.loaded.device

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, list]:
        try:
            images, texts = split_input(model_input)
        except InvalidModelInput as exc:
            raise _bad_input(str(exc)) from exc
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


def example_input():
    """Two rows: a small PNG (base64) with a caption, and a second caption without an image."""
    import pandas as pd

    return pd.DataFrame({"image": [example_png(), ""], "text": ["a red square", "a blue circle"]})


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


def log_albef_model(
    model_dir: str | Path,
    task: str,
    python_model: mlflow.pyfunc.PythonModel,
    columns: tuple[str, ...],
    input_example: Any,
    model_config: dict[str, Any],
    name: str = "model",
    required: tuple[str, ...] = (),
    **kwargs: Any,
):
    """Log the exported ``task`` model in ``model_dir`` (model.safetensors, config.json, tokenizer/ and the
    ``required`` files) as the pyfunc ``python_model``, with a string signature of ``columns`` and an input
    example; albef's source goes along, so the model loads with only the libraries of
    :func:`pip_requirements` installed. Returns MLflow's ``ModelInfo``."""
    import albef
    from albef.checkpoint import read_config

    model_dir = Path(model_dir)
    saved, _ = read_config(model_dir)
    if saved != task:
        raise ValueError(f"{model_dir} holds a {saved!r} model; the {task} pyfunc needs a {task} model")
    for needed in ("tokenizer", *required):
        if not (model_dir / needed).exists():
            raise FileNotFoundError(f"{model_dir / needed} not found: export the model with its {needed}")
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=python_model,
        artifacts={MODEL_ARTIFACT: str(model_dir)},
        code_paths=[str(Path(albef.__file__).parent)],
        signature=string_signature(columns),
        input_example=input_example,
        model_config=model_config,
        pip_requirements=pip_requirements(),
        **kwargs,
    )


def log_retrieval_model(model_dir: str | Path, name: str = "model", max_tokens: int = 30, **kwargs: Any):
    """Log the exported retrieval model in ``model_dir`` as a :class:`RetrievalModel` pyfunc
    (:func:`log_albef_model`). Returns MLflow's ``ModelInfo``."""
    return log_albef_model(
        model_dir,
        "retrieval",
        RetrievalModel(),
        COLUMNS,
        example_input(),
        {"max_tokens": max_tokens},
        name=name,
        **kwargs,
    )
