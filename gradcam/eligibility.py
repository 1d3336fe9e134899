"""What the models may analyse: the one place for the rules, each refusal with a reason an administrator
understands.

The models learnt frontal chest radiographs, so the rules follow the CR and DX IODs (PS3.3 A.2, A.26).
From the header (:func:`check_dataset`), in this order; the first rule that fails gives the reason:

1. the object has pixel data (SR, presentation states, KOs... do not);
2. Modality is CR or DX (either, for either SOP class: some devices label CR images DX);
3. not a DX *For Processing* object (raw detector data, not meant for viewing);
4. the SOP class is CR Image Storage or Digital X-Ray Image Storage - For Presentation: the SOP class
   decides what the object is, not the Modality tag (a CT image saying DX is refused, naming both);
5. the UIDs the outputs refer to are present and UIDs (digits and dots, at most 64 characters): SOP
   Instance, Study and Series Instance UID;
6. integer Pixel Data (not Float/Double Float Pixel Data), Bits Allocated 8 or 16 (a 1-bit image is a
   binary mask, not a radiograph);
7. one grey sample per pixel (Samples per Pixel 1, MONOCHROME1/2);
8. a single frame;
9. Rows and Columns at least ``min_side`` (``[preprocess] min_side``; real radiographs have 1000+);
10. Body Part Examined CHEST, THORAX (no defined term, but devices write it) or absent/empty;
11. View Position PA, AP or absent/empty (lateral and oblique views are not what the models learnt).

For PNG/JPEG only the size rule (:func:`check_size`) applies. After the display pipeline, every image must
show something (:func:`check_displayed`): a blank image would be scored as if it were a radiograph.

:mod:`gradcam.preprocess` applies the pixel rules again when it decodes (6, 9 and the blank image), so a
file that reaches the models by another way is refused as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from gradcam.config import PreprocessConfig

__all__ = [
    "Verdict",
    "ACCEPTED",
    "check_dataset",
    "check_pixel_encoding",
    "check_size",
    "check_displayed",
    "CR_IMAGE_STORAGE",
    "DX_FOR_PRESENTATION",
    "DX_FOR_PROCESSING",
    "ANALYSED_SOP_CLASSES",
    "ANALYSED_MODALITIES",
    "CHEST_BODY_PARTS",
    "FRONTAL_VIEWS",
    "BITS_ALLOCATED",
    "DEFAULT_MIN_SIDE",
    "BLANK_RANGE",
    "UID_RE",
    "valid_uid",
]

CR_IMAGE_STORAGE = str(ComputedRadiographyImageStorage)
DX_FOR_PRESENTATION = str(DigitalXRayImageStorageForPresentation)
DX_FOR_PROCESSING = str(DigitalXRayImageStorageForProcessing)
ANALYSED_SOP_CLASSES = frozenset({CR_IMAGE_STORAGE, DX_FOR_PRESENTATION})
ANALYSED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
BITS_ALLOCATED = (8, 16)
DEFAULT_MIN_SIDE: int = PreprocessConfig().min_side
# Displayed pixels are in [0, 1]: less than one grey level of an 8-bit display between darkest and brightest.
BLANK_RANGE = 1.0 / 255.0
_LEVEL_TOLERANCE = 1e-6  # float32 pixels exactly one level apart may compute a hair below 1/255
_BLANK_SHARE = 0.99  # this share of the pixels on one displayed value: nothing else to see
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FLOAT_PIXELS = {
    "FloatPixelData": "Float Pixel Data (7FE0,0008)",
    "DoubleFloatPixelData": "Double Float Pixel Data (7FE0,0009)",
}
# Digits and dots, 1-64 characters. Lenient: components with leading zeros are invalid but common, and
# harmless here (a UID names spool files: node.receive.spool uses the same check).
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX = 64
_REQUIRED_UIDS = (
    ("SOPInstanceUID", "SOP Instance UID (0008,0018)"),
    ("StudyInstanceUID", "Study Instance UID (0020,000D)"),
    ("SeriesInstanceUID", "Series Instance UID (0020,000E)"),
)


@dataclass(frozen=True)
class Verdict:
    """Whether an image may be analysed; ``reason`` says why not (None when it may)."""

    ok: bool
    reason: str | None = None

    @classmethod
    def refuse(cls, reason: str) -> Verdict:
        return cls(False, reason)


ACCEPTED = Verdict(True)


def _text(ds: Dataset, keyword: str) -> str:
    """The element's value as stripped text ("" when absent or empty)."""
    value: Any = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _missing(name: str) -> Verdict:
    return Verdict.refuse(f"missing {name}, which the CR/DX IODs require")


def _int(ds: Dataset, keyword: str) -> int | None:
    """The element's value as an int; None when absent, empty or not a number."""
    value: Any = ds.get(keyword, None)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def check_dataset(ds: Dataset, min_side: int = DEFAULT_MIN_SIDE) -> Verdict:
    """Decide from the header alone (no pixel decoding) whether the models may analyse ``ds``.

    Parameters
    ----------
    ds
        A DICOM dataset; only header elements are read.
    min_side
        Fewest rows and columns (``[preprocess] min_side``).

    Returns
    -------
    Verdict
        :data:`ACCEPTED` for a frontal chest CR/DX image, else the first rule it breaks as the reason.
    """
    for rule in (_check_kind, _check_uids, check_pixel_encoding, _check_grey_frame):
        verdict = rule(ds)
        if not verdict.ok:
            return verdict
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None:
        return _missing("Rows (0028,0010)")
    if cols is None:
        return _missing("Columns (0028,0011)")
    verdict = check_size(rows, cols, min_side)
    return verdict if not verdict.ok else _check_chest(ds)


def _check_kind(ds: Dataset) -> Verdict:
    """Rules 1-4: an image, of the CR or DX (For Presentation) SOP class, saying so in Modality."""
    sop_class = _text(ds, "SOPClassUID")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        name = _sop_class_name(sop_class) if sop_class else "(no SOP Class UID)"
        return Verdict.refuse(f"SOP class {name} has no pixel data")
    modality = _text(ds, "Modality").upper()
    if modality not in ANALYSED_MODALITIES:
        return Verdict.refuse(f"modality {modality or '(none)'} is not CR/DX")
    if sop_class == DX_FOR_PROCESSING:
        return Verdict.refuse(f"{_sop_class_name(sop_class)} (raw detector data) is not analysed")
    if not sop_class:
        return _missing("SOP Class UID (0008,0016)")
    if sop_class not in ANALYSED_SOP_CLASSES:
        return Verdict.refuse(
            f"SOP class {_sop_class_name(sop_class)} ({sop_class}) is not a CR or DX image although "
            f"Modality says {modality}: the SOP class decides"
        )
    return ACCEPTED


def valid_uid(uid: object) -> bool:
    """True for a syntactically valid DICOM UID (``^[0-9]+(\\.[0-9]+)*$``, 1-64 characters)."""
    return isinstance(uid, str) and 0 < len(uid) <= _UID_MAX and UID_RE.fullmatch(uid) is not None


def _check_uids(ds: Dataset) -> Verdict:
    """Rule 5: the outputs reference study, series and instance, so all three must be there."""
    for keyword, name in _REQUIRED_UIDS:
        value = _text(ds, keyword)
        if not value:
            return _missing(name)
        if not valid_uid(value):
            return Verdict.refuse(f"invalid {name} {value[:70]!r}: not a DICOM UID")
    return ACCEPTED


def check_pixel_encoding(ds: Dataset) -> Verdict:
    """Rule 6: integer Pixel Data with Bits Allocated 8 or 16 (also checked when decoding)."""
    if "PixelData" not in ds:
        for keyword, name in _FLOAT_PIXELS.items():
            if keyword in ds:
                return Verdict.refuse(
                    f"{name} is not analysed: radiographs store integers in Pixel Data (7FE0,0010)"
                )
    bits = _int(ds, "BitsAllocated")
    if bits is None:
        return _missing("Bits Allocated (0028,0100)")
    if bits not in BITS_ALLOCATED:
        what = " (a binary image, not a radiograph)" if bits == 1 else ""
        return Verdict.refuse(f"Bits Allocated {bits}{what} is not analysed: CR/DX images have 8 or 16")
    return ACCEPTED


def _check_grey_frame(ds: Dataset) -> Verdict:
    """Rules 7 and 8: one grey sample per pixel, one frame."""
    samples = _int(ds, "SamplesPerPixel")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if samples is None:
        return _missing("Samples per Pixel (0028,0002)")
    if not photometric:
        return _missing("Photometric Interpretation (0028,0004)")
    if samples != 1 or photometric not in _GREY:
        return Verdict.refuse(f"colour image ({photometric}) is not a radiograph")
    frames = ds.get("NumberOfFrames", None)
    if frames in (None, ""):
        return ACCEPTED
    try:
        n_frames = int(frames)
    except (TypeError, ValueError):
        return Verdict.refuse(f"unreadable Number of Frames {frames!r}")
    if n_frames != 1:
        return Verdict.refuse(f"multi-frame image ({n_frames} frames) is not analysed")
    return ACCEPTED


def _check_chest(ds: Dataset) -> Verdict:
    """Rules 10 and 11: a frontal chest image (absent or empty values accepted)."""
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return Verdict.refuse(f"body part {body_part} is not CHEST")
    view = _text(ds, "ViewPosition").upper()
    if view and view not in FRONTAL_VIEWS:
        return Verdict.refuse(f"view {view} is not frontal (PA/AP)")
    return ACCEPTED


def check_size(rows: int, cols: int, min_side: int = DEFAULT_MIN_SIDE) -> Verdict:
    """Rule 9, for every kind of input: at least ``min_side`` rows and columns."""
    if rows < min_side or cols < min_side:
        return Verdict.refuse(
            f"image of {cols} x {rows} pixels is too small to be a radiograph "
            f"(at least {min_side} a side: [preprocess] min_side)"
        )
    return ACCEPTED


def check_displayed(pixels: np.ndarray, hint: str = "") -> Verdict:
    """Refuse a blank image: displayed values (in [0, 1]) that are constant or nearly so.

    Blank means less than :data:`BLANK_RANGE` between the darkest and the brightest pixel, or 99 % of the
    pixels on one value (a few specks on an empty field). ``hint`` is added to the first reason.
    """
    if pixels.size == 0:
        return Verdict.refuse("blank image: no pixels; nothing to analyse")
    lo, hi = float(pixels.min()), float(pixels.max())
    if not hi - lo >= BLANK_RANGE - _LEVEL_TOLERANCE:  # also NaN
        hint = f" {hint}" if hint else ""
        what = (
            "every pixel has the same value" if hi == lo else "the pixels differ by less than one grey level"
        )
        return Verdict.refuse(f"blank image: {what} after the display pipeline{hint}; nothing to analyse")
    step = max(1, int(np.sqrt(pixels.size / 65_536)))  # a quarter-megapixel sample tells a blank field
    sample = pixels[::step, ::step] if pixels.ndim == 2 else pixels
    tail = (1.0 - _BLANK_SHARE) / 2.0 * 100.0
    p_lo, p_hi = np.percentile(sample, [tail, 100.0 - tail])
    if p_hi - p_lo < BLANK_RANGE - _LEVEL_TOLERANCE:
        return Verdict.refuse(
            f"blank image: {_BLANK_SHARE:.0%} of the pixels have one value after the display pipeline; "
            "nothing to analyse"
        )
    return ACCEPTED
