"""The committed demo checkpoints: safe to load, documented, and they work on phantoms."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradcam.config import REPO_ROOT, load_core_config
from gradcam.phantoms import make_phantom

CARD = REPO_ROOT / "checkpoints" / "README.md"


def _card_digests() -> dict[str, str]:
    """``file -> sha256`` from the model card's table rows (``| `file.pt` | ... | `sha256` |``)."""
    rows = re.findall(r"\|\s*`([\w.-]+\.pt)`\s*\|.*?`([0-9a-f]{64})`", CARD.read_text())
    return dict(rows)


def test_default_models_point_at_committed_checkpoints() -> None:
    core = load_core_config()
    digests = _card_digests()
    for m in core.models:
        assert m.checkpoint.is_file(), f"{m.checkpoint} missing"
        assert m.checkpoint.name in digests, f"{m.checkpoint.name} not in the model card"


def test_checkpoints_load_weights_only_and_match_the_card() -> None:
    digests = _card_digests()
    total = 0
    for name, digest in digests.items():
        path = REPO_ROOT / "checkpoints" / name
        total += path.stat().st_size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, (
            f"{name}: sha256 differs from the card"
        )
        obj = torch.load(path, map_location="cpu", weights_only=True)
        assert set(obj) == {"model_state_dict", "meta"}
        tensors = [t for t in obj["model_state_dict"].values() if t.is_floating_point()]
        assert tensors and all(t.dtype == torch.float16 for t in tensors)
        meta = obj["meta"]
        assert meta["input_size"] > 0 and meta["epochs"] >= 1 and "val_auc" in meta["metrics"]
    assert total < 60 * 1024 * 1024


def test_card_says_synthetic_only() -> None:
    text = CARD.read_text().lower()
    assert "synthetic" in text and "phantom" in text and "must not be used on patients" in text


def test_analyze_on_phantoms_gives_expected_decisions(tmp_path: Path) -> None:
    """Clear cases from an unseen seed: the consensus follows the label for nearly all of them, and the
    DICOM file of a phantom (what the node receives; every header variant) gets the same decision from
    every model as its PNG (what the models learnt from)."""
    import cv2
    import numpy as np

    from gradcam.phantom_dicom import header_variant, phantom_dataset, write_dicom

    cases = []
    for i in range(8):
        positive = i % 2 == 0
        ph = make_phantom(777, i, positive, 384)
        png, dcm = tmp_path / f"case{i}.png", tmp_path / f"case{i}_dicom.dcm"
        cv2.imwrite(str(png), np.round(ph.image * 65535).astype(np.uint16))
        write_dicom(phantom_dataset(ph, 777, i, **header_variant(777, i)), dcm)  # type: ignore[arg-type]
        cases.append((png, dcm, ph.positive))
    out = tmp_path / "out"
    files = [str(p) for png, dcm, _ in cases for p in (png, dcm)]
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", *files, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    agree = 0
    for png, dcm, label in cases:
        result = json.loads((out / png.stem / "result.json").read_text())
        from_dicom = json.loads((out / dcm.stem / "result.json").read_text())
        agree += result["consensus"] == label
        assert from_dicom["consensus"] == result["consensus"], dcm.name
        for model, r in result["models"].items():
            d = from_dicom["models"][model]
            assert d["positive"] == r["positive"], (dcm.name, model)
            assert abs(d["probability"] - r["probability"]) < 0.01, (dcm.name, model)
    assert agree >= 7, f"consensus matched the label on {agree} of 8 phantoms"


@pytest.mark.parametrize("name", ["ResNet18", "EfficientNet-B0", "DenseNet121"])
def test_meta_matches_config(name: str) -> None:
    m = load_core_config().model(name)
    meta = torch.load(m.checkpoint, map_location="cpu", weights_only=True)["meta"]
    assert meta["architecture"] == m.builder and meta["input_size"] == m.input_size
