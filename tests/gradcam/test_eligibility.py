"""gradcam.eligibility: every rule on what the models may analyse, with the reason an administrator reads.

Each dataset is a real file written with pydicom and read back, as the node and ``analyze`` see them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from gradcam.eligibility import (
    ACCEPTED,
    DEFAULT_MIN_SIDE,
    Verdict,
    check_dataset,
    check_displayed,
    check_size,
)
from tests import helpers

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"


def written(ds: Dataset, tmp_path: Path) -> Dataset:
    """``ds`` as read back from a DICOM file."""
    return pydicom.dcmread(helpers.write_dataset(ds, tmp_path / "image.dcm"))


def _image(**kw: object) -> Dataset:
    return helpers.image_dataset(**kw)  # type: ignore[arg-type]


def _resize(side: int) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.Rows = ds.Columns = side
        ds.PixelData = np.full((side, side), 100, np.uint16).tobytes()

    return change


def _bits_allocated_1(ds: Dataset) -> None:
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = bytes(64 * 64 // 8)


def _float_pixels(ds: Dataset) -> None:
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.zeros((64, 64), np.float32).tobytes()


def _double_pixels(ds: Dataset) -> None:
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 64
    ds.DoubleFloatPixelData = np.zeros((64, 64), np.float64).tobytes()


def _rgb(ds: Dataset) -> None:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(64 * 64 * 3)


def _frames(ds: Dataset) -> None:
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2


def _without(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _empty(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, "")


REFUSED: dict[str, tuple[Callable[[], Dataset], Callable[[Dataset], None] | None, str]] = {
    "CT class saying DX": (
        lambda: _image(modality="DX", sop_class_uid=helpers.CT_SOP_CLASS),
        None,
        "SOP class CT Image Storage (1.2.840.10008.5.1.4.1.1.2) is not a CR or DX image although Modality "
        "says DX: the SOP class decides",
    ),
    "SC claiming CR": (
        lambda: _image(modality="CR", sop_class_uid=SC_SOP_CLASS),
        None,
        "SOP class Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7) is not a CR or DX image "
        "although Modality says CR: the SOP class decides",
    ),
    "CT": (lambda: _image(modality="CT"), None, "modality CT is not CR/DX"),
    "no modality": (_image, _without("Modality"), "modality (none) is not CR/DX"),
    "no SOP class": (
        _image,
        _without("SOPClassUID"),
        "missing SOP Class UID (0008,0016), which the CR/DX IODs require",
    ),
    "SR": (helpers.sr_dataset, None, "SOP class Basic Text SR Storage has no pixel data"),
    "DX for processing": (
        lambda: _image(sop_class_uid=DX_FOR_PROCESSING),
        None,
        "Digital X-Ray Image Storage - For Processing (raw detector data) is not analysed",
    ),
    "no SOP Instance UID": (
        _image,
        _without("SOPInstanceUID"),
        "missing SOP Instance UID (0008,0018), which the CR/DX IODs require",
    ),
    "no Study Instance UID": (
        _image,
        _without("StudyInstanceUID"),
        "missing Study Instance UID (0020,000D), which the CR/DX IODs require",
    ),
    "no Series Instance UID": (
        _image,
        _without("SeriesInstanceUID"),
        "missing Series Instance UID (0020,000E), which the CR/DX IODs require",
    ),
    "empty Series Instance UID": (
        _image,
        _empty("SeriesInstanceUID"),
        "missing Series Instance UID (0020,000E), which the CR/DX IODs require",
    ),
    "bad Series Instance UID": (
        _image,
        lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.abc"),
        "invalid Series Instance UID (0020,000E) '1.2.abc': not a DICOM UID",
    ),
    "Bits Allocated 1": (
        _image,
        _bits_allocated_1,
        "Bits Allocated 1 (a binary image, not a radiograph) is not analysed: CR/DX images have 8 or 16",
    ),
    "Bits Allocated 32": (
        _image,
        lambda ds: setattr(ds, "BitsAllocated", 32),
        "Bits Allocated 32 is not analysed: CR/DX images have 8 or 16",
    ),
    "no Bits Allocated": (
        _image,
        _without("BitsAllocated"),
        "missing Bits Allocated (0028,0100), which the CR/DX IODs require",
    ),
    "Float Pixel Data": (
        _image,
        _float_pixels,
        "Float Pixel Data (7FE0,0008) is not analysed: radiographs store integers in Pixel Data (7FE0,0010)",
    ),
    "Double Float Pixel Data": (
        _image,
        _double_pixels,
        "Double Float Pixel Data (7FE0,0009) is not analysed: radiographs store integers in Pixel Data "
        "(7FE0,0010)",
    ),
    "RGB": (_image, _rgb, "colour image (RGB) is not a radiograph"),
    "palette": (
        _image,
        lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
        "colour image (PALETTE COLOR) is not a radiograph",
    ),
    "no photometric": (
        _image,
        _without("PhotometricInterpretation"),
        "missing Photometric Interpretation (0028,0004), which the CR/DX IODs require",
    ),
    "multi-frame": (_image, _frames, "multi-frame image (2 frames) is not analysed"),
    "1 x 1": (
        _image,
        _resize(1),
        "image of 1 x 1 pixels is too small to be a radiograph (at least 64 a side: [preprocess] min_side)",
    ),
    "32 x 32": (
        _image,
        _resize(32),
        "image of 32 x 32 pixels is too small to be a radiograph (at least 64 a side: [preprocess] min_side)",
    ),
    "no Rows": (_image, _without("Rows"), "missing Rows (0028,0010), which the CR/DX IODs require"),
    "knee": (lambda: _image(body_part="KNEE"), None, "body part KNEE is not CHEST"),
    "lateral": (lambda: _image(view="LATERAL"), None, "view LATERAL is not frontal (PA/AP)"),
}


@pytest.mark.parametrize("name", list(REFUSED))
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # a bad UID on purpose
def test_each_rule_refuses_with_its_reason(name: str, tmp_path: Path) -> None:
    make, change, reason = REFUSED[name]
    ds = written(make(), tmp_path)
    if change is not None:  # after reading back: pydicom cannot write some of these (no SOP Class UID...)
        change(ds)
    assert check_dataset(ds) == Verdict(False, reason)


@pytest.mark.parametrize(
    "kw",
    [
        {"modality": "CR"},
        {"modality": "DX"},
        {"modality": "DX", "view": "AP", "body_part": "THORAX", "photometric": "MONOCHROME1"},
        {"modality": "CR", "view": None, "body_part": None},
        {"modality": "DX", "sop_class_uid": helpers.CR_SOP_CLASS},  # a CR labelled DX by its device
    ],
)
def test_good_cr_and_dx_pass(kw: dict, tmp_path: Path) -> None:
    assert check_dataset(written(_image(**kw), tmp_path)) == ACCEPTED == Verdict(True, None)


def test_eight_bit_and_single_frame_pass(tmp_path: Path) -> None:
    ds = _image()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = bytes(64 * 64)
    ds.NumberOfFrames = 1
    assert check_dataset(written(ds, tmp_path)).ok


def test_min_side_is_a_parameter(tmp_path: Path) -> None:
    ds = written(_image(size=32), tmp_path)
    assert not check_dataset(ds).ok and DEFAULT_MIN_SIDE == 64
    assert check_dataset(ds, min_side=32) == ACCEPTED
    assert check_dataset(written(_image(size=256), tmp_path), min_side=256) == ACCEPTED
    assert check_dataset(written(_image(size=255), tmp_path), min_side=256).reason == (
        "image of 255 x 255 pixels is too small to be a radiograph "
        "(at least 256 a side: [preprocess] min_side)"
    )


def test_header_only(tmp_path: Path) -> None:
    # Pixel data that cannot be decoded does not matter: only the header is read.
    ds = _image()
    ds.PixelData = b"\x00\x00"
    assert check_dataset(written(ds, tmp_path)) == ACCEPTED


def test_size_rule_for_any_image() -> None:
    assert check_size(80, 100) == ACCEPTED
    assert check_size(16, 100).reason == (
        "image of 100 x 16 pixels is too small to be a radiograph (at least 64 a side: [preprocess] min_side)"
    )
    assert check_size(16, 16, min_side=16) == ACCEPTED


def test_blank_displayed_images() -> None:
    constant = np.full((64, 64), 0.5, np.float32)
    assert check_displayed(constant) == Verdict(
        False, "blank image: every pixel has the same value after the display pipeline; nothing to analyse"
    )
    assert check_displayed(constant, "(Rescale Slope 0?)").reason == (
        "blank image: every pixel has the same value after the display pipeline (Rescale Slope 0?); "
        "nothing to analyse"
    )
    almost = constant + np.linspace(0, 0.5 / 255, 64, dtype=np.float32)  # half a grey level
    assert not check_displayed(almost).ok
    assert not check_displayed(np.full((64, 64), np.nan, np.float32)).ok
    specks = np.zeros((64, 64), np.float32)
    specks[0, :5] = 1.0
    assert check_displayed(specks).reason == (
        "blank image: 99% of the pixels have one value after the display pipeline; nothing to analyse"
    )
    faint = 0.5 + np.random.default_rng(0).random((64, 64), np.float32) * 0.02  # low contrast, not blank
    assert check_displayed(faint) == ACCEPTED


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_uid_syntax_is_lenient_like_the_spool(tmp_path: Path) -> None:
    # A component with a leading zero breaks PS3.5 9.1 but is common in the wild, and harmless here.
    ds = written(_image(), tmp_path)
    ds.SeriesInstanceUID = "1.2.840.0010.7"
    assert check_dataset(ds) == ACCEPTED
    ds.SeriesInstanceUID = "1." + "2" * 63
    assert check_dataset(ds).reason.startswith("invalid Series Instance UID (0020,000E) '1.222")


def test_two_grey_levels_one_apart_are_an_image_at_every_level() -> None:
    # float32 pixels one 8-bit level apart may compute a hair below 1/255: still two greys, not blank
    for level in range(255):
        pixels = np.full((64, 64), level / 255, np.float32)
        pixels[:32] = (level + 1) / 255
        assert check_displayed(pixels).ok, level


def test_less_than_a_grey_level_is_blank_and_said_so() -> None:
    pixels = (np.linspace(30000, 30199, 64 * 64).reshape(64, 64) / 65535).astype(np.float32)
    verdict = check_displayed(pixels)
    assert not verdict.ok and "differ by less than one grey level" in (verdict.reason or "")
