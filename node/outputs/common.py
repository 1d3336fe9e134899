"""What the Secondary Captures and the SR share: the node's identity, loop protection, and copying the
patient and study of the source image."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from importlib import metadata

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from gradcam.results import DISCLAIMER

__all__ = [
    "Placement",
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "DISCLAIMER",
    "PATIENT_STUDY_KEYWORDS",
    "is_own_output",
    "reference_header",
    "copy_patient_study",
    "copy_patient_orientation",
    "processing_equipment",
    "processing_algorithm",
    "PROCESSING_ALGORITHM",
    "lo",
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

# Patient and study attributes copied verbatim from the source, so that a PACS files the outputs with it.
# The first ones are type 2 in every IOD here: present (maybe empty) even when the source lacks them.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
_OPTIONAL_KEYWORDS = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
    "IssuerOfAccessionNumberSequence",
)
PATIENT_STUDY_KEYWORDS = ("StudyInstanceUID", *_TYPE2_KEYWORDS, *_OPTIONAL_KEYWORDS)


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


def _valid_or_none(value: object, kind: type) -> object:
    if value is None or str(value).strip() == "":
        return None
    try:
        return kind(str(value).strip())
    except (ValueError, TypeError, OverflowError):
        return None


def reference_header(source: Dataset) -> Dataset:
    """The source's header without pixel data, with values highdicom validates made acceptable.

    highdicom refuses some values that real images carry (a name without ``^``, sex ``X``, a malformed
    date); outputs must still be made, so this copy is what highdicom sees, and :func:`copy_patient_study`
    then puts the source's exact elements back into the output.
    """
    ref = Dataset()
    for element in source:
        if element.keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            continue
        ref.add(copy.deepcopy(element))
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in ref or ref[keyword].value is None:
            setattr(ref, keyword, "")
    name = _text(ref, "PatientName")
    if name and "^" not in name:
        ref.PatientName = name + "^"
    ref.ReferringPhysicianName = ""  # only copied back verbatim; highdicom's name check is irrelevant here
    if _text(ref, "PatientSex").upper() not in ("M", "F", "O", ""):
        ref.PatientSex = ""
    ref.PatientBirthDate = _valid_or_none(ref.PatientBirthDate, DA) or ""
    ref.StudyDate = _valid_or_none(ref.StudyDate, DA) or ""
    ref.StudyTime = _valid_or_none(ref.StudyTime, TM) or ""
    if "SpecificCharacterSet" in source:
        ref.SpecificCharacterSet = source.SpecificCharacterSet
    return ref


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Put the source's patient and study elements into ``target`` unchanged (type 2 ones empty if absent)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            target.add(copy.deepcopy(source[keyword]))
        elif keyword in _TYPE2_KEYWORDS:
            setattr(target, keyword, None)
        elif keyword in target:
            del target[keyword]
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def copy_patient_orientation(source: Dataset, target: Dataset) -> None:
    """The source's Patient Orientation, or an empty one (type 2C in the General Image module when there
    is no frame of reference, as on projection radiographs)."""
    if "PatientOrientation" in source:
        target.add(copy.deepcopy(source["PatientOrientation"]))
    else:
        target.PatientOrientation = None


def lo(text: str) -> str:
    """``text`` cut to the 64 characters of a LO element (configured descriptions may be longer)."""
    return text.strip()[:64]


# IHE Radiology AI Results: the algorithm that made an output, in its Contributing Equipment Sequence.
PROCESSING_ALGORITHM = Code("1630", "99IHE", "Processing Algorithm")


def _contribution(description: str) -> str:
    return f"{description[: 1024 - len(DISCLAIMER) - 2]}; {DISCLAIMER}"


def processing_equipment(
    description: str, device_uid: str | None = None, software_version: str = SOFTWARE_VERSION
) -> hd.ContributingEquipment:
    """The node as processing equipment of an output (Contributing Equipment Sequence item).

    ``device_uid`` (the installation's, see :func:`node.work.results.device_uid`) is its Device Serial Number:
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
