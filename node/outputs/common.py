"""What every output shares: the node's identity, loop protection, the series and instance elements, and
the Contributing Equipment Sequence (the source's acquisition, the models, the node, highdicom)."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gradcam.results import DISCLAIMER
from node.outputs.encoding import Encodings, element, encode_dataset, item, sequence, timestamp
from node.outputs.source import SourceParts

if TYPE_CHECKING:
    from node.outputs.identity import OutputContext

__all__ = [
    "Placement",
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "DISCLAIMER",
    "is_own_output",
    "processing_equipment",
    "processing_algorithm",
    "PROCESSING_ALGORITHM",
    "SOURCE_IMAGE_PURPOSE",
    "lo",
    "series_elements",
    "instance_elements",
    "algorithm_item",
    "equipment_item",
    "contributing_equipment",
]


@dataclass(frozen=True)
class Placement:
    """Where an output goes: its series, its SOP Instance UID, and its number within the series."""

    series_uid: str
    sop_uid: str
    instance_number: int

    def __post_init__(self) -> None:
        if self.instance_number < 1:
            raise ValueError(f"instance_number: expected >= 1, got {self.instance_number}")


MANUFACTURER = "gradcam-node"
MODEL_NAME = "gradcam-node pneumonia Grad-CAM"  # ManufacturerModelName of every output


def _version() -> str:
    try:
        return metadata.version("gradcam-node")
    except metadata.PackageNotFoundError:
        return "0.1.0"


SOFTWARE_VERSION = _version()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def is_own_output(ds: Dataset) -> bool:
    """True for anything this node made (loop protection that does not rely on the PACS).

    Any one marker suffices: Manufacturer or Manufacturer's Model Name of the node, or the node listed as
    processing equipment in the Contributing Equipment Sequence (kept by tools that derive from an output).
    """
    if _text(ds, "Manufacturer").lower() == MANUFACTURER or _text(ds, "ManufacturerModelName") == MODEL_NAME:
        return True
    return any(
        _text(item, "Manufacturer").lower() == MANUFACTURER
        for item in ds.get("ContributingEquipmentSequence", None) or []
    )


def lo(text: str) -> str:
    """``text`` cut to the 64 characters of a LO element (configured descriptions may be longer)."""
    return text.strip()[:64]


# IHE Radiology AI Results: the algorithm that made an output, in its Contributing Equipment Sequence.
PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")
# Purpose of Reference of the source image that a picture or map is derived from
SOURCE_IMAGE_PURPOSE = codes.DCM.SourceImageForImageProcessingOperation


def _contribution(description: str) -> str:
    return f"{description[: 1024 - len(DISCLAIMER) - 2]}; {DISCLAIMER}"


def processing_equipment(
    description: str, device_uid: str | None = None, software_version: str = SOFTWARE_VERSION
) -> hd.ContributingEquipment:
    """The node as processing equipment of an output (Contributing Equipment Sequence item).

    ``device_uid`` (the installation's, see :func:`node.db.device.device_uid`) is its Device Serial Number:
    the item has no Device UID attribute in the IODs dciodvfy knows.
    """
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_version,
        contribution_description=_contribution(description),
    )
    if device_uid:
        item.DeviceSerialNumber = device_uid
    return item


def processing_algorithm(model: str, version: str, device_uid: str | None = None) -> hd.ContributingEquipment:
    """One model as the processing algorithm of an output (IHE AIR: purpose 99IHE 1630).

    highdicom accepts only DCM purposes of reference, so the item is made as processing equipment and its
    purpose is set afterwards.
    """
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=lo(model),
        software_versions=lo(version),
        contribution_description=_contribution(
            f"pneumonia classification with Grad-CAM by {model} ({version})"
        ),
    )
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    if device_uid:
        item.DeviceSerialNumber = device_uid
    return item


# --- encoded parts -------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def algorithm_item(model: str, version: str, device_uid: str, encodings: Encodings) -> bytes:
    """:func:`processing_algorithm`, encoded (a Contributing Equipment Sequence item)."""
    return item(encode_dataset(processing_algorithm(model, version, device_uid), encodings))


@lru_cache(maxsize=256)
def equipment_item(description: str, device_uid: str, software_version: str, encodings: Encodings) -> bytes:
    """:func:`processing_equipment`, encoded (a Contributing Equipment Sequence item)."""
    return item(encode_dataset(processing_equipment(description, device_uid, software_version), encodings))


@lru_cache(maxsize=16)
def _highdicom_elements(encodings: Encodings) -> tuple[bytes, ...]:
    equipment = hd.ContributingEquipment.for_highdicom()
    del equipment.ContributionDateTime  # the one value that changes: added per output
    return tuple(encode_dataset(equipment, encodings))


def contributing_equipment(source: SourceParts, items: Iterable[bytes], now: datetime.datetime) -> bytes:
    """The Contributing Equipment Sequence as highdicom made it: the source's acquisition equipment (where
    it has one), ``items`` (the models and the node), and highdicom itself, contributing at ``now``."""
    made_by = item([*_highdicom_elements(source.encodings), element(0x0018A002, "DT", timestamp(now)[2])])
    acquisition = [] if source.acquisition is None else [source.acquisition]
    return sequence(0x0018A001, [*acquisition, *items, made_by])


def series_elements(
    ctx: OutputContext, kind: str, sop_class_uid: str, modality: str, encodings: Encodings
) -> tuple[bytes, ...]:
    """The elements of a ``kind`` output (``sc``, ``heatmap``, ``sr``) that the configuration decides:
    class and modality, its series (``[outputs] <kind>_series_number`` and ``_description``), the node as
    equipment."""
    number = getattr(ctx.outputs, f"{kind}_series_number")
    description = lo(getattr(ctx.outputs, f"{kind}_series_description"))
    return _series_elements(
        sop_class_uid, modality, number, description, ctx.device_uid, ctx.software_version, encodings
    )


@lru_cache(maxsize=64)
def _series_elements(
    sop_class_uid: str,
    modality: str,
    series_number: int,
    series_description: str,
    device_uid: str,
    software_version: str,
    encodings: Encodings,
) -> tuple[bytes, ...]:
    return (
        element(0x00080016, "UI", sop_class_uid),
        element(0x00080060, "CS", modality),
        element(0x00080070, "LO", MANUFACTURER, encodings),
        element(0x0008103E, "LO", series_description, encodings),
        element(0x00081090, "LO", MODEL_NAME, encodings),
        element(0x00181000, "LO", device_uid, encodings),
        element(0x00181020, "LO", software_version, encodings),
        element(0x00200011, "IS", series_number),
    )


def instance_elements(placement: Placement, now: datetime.datetime) -> list[bytes]:
    """The elements of one output instance: its UIDs and number, and when it was made (creation and
    content date and time, as highdicom set them)."""
    date, time, _ = timestamp(now)
    return [
        element(0x00080012, "DA", date),
        element(0x00080013, "TM", time),
        element(0x00080018, "UI", placement.sop_uid),
        element(0x00080023, "DA", date),
        element(0x00080033, "TM", time),
        element(0x0020000E, "UI", placement.series_uid),
        element(0x00200013, "IS", str(placement.instance_number)),
    ]
