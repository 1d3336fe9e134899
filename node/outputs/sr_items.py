"""SR content items (PS3.3 C.17.3), encoded exactly as highdicom's content item classes make them.

Each function gives one encoded sequence item (see :mod:`node.outputs.encoding`); :func:`content` makes a
Content Sequence of them. The report's constant items are made once per configuration
(:mod:`node.outputs.sr`); these functions cost a few element encodings each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from pydicom.sr.coding import Code
from pydicom.valuerep import DS

from node.outputs.encoding import Encodings, code_item, element, item, sequence

__all__ = [
    "CONTAINS",
    "HAS_OBS_CONTEXT",
    "HAS_CONCEPT_MOD",
    "HAS_ACQ_CONTEXT",
    "SELECTED_FROM",
    "content",
    "container_elements",
    "container",
    "code",
    "text",
    "uidref",
    "num",
    "image",
    "scoord",
]

CONTAINS = "CONTAINS"
HAS_OBS_CONTEXT = "HAS OBS CONTEXT"
HAS_CONCEPT_MOD = "HAS CONCEPT MOD"
HAS_ACQ_CONTEXT = "HAS ACQ CONTEXT"
SELECTED_FROM = "SELECTED FROM"


def _code_key(code: Code) -> tuple[str, str, str, str | None]:
    # caches are keyed by the strings: Code's equality ignores the meaning
    return code.value, code.scheme_designator, code.meaning, code.scheme_version


@lru_cache(maxsize=1024)
def _head(
    relationship: str | None, value_type: str, name: tuple[str, str, str, str | None], encodings: Encodings
) -> tuple[bytes, ...]:
    """Relationship Type (where given), Value Type and Concept Name Code Sequence."""
    out = [
        element(0x0040A040, "CS", value_type),
        sequence(0x0040A043, [code_item(Code(*name), encodings)]),
    ]
    if relationship is not None:
        out.append(element(0x0040A010, "CS", relationship))
    return tuple(out)


def _item(
    relationship: str | None, value_type: str, name: Code, encodings: Encodings, *elements: bytes
) -> bytes:
    return item([*_head(relationship, value_type, _code_key(name), encodings), *elements])


def content(items: Iterable[bytes]) -> bytes:
    """The Content Sequence of ``items``."""
    return sequence(0x0040A730, items)


@lru_cache(maxsize=64)
def _template(template_id: str) -> bytes:
    return sequence(
        0x0040A504, [item([element(0x00080105, "CS", "DCMR"), element(0x0040DB00, "CS", template_id)])]
    )


def container_elements(
    relationship: str | None,
    name: Code,
    children: Sequence[bytes],
    encodings: Encodings,
    template_id: str | None = None,
) -> list[bytes]:
    """A CONTAINER's elements (continuous content, its template if given); the report's root is made of
    them at the top level of the document."""
    out = [
        *_head(relationship, "CONTAINER", _code_key(name), encodings),
        element(0x0040A050, "CS", "CONTINUOUS"),
    ]
    if template_id is not None:
        out.append(_template(template_id))
    out.append(content(children))
    return out


def container(
    relationship: str | None,
    name: Code,
    children: Sequence[bytes],
    encodings: Encodings,
    template_id: str | None = None,
) -> bytes:
    """A CONTAINER item holding ``children``."""
    return item(container_elements(relationship, name, children, encodings, template_id))


def code(relationship: str, name: Code, value: Code, encodings: Encodings) -> bytes:
    """A CODE item."""
    return _item(relationship, "CODE", name, encodings, sequence(0x0040A168, [code_item(value, encodings)]))


def text(relationship: str, name: Code, value: str, encodings: Encodings) -> bytes:
    """A TEXT item."""
    return _item(relationship, "TEXT", name, encodings, element(0x0040A160, "UT", str(value), encodings))


def uidref(relationship: str, name: Code, uid: str, encodings: Encodings) -> bytes:
    """A UIDREF item."""
    return _item(relationship, "UIDREF", name, encodings, element(0x0040A124, "UI", uid))


def num(relationship: str, name: Code, value: float, unit: Code, encodings: Encodings) -> bytes:
    """A NUM item: the value as DS (auto-formatted) and, for a float, as FD too."""
    ds = DS(value, auto_format=True)
    measured = [
        sequence(0x004008EA, [code_item(unit, encodings)]),
        element(0x0040A30A, "DS", getattr(ds, "original_string", str(ds))),  # what pydicom writes for it
    ]
    if isinstance(value, float):
        measured.append(element(0x0040A161, "FD", value))
    return _item(relationship, "NUM", name, encodings, sequence(0x0040A300, [item(measured)]))


def image(
    relationship: str,
    name: Code,
    sop_class_uid: str,
    sop_instance_uid: str,
    encodings: Encodings,
    segment_numbers: Sequence[int] | None = None,
    children: Sequence[bytes] | None = None,
) -> bytes:
    """An IMAGE item referencing one instance (and some of its segments), with ``children`` if given."""
    reference = [
        element(0x00081150, "UI", str(sop_class_uid)),
        element(0x00081155, "UI", str(sop_instance_uid)),
    ]
    if segment_numbers is not None:
        reference.append(element(0x0062000B, "US", list(segment_numbers)))
    elements = [sequence(0x00081199, [item(reference)])]
    if children is not None:
        elements.append(content(children))
    return _item(relationship, "IMAGE", name, encodings, *elements)


def scoord(
    relationship: str,
    name: Code,
    graphic_type: str,
    points: np.ndarray,
    children: Sequence[bytes],
    encodings: Encodings,
) -> bytes:
    """A SCOORD item: ``points`` (column, row) flattened into Graphic Data, on the image of ``children``."""
    return _item(
        relationship,
        "SCOORD",
        name,
        encodings,
        element(0x00700022, "FL", np.asarray(points).flatten().tolist()),
        element(0x00700023, "CS", graphic_type),
        content(children),
    )
