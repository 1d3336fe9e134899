"""What every output of one image takes from its source, encoded once per image and shared by all of them.

The outputs file with the source: its patient and study elements are copied verbatim (type 2 ones empty
when the source lacks them), whatever highdicom would have refused in them (a name without ``^``, sex
``X``, a malformed date). The Segmentations and the SR also carry every other attribute of the source's
Patient and Study modules, and the acquisition equipment of the source heads the Contributing Equipment
of every output, as highdicom made them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import lru_cache

import highdicom as hd
from highdicom._standard_utils import (
    does_iod_have_pixel_data,
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.outputs.encoding import Encodings, element, encode, encode_dataset, encodings_of, item

__all__ = ["SourceParts", "source_parts", "PATIENT_STUDY_KEYWORDS", "TYPE2_KEYWORDS"]

# Patient and study attributes copied verbatim from the source, so that a PACS files the outputs with it.
# The first ones are type 2 in every IOD here: present (maybe empty) even when the source lacks them.
TYPE2_KEYWORDS = (
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
PATIENT_STUDY_KEYWORDS = ("StudyInstanceUID", *TYPE2_KEYWORDS, *_OPTIONAL_KEYWORDS)


@dataclass(frozen=True)
class SourceParts:
    """The source's references and its encoded elements that the outputs copy (see the module)."""

    encodings: Encodings
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    patient_study: tuple[bytes, ...]  # every output: PATIENT_STUDY_KEYWORDS and the character set
    modules: tuple[bytes, ...]  # Segmentation and SR: the rest of the Patient and Study modules
    specimen: tuple[bytes, ...]  # Segmentation: the Specimen module, where the source's IOD has one
    acquisition: bytes | None  # an item of Contributing Equipment Sequence, if highdicom made one
    orientation: bytes  # Patient Orientation, empty without one (type 2C without a frame of reference)


def _patient_study(source: Dataset, encodings: Encodings) -> tuple[bytes, ...]:
    out = []
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            out.append(encode(source[keyword], encodings))
        elif keyword in TYPE2_KEYWORDS:
            out.append(_empty(keyword, encodings))
    if "SpecificCharacterSet" in source:
        out.append(element(0x00080005, "CS", source.SpecificCharacterSet, encodings))
    return tuple(out)


def _empty(keyword: str, encodings: Encodings) -> bytes:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return element(tag, dictionary_VR(tag), None, encodings)


# decided by _patient_study, whatever the modules say
_DECIDED = frozenset(tag_for_keyword(k) for k in PATIENT_STUDY_KEYWORDS)


@lru_cache(maxsize=64)
def _module_tags(sop_class_uid: str, ie: str, module: str | None = None) -> tuple[int, ...]:
    """Tags of the root attributes of the ``ie`` modules (or that one module) of the class's IOD, but
    :data:`PATIENT_STUDY_KEYWORDS`: what highdicom's ``SOPClass._copy_root_attributes_of_module`` copies
    and :func:`_patient_study` does not decide, looked up once per class."""
    modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
    attributes = get_module_attribute_map()
    tags = []
    for entry in modules:
        if entry["ie"] != ie or (module is not None and entry["key"] != module):
            continue
        for attribute in attributes[entry["key"]]:
            tag = tag_for_keyword(str(attribute["keyword"]))
            if len(attribute["path"]) == 0 and tag is not None and tag not in _DECIDED:
                tags.append(tag)
    return tuple(tags)


def _patient_study_tags(sop_class_uid: str) -> tuple[int, ...]:
    return _module_tags(sop_class_uid, "Patient") + _module_tags(sop_class_uid, "Study")


def _copied(source: Dataset, tags: tuple[int, ...], encodings: Encodings) -> tuple[bytes, ...]:
    """The source's elements among ``tags``, as they are."""
    return tuple(encode(source[t], encodings) for t in tags if t in source)


@lru_cache(maxsize=64)
def _is_image(sop_class_uid: str) -> bool:
    try:
        return bool(does_iod_have_pixel_data(sop_class_uid))
    except Exception:  # noqa: BLE001 - as highdicom: no acquisition item for an unknown class
        return False


def _acquisition_equipment(source: Dataset) -> hd.ContributingEquipment | None:
    """highdicom's ``ContributingEquipment.for_image_acquisition`` of the source, or None where highdicom
    made none (not an image, no manufacturer, a value it refuses); only the slow check whether the class
    is an image is cached."""
    if not _is_image(str(source.SOPClassUID)):
        return None
    manufacturer = source.get("Manufacturer")
    if manufacturer is None or manufacturer == "":
        return None
    when = source.get("AcquisitionDateTime")
    if when is None:
        date, time = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            when = datetime.datetime.combine(date, time)
    try:
        return hd.ContributingEquipment(
            manufacturer=manufacturer,
            purpose_of_reference=codes.DCM.AcquisitionEquipment,
            manufacturer_model_name=source.get("ManufacturerModelName"),
            software_versions=source.get("SoftwareVersions"),
            device_serial_number=source.get("DeviceSerialNumber"),
            institution_name=source.get("InstitutionName"),
            institutional_department_name=source.get("InstitutionalDepartmentName"),
            institution_address=source.get("InstitutionAddress"),
            station_name=source.get("StationName"),
            contribution_datetime=when,
            contribution_description="Acquisition equipment of the source image(s)",
        )
    except Exception:  # noqa: BLE001 - as highdicom: a value it refuses means no acquisition item
        return None


def _orientation(source: Dataset, encodings: Encodings) -> bytes:
    if "PatientOrientation" in source:
        return encode(source["PatientOrientation"], encodings)
    return element(0x00200020, "CS", None, encodings)


def source_parts(source: Dataset) -> SourceParts:
    """Everything the outputs of ``source`` copy from it, encoded in its character set.

    Raises KeyError for a source whose SOP class highdicom does not know.
    """
    encodings = encodings_of(source)
    sop_class = str(source.SOPClassUID)
    acquisition = _acquisition_equipment(source)
    return SourceParts(
        encodings=encodings,
        study_uid=str(source.StudyInstanceUID),
        series_uid=str(source.SeriesInstanceUID),
        sop_class_uid=sop_class,
        sop_instance_uid=str(source.SOPInstanceUID),
        patient_study=_patient_study(source, encodings),
        modules=_copied(
            source, _module_tags(sop_class, "Patient") + _module_tags(sop_class, "Study"), encodings
        ),
        specimen=_copied(source, _module_tags(sop_class, "Image", "specimen"), encodings),
        acquisition=None if acquisition is None else item(encode_dataset(acquisition, encodings)),
        orientation=_orientation(source, encodings),
    )
