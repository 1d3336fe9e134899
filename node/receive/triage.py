"""Which received instances are analysed: nothing the node made, then the rules of ``gradcam.eligibility``.

Triage reads only the header (no pixel decoding at store time: a C-STORE must stay fast). First, loop
protection: one of our own outputs (``node.outputs.is_own_output``, else Manufacturer ``gradcam-node``) is
never analysed, so a PACS that routes a study back to us does not start an analysis loop. Then
:func:`gradcam.eligibility.check_dataset` decides (frontal chest CR/DX of the right SOP class, pixel data a
radiograph has, the UIDs the outputs need, a minimum size); its reason becomes the reason the job is
``skipped``. What only decoding can tell (a blank image) makes the job ``failed`` in the worker instead.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset

from gradcam.eligibility import DEFAULT_MIN_SIDE, check_dataset

__all__ = ["triage", "is_own_output"]

log = logging.getLogger(__name__)

OWN_MANUFACTURER = "gradcam-node"


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


def triage(ds: Dataset, min_side: int = DEFAULT_MIN_SIDE) -> tuple[bool, str | None]:
    """Decide from the header whether an instance is analysed.

    Parameters
    ----------
    ds
        The received dataset; only header elements are read.
    min_side
        Fewest rows and columns analysed (``[preprocess] min_side``).

    Returns
    -------
    tuple[bool, str | None]
        ``(True, None)`` for an image the models may analyse, else ``(False, reason)`` with a readable reason.
    """
    if is_own_output(ds):
        return False, "own output (loop protection)"
    verdict = check_dataset(ds, min_side)
    return verdict.ok, verdict.reason
