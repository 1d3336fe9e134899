"""Whether an image received again under a SOP Instance UID the node has is the same image.

A PACS sends an instance again after it corrected the patient (IHE Patient Information Reconciliation), moved
it to another study, or when a modality re-used a UID for another image. The node's results copy the
source's patient and study and are computed from its pixels: results of the old content filed under the new
one's patient would be wrong, so a changed image is a new *revision* of the instance
(:meth:`node.receive.store.InstanceStore.store`), analysed again under output UIDs of its own.

The same image sent again through another route may come in another transfer syntax or with its elements
encoded otherwise: what is compared is what the elements say, and the pixels as decoded, never the bytes.
Private elements (in sequence items too) and the file meta information are not compared (routers add and
change them; the outputs copy none of them), and 16-bit values compare as numbers whatever VR an encoding
gave them (implicit VR reads LUT Data as US, explicit VR files often hold it as OW).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

__all__ = ["differences"]

_PIXEL_DATA = 0x7FE00010
# what a PACS may rewrite without changing the image: the character set is compared through the values it
# decodes, group lengths are encoding
_IGNORED = frozenset({0x00080005, _PIXEL_DATA})  # the pixels are compared decoded (_same_pixels)


def _read(data: bytes) -> Dataset:
    return dcmread(BytesIO(data))


# VRs whose value one encoding reads as numbers and another as bytes (LUT Data: US in one, OW in another)
_WORDS = frozenset({"US", "SS", "OW", "US or OW", "US or SS", "US or SS or OW", "OB or OW"})


def _value(e: DataElement) -> object:
    """An element's value as it means, not as it was encoded: items of sequences without their private
    elements, 16-bit words as numbers whichever VR the encoding gave them."""
    value = e.value
    if e.VR == "SQ":
        return tuple(_public(item) for item in value)
    if e.VR in _WORDS and value is not None and value != b"" and value != []:
        if isinstance(value, bytes | bytearray):
            return tuple(np.frombuffer(value[: len(value) // 2 * 2], "<u2").tolist())
        numbers = [value] if isinstance(value, int) else list(value)
        return tuple(np.asarray(numbers, np.int64).astype("<u2").tolist())
    return value


def _public(ds: Dataset) -> dict[int, object]:
    return {
        int(e.tag): _value(e)
        for e in ds
        if not e.tag.is_private and e.tag.element != 0 and int(e.tag) not in _IGNORED
    }


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _same_pixels(old: Dataset, new: Dataset) -> bool:
    if _PIXEL_DATA not in old or _PIXEL_DATA not in new:
        return (_PIXEL_DATA in old) == (_PIXEL_DATA in new)
    same_syntax = old.file_meta.get("TransferSyntaxUID") == new.file_meta.get("TransferSyntaxUID")
    if same_syntax and old.PixelData == new.PixelData:
        return True
    return bool(np.array_equal(old.pixel_array, new.pixel_array))  # another encoding of the same pixels?


def differences(stored: Path, received: bytes) -> list[str]:
    """What differs between the stored file of an instance and the bytes received again for it: keywords
    of the public elements whose values differ (names only, never values: they may be a patient's), and
    ``pixel data`` when the decoded pixels do. Empty when it is the same image.

    A file that cannot be read or decoded counts as different (``"content (cannot compare: ...)"``): the
    image is then analysed again, which is never wrong, where taking it for the same might be.
    """
    try:
        kept = stored.read_bytes()
        if kept == received:
            return []
        old, new = _read(kept), _read(received)
        a, b = _public(old), _public(new)
        changed = sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
        out = [_keyword(t) for t in changed]
        if not _same_pixels(old, new):
            out.append("pixel data")
        return out
    except Exception as exc:  # noqa: BLE001 - any failure to compare: take it for other content
        return [f"content (cannot compare: {type(exc).__name__})"]
