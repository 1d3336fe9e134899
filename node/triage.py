"""Which received instances are analysed: frontal chest radiographs (CR/DX), and nothing the node made.

Triage reads only the header (no pixel decoding at store time: a C-STORE must stay fast). Rules, in order;
the first that fails gives the reason the job is ``skipped``:

1. not one of our own outputs (``node.outputs.is_own_output``, else Manufacturer ``gradcam-node``): a PACS
   that routes a study back to us must not start an analysis loop;
2. it has pixel data (SR, presentation states, KOs... do not);
3. Modality is CR or DX;
4. not a DX *for processing* object (raw detector data, not meant for viewing);
5. Body Part Examined is CHEST, or absent/empty (many CR/DX devices leave it out). ``THORAX`` is accepted
   too: it is no DICOM defined term, but some devices write it for chest images. Compared case-insensitively;
6. View Position is PA or AP, or absent/empty (lateral and oblique views are not what the models learnt);
7. a single grey frame (Samples per Pixel 1, MONOCHROME1/2, one frame).
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

__all__ = ["triage", "is_own_output", "ANALYSED_MODALITIES", "CHEST_BODY_PARTS", "FRONTAL_VIEWS"]

log = logging.getLogger(__name__)

ANALYSED_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
OWN_MANUFACTURER = "gradcam-node"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FOR_PROCESSING = {
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}


def _text(ds: Dataset, keyword: str) -> str:
    """The element's value as stripped text ("" when absent or empty)."""
    value: Any = ds.get(keyword, None)
    if value is None:
        return ""
    return str(value).strip()


def is_own_output(ds: Dataset) -> bool:
    """True if ``ds`` was made by this node.

    Asks ``node.outputs.is_own_output`` when that module is there and also checks Manufacturer, so loop
    protection never depends on one marker alone.
    """
    try:
        from node.outputs import is_own_output as outputs_check
    except ImportError:
        outputs_check = None
    if outputs_check is not None:
        try:
            if outputs_check(ds):
                return True
        except Exception:  # a malformed header must not break the fallback check below
            log.debug("node.outputs.is_own_output failed; falling back to Manufacturer", exc_info=True)
    return _text(ds, "Manufacturer").lower() == OWN_MANUFACTURER


def _sop_class_name(ds: Dataset) -> str:
    uid = _text(ds, "SOPClassUID")
    if not uid:
        return "(no SOP Class UID)"
    name = UID(uid).name
    return name if name and name != uid else uid


def triage(ds: Dataset) -> tuple[bool, str | None]:
    """Decide from the header whether an instance is analysed.

    Parameters
    ----------
    ds
        The received dataset; only header elements are read.

    Returns
    -------
    tuple[bool, str | None]
        ``(True, None)`` for a frontal chest CR/DX image, else ``(False, reason)`` with a readable reason.
    """
    if is_own_output(ds):
        return False, "own output (loop protection)"
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        return False, f"SOP class {_sop_class_name(ds)} has no pixel data"
    modality = _text(ds, "Modality").upper()
    if modality not in ANALYSED_MODALITIES:
        return False, f"modality {modality or '(none)'} is not CR/DX"
    sop_class = _text(ds, "SOPClassUID")
    if sop_class in _FOR_PROCESSING:
        return False, f"{_FOR_PROCESSING[sop_class]} (raw detector data) is not analysed"
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return False, f"body part {body_part} is not CHEST"
    view = _text(ds, "ViewPosition").upper()
    if view and view not in FRONTAL_VIEWS:
        return False, f"view {view} is not frontal (PA/AP)"
    return _check_pixels(ds)


def _check_pixels(ds: Dataset) -> tuple[bool, str | None]:
    samples = ds.get("SamplesPerPixel", 1)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if samples not in (None, 1) or (photometric and photometric not in ("MONOCHROME1", "MONOCHROME2")):
        return False, f"colour image ({photometric or f'{samples} samples per pixel'}) is not a radiograph"
    frames = ds.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        return False, f"unreadable Number of Frames {frames!r}"
    if n_frames != 1:
        return False, f"multi-frame image ({n_frames} frames) is not analysed"
    return True, None
