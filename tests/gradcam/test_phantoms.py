"""Synthetic chest phantoms: determinism, labels that match the pixels, DICOM validity, the CLI."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from gradcam.config import REPO_ROOT
from gradcam.phantoms import (
    generate_dataset,
    header_variant,
    make_phantom,
    phantom_dataset,
    phantom_label,
    write_dicom,
)
from gradcam.preprocess import load_image

DCIODVFY = "/usr/bin/dciodvfy"
CLI = Path(sys.executable).parent / "gradcam-node"
SIZE = 96


def read_rows(labels: Path) -> list[dict[str, str]]:
    with open(labels, newline="") as fh:
        return list(csv.DictReader(fh))


def component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return sorted((x, y, x + w, y + h) for x, y, w, h, _ in stats[1:n].tolist())


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    return sorted(tuple(int(v) for v in b.split(":")) for b in text.split(";") if b)  # type: ignore[misc]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- determinism ---------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_folders(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 6, seed=11, fmt="both", size=SIZE).parent
    b = generate_dataset(tmp_path / "b", 6, seed=11, fmt="both", size=SIZE).parent
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert files_a == files_b
    assert len([f for f in files_a if f.endswith(".dcm")]) == 6


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 3, seed=1, size=SIZE).parent
    b = generate_dataset(tmp_path / "b", 3, seed=2, size=SIZE).parent
    for i in range(3):
        img_a = cv2.imread(str(a / f"images/phantom_1_{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        img_b = cv2.imread(str(b / f"images/phantom_2_{i:05d}.png"), cv2.IMREAD_UNCHANGED)
        assert np.abs(img_a.astype(np.int64) - img_b).mean() > 500  # on a 16-bit scale


def test_image_i_does_not_depend_on_count(tmp_path: Path) -> None:
    small = generate_dataset(tmp_path / "small", 3, seed=4, size=SIZE)
    large = generate_dataset(tmp_path / "large", 7, seed=4, size=SIZE)
    rows_small, rows_large = read_rows(small), read_rows(large)
    assert rows_small == rows_large[:3]
    for row in rows_small:
        assert (small.parent / row["file"]).read_bytes() == (large.parent / row["file"]).read_bytes()


def test_png_is_the_phantom_in_16_bits(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 2, seed=9, size=SIZE)
    for i, row in enumerate(read_rows(labels)):
        png = cv2.imread(str(tmp_path / row["file"]), cv2.IMREAD_UNCHANGED)
        assert png.dtype == np.uint16 and png.shape == (SIZE, SIZE)
        ph = make_phantom(9, i, row["label"] == "1", SIZE)
        np.testing.assert_array_equal(png, np.round(ph.image * 65535).astype(np.uint16))


# --- labels match the pixels ---------------------------------------------------------------------------


def test_labels_masks_and_boxes_are_consistent(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 16, seed=3, size=SIZE)
    assert labels.read_text().splitlines()[0] == "file,label,mask,boxes"
    rows = read_rows(labels)
    assert {r["label"] for r in rows} == {"0", "1"}
    for row in rows:
        assert (tmp_path / row["file"]).is_file()
        if row["label"] == "1":
            mask = cv2.imread(str(tmp_path / row["mask"]), cv2.IMREAD_UNCHANGED)
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
            assert parse_boxes(row["boxes"]) == component_boxes(mask)
            for x0, y0, x1, y1 in parse_boxes(row["boxes"]):
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        else:
            assert row["mask"] == "" and row["boxes"] == ""
    assert len(list((tmp_path / "masks").iterdir())) == sum(r["label"] == "1" for r in rows)


def test_positive_and_negative_share_the_anatomy_and_differ_at_the_lesion() -> None:
    for index in range(6):
        pos, neg = make_phantom(5, index, True, 128), make_phantom(5, index, False, 128)
        assert pos.positive and not neg.positive and not neg.mask.any() and neg.boxes == ()
        inside = pos.mask > 0
        diff = pos.image - neg.image
        assert diff[inside].mean() > 0.02  # the opacity brightens its support...
        near = cv2.dilate(pos.mask, np.ones((31, 31), np.uint8)) > 0
        assert np.abs(diff[~near]).max() < 1e-6  # ...and nothing far from it changes
        assert sorted(pos.boxes) == component_boxes(pos.mask)


def test_lesion_sizes_are_in_the_intended_range() -> None:
    largest = []
    for index in range(24):
        ph = make_phantom(21, index, True, 128)
        areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in ph.boxes]
        assert 1 <= len(ph.boxes) <= 4 and min(areas) > 0
        largest.append(np.sqrt(4 * (ph.mask > 0).sum() / np.pi) / 128)
    assert 0.08 < min(largest) and max(largest) < 0.45  # equivalent diameter, fraction of the width
    assert max(largest) - min(largest) > 0.08  # and they vary


def test_phantoms_vary() -> None:
    images = [make_phantom(8, i, False, 64).image for i in range(6)]
    for a in range(6):
        for b in range(a + 1, 6):
            assert np.abs(images[a] - images[b]).mean() > 0.02
    assert all(0.0 <= im.min() and im.max() <= 1.0 and im.dtype == np.float32 for im in images)


def test_positive_fraction_is_respected(tmp_path: Path) -> None:
    share = np.mean([phantom_label(0, i, 0.3) for i in range(3000)])
    assert abs(share - 0.3) < 0.03
    none = read_rows(generate_dataset(tmp_path / "none", 4, seed=1, positive_fraction=0.0, size=64))
    every = read_rows(generate_dataset(tmp_path / "all", 4, seed=1, positive_fraction=1.0, size=64))
    assert [r["label"] for r in none] == ["0"] * 4 and [r["label"] for r in every] == ["1"] * 4


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_phantom(0, 0, True, 32)
    with pytest.raises(ValueError, match="format"):
        generate_dataset(tmp_path, 1, 0, fmt="jpeg", size=64)
    with pytest.raises(ValueError, match="count"):
        generate_dataset(tmp_path, 0, 0, size=64)
    with pytest.raises(ValueError, match="fraction"):
        generate_dataset(tmp_path, 1, 0, positive_fraction=1.5, size=64)


# --- DICOM ---------------------------------------------------------------------------------------------


def test_dicom_folder_headers(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 40, seed=17, fmt="dicom", size=64)
    rows = read_rows(labels)
    datasets = [pydicom.dcmread(tmp_path / r["file"]) for r in rows]
    photometrics = [ds.PhotometricInterpretation for ds in datasets]
    assert 0.1 <= photometrics.count("MONOCHROME1") / 40 <= 0.45
    assert {ds.Modality for ds in datasets} == {"DX", "CR"}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 40  # each phantom its own study
    assert len({int(ds.BitsStored) for ds in datasets}) >= 3
    for i, (row, ds) in enumerate(zip(rows, datasets, strict=True)):
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert 12 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1 and ds.BitsAllocated == 16
        assert ds.PixelRepresentation == 0 and ds.BodyPartExamined == "CHEST"
        assert ds.ViewPosition in ("PA", "AP") and "WindowCenter" in ds and "WindowWidth" in ds
        assert str(ds.PatientName).startswith("PHANTOM^") and ds.PatientID == f"PH-17-{i}"
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert uid.is_valid and len(uid) <= 64
        top = (1 << ds.BitsStored) - 1
        pixels = ds.pixel_array.astype(np.int64)
        assert pixels.max() <= top
        # Displayed image = the phantom: MONOCHROME1 stores inverted values.
        expected = np.round(make_phantom(17, i, row["label"] == "1", 64).image * top).astype(np.int64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            expected = top - expected
        np.testing.assert_array_equal(pixels, expected)
        lo, hi = ds.WindowCenter - ds.WindowWidth / 2, ds.WindowCenter + ds.WindowWidth / 2
        assert -1 <= lo < hi <= top + 1  # the window lies on the data (to rounding)


def test_dicom_displays_as_the_png_of_the_same_phantom(tmp_path: Path) -> None:
    """The models learn from the PNGs and the node sees the DICOM files: through the header's window,
    MONOCHROME1 and every bit depth, the DICOM file shows the same image as the PNG (to the rounding of
    its stored values). A window narrower than the stored range showed a different contrast (pixels up to
    0.27 apart) and changed 7 of 40 consensus decisions of the demo models."""
    labels = generate_dataset(tmp_path, 16, seed=5, fmt="both", size=96)
    variants = set()
    for row in read_rows(labels):
        png = tmp_path / row["file"]
        dcm = png.with_suffix(".dcm")
        ds = pydicom.dcmread(dcm, stop_before_pixels=True)
        variants.add((ds.PhotometricInterpretation, int(ds.BitsStored)))
        shown_png = load_image(png, 10**8).pixels
        shown_dcm = load_image(dcm, 10**8).pixels
        rounding = 0.5 / ((1 << int(ds.BitsStored)) - 1) + 0.5 / 65535 + 1e-6
        assert np.abs(shown_png - shown_dcm).max() <= rounding, (dcm.name, ds.PhotometricInterpretation)
    assert {p for p, _ in variants} == {"MONOCHROME1", "MONOCHROME2"} and len({b for _, b in variants}) >= 3


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) not installed")
def test_generated_dicom_passes_dciodvfy(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 12, seed=23, fmt="dicom", size=64)
    seen = set()
    for row in read_rows(labels):
        path = tmp_path / row["file"]
        assert dciodvfy_errors(path) == [], path
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen.add((ds.Modality, ds.PhotometricInterpretation))
    assert {m for m, _ in seen} == {"DX", "CR"}


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize("modality", ["DX", "CR"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_phantom_dataset_parameters_are_honest(tmp_path: Path, modality: str, photometric: str) -> None:
    ph = make_phantom(2, 1, True, 64)
    ds = phantom_dataset(
        ph, 2, 1, modality=modality, photometric=photometric, bits_stored=14, view="AP", study_uid="1.2.3.4"
    )
    write_dicom(ds, tmp_path / "x.dcm")
    assert dciodvfy_errors(tmp_path / "x.dcm") == []
    back = pydicom.dcmread(tmp_path / "x.dcm")
    assert back.Modality == modality and back.PhotometricInterpretation == photometric
    assert back.BitsStored == 14 and back.ViewPosition == "AP" and back.StudyInstanceUID == "1.2.3.4"
    expected_class = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.1"
    assert back.SOPClassUID == expected_class == back.file_meta.MediaStorageSOPClassUID
    bare = phantom_dataset(ph, 2, 1, modality=modality, view=None, body_part=None)
    assert "BodyPartExamined" not in bare and "ViewPosition" not in bare
    write_dicom(bare, tmp_path / "bare.dcm")
    errors = dciodvfy_errors(tmp_path / "bare.dcm")
    if modality == "DX":  # both are optional there
        assert errors == []
    else:  # CR: type 2, absent on purpose; nothing else is wrong
        assert errors and all(
            ("BodyPartExamined" in e or "ViewPosition" in e or "Laterality" in e) for e in errors
        )


def test_phantom_dataset_refuses_bad_parameters() -> None:
    ph = make_phantom(0, 0, False, 64)
    for kwargs in ({"modality": "CT"}, {"photometric": "RGB"}, {"bits_stored": 17}):
        with pytest.raises(ValueError):
            phantom_dataset(ph, 0, 0, **kwargs)  # type: ignore[arg-type]


def test_header_variants_are_deterministic_and_mixed() -> None:
    variants = [header_variant(5, i) for i in range(200)]
    assert variants == [header_variant(5, i) for i in range(200)]
    mono1 = sum(v["photometric"] == "MONOCHROME1" for v in variants) / 200
    dx = sum(v["modality"] == "DX" for v in variants) / 200
    assert 0.15 < mono1 < 0.35 and 0.38 < dx < 0.62


# --- command line --------------------------------------------------------------------------------------


@pytest.mark.skipif(not CLI.exists() and shutil.which("gradcam-node") is None, reason="CLI not installed")
def test_cli_writes_the_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}
    out = tmp_path / "ph"
    args = ["phantoms", "--out", str(out), "--count", "3", "--seed", "6", "--positive-fraction", "1"]
    proc = subprocess.run(
        [str(CLI), *args, "--format", "both"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out / "labels.csv")
    assert [r["file"] for r in rows] == [f"images/phantom_6_{i:05d}.png" for i in range(3)]
    assert all(r["label"] == "1" and (out / r["mask"]).is_file() for r in rows)
    assert all((out / r["file"]).with_suffix(".dcm").is_file() for r in rows)
    png = cv2.imread(str(out / rows[0]["file"]), cv2.IMREAD_UNCHANGED)
    assert png.shape == (512, 512) and png.dtype == np.uint16


def test_monochrome1_displays_like_monochrome2_through_the_loader(tmp_path: Path) -> None:
    from gradcam.preprocess import load_image

    ph = make_phantom(1, 1, True, 128)
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds = phantom_dataset(ph, 1, 1, photometric=photometric, bits_stored=14)
        write_dicom(ds, tmp_path / f"{photometric}.dcm")
    m1 = load_image(tmp_path / "MONOCHROME1.dcm", 10**7).pixels
    m2 = load_image(tmp_path / "MONOCHROME2.dcm", 10**7).pixels
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.99


def test_cli_refuses_a_bad_count_without_a_traceback(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "node.cli", "phantoms", "--out", str(tmp_path), "--count", "0", "--seed", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "--count" in bad.stderr and "Traceback" not in bad.stderr
