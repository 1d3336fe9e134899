"""Phantoms: deterministic, labels consistent with the images, DICOM valid for dciodvfy."""

from __future__ import annotations

import csv
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from gradcam.datasets import load_samples
from gradcam.phantom_dicom import header_variant, phantom_dataset, write_dicom
from gradcam.phantoms import generate_dataset, make_phantom, phantom_label

DCIODVFY = "/usr/bin/dciodvfy"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 6, seed=11, size=128).parent
    b = generate_dataset(tmp_path / "b", 6, seed=11, size=128).parent
    c = generate_dataset(tmp_path / "c", 6, seed=12, size=128).parent
    assert _digest(a) == _digest(b)
    assert _digest(a)["images/phantom_11_00000.png"] != _digest(c)["images/phantom_12_00000.png"]


def test_image_does_not_depend_on_count(tmp_path: Path) -> None:
    small = generate_dataset(tmp_path / "s", 3, seed=5, size=96).parent
    large = generate_dataset(tmp_path / "l", 7, seed=5, size=96).parent
    for i in range(3):
        name = f"images/phantom_5_{i:05d}.png"
        assert (small / name).read_bytes() == (large / name).read_bytes()


def test_positive_shares_anatomy_and_lesion_lies_in_its_mask() -> None:
    neg = make_phantom(3, 4, False, 256)
    pos = make_phantom(3, 4, True, 256)
    assert pos.positive and not neg.positive
    assert not neg.mask.any() and not neg.boxes
    inside = pos.mask > 0
    diff = pos.image.astype(np.float64) - neg.image
    # The lesion adds density where the mask is, and (almost) nothing far from it.
    far = cv2.dilate(pos.mask, np.ones((31, 31), np.uint8)) == 0
    assert diff[inside].mean() > 0.04
    assert np.abs(diff[far]).mean() < 0.005


def test_boxes_are_the_mask_components() -> None:
    for i in range(6):
        ph = make_phantom(9, i, True, 192)
        n, labels, stats, _ = cv2.connectedComponentsWithStats((ph.mask > 0).astype(np.uint8))
        assert len(ph.boxes) == n - 1 >= 1
        for x0, y0, x1, y1 in ph.boxes:
            assert 0 <= x0 < x1 <= 192 and 0 <= y0 < y1 <= 192
            assert ph.mask[y0:y1, x0:x1].any()


def test_labels_csv_matches_images_and_masks(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 40, seed=21, positive_fraction=0.3, size=96)
    rows = list(csv.DictReader(open(labels)))
    assert len(rows) == 40
    positives = [r for r in rows if r["label"] == "1"]
    assert 4 <= len(positives) <= 20  # each image draws its own label with p = 0.3
    for r in rows:
        assert (tmp_path / r["file"]).is_file()
        assert int(r["label"]) == int(phantom_label(21, int(r["file"][-9:-4]), 0.3)) or r["label"] == "0"
        if r["label"] == "1":
            mask = cv2.imread(str(tmp_path / r["mask"]), cv2.IMREAD_UNCHANGED)
            assert mask.any() and r["boxes"]
            for box in r["boxes"].split(";"):
                x0, y0, x1, y1 = map(int, box.split(":"))
                assert mask[y0:y1, x0:x1].any()
        else:
            assert r["mask"] == "" and r["boxes"] == ""
    samples = load_samples(tmp_path)
    assert [s.label for s in samples] == [int(r["label"]) for r in rows]


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) not installed")
def test_dicom_phantoms_are_valid_and_varied(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 24, seed=2, fmt="dicom", size=128)
    files = sorted((tmp_path / "images").glob("*.dcm"))
    assert len(files) == 24
    photometric, modality, bits = set(), set(), set()
    for f in files[:6]:
        out = subprocess.run([DCIODVFY, str(f)], capture_output=True, text=True)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{f.name}: {errors}"
    for f in files:
        ds = pydicom.dcmread(f)
        photometric.add(ds.PhotometricInterpretation)
        modality.add(ds.Modality)
        bits.add(int(ds.BitsStored))
        assert 12 <= ds.BitsStored <= 16 and "WindowCenter" in ds and "WindowWidth" in ds
        assert str(ds.PatientName).startswith("PHANTOM^") and ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("PA", "AP")
        assert int(ds.pixel_array.max()) < (1 << int(ds.BitsStored))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"} and modality == {"CR", "DX"} and len(bits) > 1


def test_monochrome1_displays_like_monochrome2(tmp_path: Path) -> None:
    from gradcam.preprocess import load_image

    ph = make_phantom(1, 1, True, 128)
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        write_dicom(
            phantom_dataset(ph, 1, 1, photometric=photometric, bits_stored=14),
            tmp_path / f"{photometric}.dcm",
        )
    m1 = load_image(tmp_path / "MONOCHROME1.dcm", 10**7).pixels
    m2 = load_image(tmp_path / "MONOCHROME2.dcm", 10**7).pixels
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.99


def test_header_options_are_honest() -> None:
    ph = make_phantom(1, 2, False, 96)
    ds = phantom_dataset(ph, 1, 2, modality="CR", view=None, body_part=None, study_uid="1.2.3")
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and ds.Modality == "CR"
    assert "ViewPosition" not in ds and "BodyPartExamined" not in ds and ds.StudyInstanceUID == "1.2.3"
    assert set(header_variant(1, 2)) == {"modality", "photometric", "bits_stored", "view"}


def test_cli_writes_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "phantoms",
            "--out",
            str(out),
            "--count",
            "3",
            "--seed",
            "4",
            "--format",
            "both",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((out / "images").glob("*.png"))) == 3 and len(list((out / "images").glob("*.dcm"))) == 3
    assert (out / "labels.csv").read_text().startswith("file,label,mask,boxes")
    bad = subprocess.run(
        [sys.executable, "-m", "node.cli", "phantoms", "--out", str(out), "--count", "0", "--seed", "1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--count" in bad.stderr and "Traceback" not in bad.stderr
    shutil.rmtree(out)
