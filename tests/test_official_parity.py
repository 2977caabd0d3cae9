"""Parity with the official ALBEF code on recorded reference files.

Every ``albef_ref_*.pt`` in ``$ALBEF_OFFICIAL_REF_DIR`` (default: ``tests/official``) is checked entry by
entry within 1e-5; a file albef cannot check fails with the reason, it is never skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from albef.parity import check_reference

REF_DIR = Path(os.environ.get("ALBEF_OFFICIAL_REF_DIR", Path(__file__).parent / "official"))
REF_FILES = sorted(REF_DIR.glob("albef_ref_*.pt"))


def test_reference_directory_is_not_empty():
    assert REF_FILES, f"no albef_ref_*.pt files in {REF_DIR}"


@pytest.mark.parametrize("path", REF_FILES, ids=[p.name for p in REF_FILES])
def test_matches_official(path: Path):
    report = check_reference(path)
    assert report.ok, f"{path.name} differs from the official code:\n" + "\n".join(report.failures())
    assert len(report.entries) >= 6  # the smallest reference (SNLI-VE) records 6 outputs


def test_unknown_model_fails_with_a_reason(tmp_path: Path):
    fake = tmp_path / "albef_ref_captioning.pt"
    fake.write_bytes(b"")
    report = check_reference(fake)
    assert not report.ok
    assert "captioning" in report.error


def test_a_wrong_value_is_caught(tmp_path: Path):
    import torch

    ref = torch.load(REF_DIR / "albef_ref_pretrain.pt", weights_only=True)
    ref["outputs"]["image_feat"] = ref["outputs"]["image_feat"] + 1e-4
    bad = tmp_path / "albef_ref_pretrain.pt"
    torch.save(ref, bad)
    report = check_reference(bad)
    assert not report.ok
    assert any("outputs/image_feat" in line for line in report.failures())
