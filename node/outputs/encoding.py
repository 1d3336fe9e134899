"""Outputs assembled from encoded elements: Explicit VR Little Endian, byte for byte as pydicom writes it.

Why: pydicom encodes a dataset element by element every time it is written (some 12 µs an element; an SR
has about 900), and highdicom builds, deep-copies and validates its objects on every construction. The
outputs of one configuration share most of their elements, so the builders encode those once (cached by
what they depend on) and, per image, encode only the values that change and join the bytes.

An output is then a :class:`~pydicom.dataset.Dataset` of :class:`~pydicom.dataelem.RawDataElement`\\ s, as
if read from a file: pydicom writes them unchanged (:func:`assemble` records their encoding for that) and
decodes one only when it is read. Raw elements are immutable tuples, so outputs may share them safely.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Iterable
from functools import lru_cache

from highdicom.sr import CodedConcept
from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

__all__ = [
    "Encodings",
    "DEFAULT_ENCODINGS",
    "encodings_of",
    "element",
    "timestamp",
    "encode",
    "encode_dataset",
    "item",
    "sequence",
    "code_item",
    "assemble",
    "file_parts",
    "file_bytes",
]

Encodings = tuple[str, ...]
"""Python codecs of a dataset's Specific Character Set (hashable, so that encoded parts can be cached)."""

DEFAULT_ENCODINGS: Encodings = (default_encoding,)

_ITEM_TAG = b"\xfe\xff\x00\xe0"
_LENGTH = struct.Struct("<I")
_TAG = struct.Struct("<HH")
_US = struct.Struct("<H")
_FD = struct.Struct("<d")

# highdicom's file meta information (the outputs were made with highdicom and still say so)
_IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.9.7433.1.1"


def encodings_of(ds: Dataset) -> Encodings:
    """The codecs of ``ds``'s Specific Character Set (the default repertoire without one)."""
    value = ds.get("SpecificCharacterSet", None)
    return tuple(convert_encodings(value)) if value else DEFAULT_ENCODINGS


def encode(elem: DataElement, encodings: Encodings = DEFAULT_ENCODINGS) -> bytes:
    """One data element (tag, VR, length, value) exactly as pydicom writes it in Explicit VR LE."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, list(encodings))
    return fp.getvalue()


# The VRs of the values encoded per image, whose encoding is simple enough to write here: pydicom takes
# some 12 µs an element (a DataElement, its validation, a buffer), this a microsecond. Anything else goes
# through pydicom; the identity tests compare the results with pydicom's encoding byte for byte.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})  # the default repertoire
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})  # written in the character set
_BYTES_VRS = frozenset({"OB", "OW", "UN"})  # written as they are (pixel data, file meta version)
_SHORT_HEADER = struct.Struct("<HH2sH")
_LONG_HEADER = struct.Struct("<HH2s2xI")


def _header(tag: int, vr: str, length: int) -> bytes:
    if vr in EXPLICIT_VR_LENGTH_32:
        return _LONG_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)
    return _SHORT_HEADER.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def _simple_value(vr: str, value: object, encodings: Encodings) -> bytes | None:
    """``value``'s bytes as pydicom writes them, for a single string, US, UL or FD value or even-length
    bytes; else None."""
    if isinstance(value, str) and "\\" not in value:  # str, or pydicom's UID
        if vr in _ASCII_VRS:
            data = value.encode(default_encoding)
        elif vr in _TEXT_VRS:
            data = encode_string(value, list(encodings))
        else:
            return None
        return data + (b"\x00" if vr == "UI" else b" ") if len(data) % 2 else data
    if vr == "US" and type(value) is int:
        return _US.pack(value)
    if vr == "UL" and type(value) is int:
        return _LENGTH.pack(value)
    if vr in _BYTES_VRS and type(value) is bytes and len(value) % 2 == 0:
        return value
    if vr == "FD" and isinstance(value, float):
        return _FD.pack(value)
    return None


def element(tag: int, vr: str, value: object, encodings: Encodings = DEFAULT_ENCODINGS) -> bytes:
    """``value`` as the element ``tag`` of ``vr``, exactly as pydicom writes it (see :func:`encode`)."""
    data = _simple_value(vr, value, encodings)
    if data is None or (len(data) > 0xFFFF and vr not in EXPLICIT_VR_LENGTH_32):
        return encode(DataElement(tag, vr, value), encodings)
    return _header(tag, vr, len(data)) + data


def timestamp(now: datetime.datetime) -> tuple[str, str, str]:
    """``now`` as the DA, TM and DT strings pydicom writes for ``DA(now.date())``, ``TM(now.time())`` and
    ``DT(now)`` (the values highdicom set), to be encoded as strings."""
    fraction = ".%f" if now.microsecond > 0 else ""
    return (
        now.strftime("%Y%m%d"),
        now.strftime(f"%H%M%S{fraction}"),
        now.strftime(f"%Y%m%d%H%M%S{fraction}%z"),
    )


def encode_dataset(ds: Dataset, encodings: Encodings = DEFAULT_ENCODINGS) -> list[bytes]:
    """Every element of ``ds`` (made by pydicom or highdicom), encoded; for parts made once and reused."""
    return [encode(ds[e.tag], encodings) for e in ds]


def _tag_order(encoded: bytes) -> tuple[int, int]:
    return _TAG.unpack_from(encoded)


def item(elements: Iterable[bytes]) -> bytes:
    """A sequence item of defined length holding the encoded ``elements`` (put in tag order here)."""
    body = b"".join(sorted(elements, key=_tag_order))
    return _ITEM_TAG + _LENGTH.pack(len(body)) + body


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """An SQ element of defined length holding the encoded ``items``, as pydicom writes it."""
    body = b"".join(items)
    return _TAG.pack(tag >> 16, tag & 0xFFFF) + b"SQ\x00\x00" + _LENGTH.pack(len(body)) + body


def code_item(code: Code, encodings: Encodings = DEFAULT_ENCODINGS) -> bytes:
    """``code`` as a coded-concept sequence item, as highdicom's ``CodedConcept`` encodes it."""
    return _code_item(code.value, code.scheme_designator, code.meaning, code.scheme_version, encodings)


@lru_cache(maxsize=512)
def _code_item(value: str, scheme: str, meaning: str, version: str | None, encodings: Encodings) -> bytes:
    # cached by the strings: Code's equality ignores the meaning
    return item(encode_dataset(CodedConcept(value, scheme, meaning, version), encodings))


def _raw(encoded: bytes) -> RawDataElement:
    """A top-level element from its encoding (the reverse of :func:`encode`)."""
    group, number = _TAG.unpack_from(encoded)
    vr = encoded[4:6].decode("ascii")
    start = 12 if vr in EXPLICIT_VR_LENGTH_32 else 8
    value = encoded[start:]
    return RawDataElement(BaseTag(group << 16 | number), vr, len(value), value, 0, False, True)


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """The File Meta Information that highdicom gave every output."""
    from highdicom.version import __version__ as highdicom_version

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = _IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"highdicom{highdicom_version}"
    return meta


def assemble(
    elements: Iterable[bytes],
    sop_class_uid: str,
    sop_instance_uid: str,
    pixel_data: DataElement | None = None,
) -> Dataset:
    """An output from its encoded top-level elements, ready to write in Explicit VR Little Endian.

    ``pixel_data`` stays an ordinary element: its value is written once, straight from the bytes given,
    instead of being copied into an encoding first.
    """
    ds = Dataset({(raw := _raw(e)).tag: raw for e in elements})
    if pixel_data is not None:
        ds.add(pixel_data)
    ds.file_meta = _file_meta(sop_class_uid, sop_instance_uid)
    ds.preamble = b"\x00" * 128
    # As for a dataset read from a file: pydicom writes raw elements as they are when the encoding and the
    # character set it records are the ones it writes with.
    ds.set_original_encoding(False, True, ds._character_set)
    return ds


_META_TAGS = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)


def _meta_bytes(meta: FileMetaDataset) -> bytes:
    """The File Meta Information as ``write_file_meta_info(..., enforce_standard=True)`` writes it; for the
    meta that :func:`assemble` makes (any other goes through pydicom)."""
    if sorted(int(t) for t in meta.keys() if t != 0x00020000) == list(_META_TAGS):
        parts = []
        for tag in _META_TAGS:
            elem = meta[tag]
            parts.append(element(tag, elem.VR, elem.value))
        body = b"".join(parts)
        return _header(0x00020000, "UL", 4) + _LENGTH.pack(len(body)) + body
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


# values at least this long are their own buffer in file_parts(): written as they are, never copied
_OWN_BUFFER = 64 * 1024


def file_parts(ds: Dataset) -> list[bytes]:
    """``ds`` as the file ``ds.save_as(fp, enforce_file_format=True)`` writes, for an output made by
    :func:`assemble`, in a few buffers to write one after the other: headers and small values joined, each
    large value (the pixel data) on its own, so that writing a file copies none of its megabytes.

    Its raw elements go out as they are, with no pass through pydicom's writer (about 10 ms an image saved);
    an element changed or read since (no longer raw) is encoded again. What is written is always the
    dataset as it is now. tests/node/test_outputs.py compares :func:`file_bytes` with ``save_as``.
    """
    parts: list[bytes] = []
    small = [ds.preamble or b"\x00" * 128, b"DICM", _meta_bytes(ds.file_meta)]

    def add(header: bytes, value: bytes) -> None:
        small.append(header)
        if len(value) < _OWN_BUFFER:
            small.append(value)
            return
        parts.append(b"".join(small))
        small.clear()
        parts.append(value)

    encodings: Encodings | None = None
    for tag in sorted(ds.keys(), key=int):  # int: BaseTag compares in Python
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement) and not elem.is_implicit_VR and elem.is_little_endian:
            value = elem.value or b""
            if elem.VR is not None and elem.length == len(value) and len(value) % 2 == 0:
                add(_header(int(tag), elem.VR, len(value)), value)
                continue
        if encodings is None:
            encodings = encodings_of(ds)
        elem = ds[tag]
        data = _simple_value(elem.VR, elem.value, encodings)
        if data is not None and (len(data) <= 0xFFFF or elem.VR in EXPLICIT_VR_LENGTH_32):
            add(_header(int(tag), elem.VR, len(data)), data)
        else:
            small.append(encode(elem, encodings))
    parts.append(b"".join(small))
    return parts


def file_bytes(ds: Dataset) -> bytes:
    """:func:`file_parts` joined: the whole file in one ``bytes``."""
    return b"".join(file_parts(ds))
