"""What a served model reads (issue 16, item 4): images come in the request (base64 or bytes) by default and no
server file is read; reading files is an option confined to a configured root; a pixel cap and a text cap apply
before decoding; no message tells whether a server file exists; the retrieval pyfunc cleans captions as the
evaluation does."""

from __future__ import annotations

import base64
import io
import types
from pathlib import Path

import pytest
from PIL import Image

from albef.serving.pyfunc import InputLimits, InvalidModelInput, decode_image, split_input, without_limits


def _png(size=(16, 12), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def served(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cat.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png(color=(1, 2, 3)))  # outside the root
    (root / "escape.png").symlink_to(tmp_path / "secret.png")  # a link leading out of it
    return root


def _message(value, limits: InputLimits) -> str:
    with pytest.raises(InvalidModelInput) as info:
        decode_image(value, 0, "image", limits)
    message = str(info.value)
    assert repr(value[:40]) in message  # the value is echoed back (it is the caller's own input)...
    return message.replace(repr(value[:40]), "<value>").replace(
        "<value>...", "<value>"
    )  # ...nothing else varies


def test_by_default_images_come_in_the_request_and_no_server_file_is_read(served: Path):
    image = decode_image(base64.b64encode(_png()).decode(), 0)
    assert image.size == (16, 12) and image.mode == "RGB"
    assert decode_image(_png(), 0).size == (16, 12)  # bytes
    existing, missing = str(served / "sub" / "cat.png"), str(served / "sub" / "dog.png")
    assert _message(existing, InputLimits()) == _message(missing, InputLimits())
    assert "reads no file of the server" in _message(existing, InputLimits())
    with pytest.raises(InvalidModelInput, match="reads no file of the server"):
        decode_image("/etc/passwd", 0)


def test_an_image_root_allows_names_under_it_and_nothing_else(served: Path, tmp_path: Path):
    limits = InputLimits(image_root=str(served))
    assert decode_image("sub/cat.png", 0, "image", limits).size == (16, 12)
    assert decode_image(base64.b64encode(_png()).decode(), 0, "image", limits).size == (16, 12)
    # outside the root, through a link, absolute, with .., or absent: one answer, so nothing can be probed
    refused = {
        name: _message(name, limits)
        for name in (
            "sub/dog.png",
            "escape.png",
            str(tmp_path / "secret.png"),
            "../secret.png",
            "sub/../../secret.png",
            "/etc/passwd",
        )
    }
    assert len(set(refused.values())) == 1, refused
    assert "neither base64 image data nor the name of an image file under the served image root" in next(
        iter(refused.values())
    )


def test_the_pixel_cap_applies_before_decoding():
    big = _png(size=(3000, 2000))  # 6 Mpx, a few KB of PNG
    with pytest.raises(InvalidModelInput, match=r"decompression_bomb.*3000x2000 pixels exceeds 5000000"):
        decode_image(big, 2, "image", InputLimits(max_pixels=5_000_000))
    assert decode_image(big, 2).size == (3000, 2000)  # the default cap, the CLI's 64 Mpx


def test_the_text_cap_applies_to_every_text_cell():
    frame = {"image": [base64.b64encode(_png()).decode()], "text": ["x" * 2001]}
    with pytest.raises(
        InvalidModelInput, match=r"row 0, column 'text': 2001 characters, more than .*\(2000\)"
    ):
        split_input(frame)
    images, texts = split_input(frame, InputLimits(max_text_chars=5000))
    assert len(images) == 1 and texts == ["x" * 2001]


def test_limits_come_from_the_model_config_and_the_rest_goes_to_the_predictor():
    config = {
        "max_tokens": 40,
        "max_words": 30,
        "image_root": "/srv/images",
        "max_pixels": 10,
        "max_text_chars": 9,
    }
    assert InputLimits.from_config(config) == InputLimits("/srv/images", 10, 9)
    assert without_limits(config) == {"max_tokens": 40, "max_words": 30}
    with pytest.raises(ValueError, match="must be positive"):
        InputLimits.from_config({"max_pixels": 0})


def test_the_retrieval_pyfunc_cleans_captions_as_the_evaluation_does(tiny_retrieval_model, monkeypatch):
    from albef.data.text import pre_caption
    from albef.serving.pyfunc import MODEL_ARTIFACT, RetrievalModel

    model = RetrievalModel()
    context = types.SimpleNamespace(
        model_config={"max_tokens": 16}, artifacts={MODEL_ARTIFACT: str(tiny_retrieval_model)}
    )
    model.load_context(context)
    seen = []
    monkeypatch.setattr(model, "score", lambda images, texts: seen.extend(texts) or {})
    model.predict(None, {"image": [base64.b64encode(_png()).decode()], "text": ["A RED, circle!!  "]})
    assert seen == [pre_caption("A RED, circle!!  ", 30)] and seen[0] == "a red circle"
