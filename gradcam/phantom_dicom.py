"""Phantoms as DICOM: realistic DX/CR headers, synthetic identities only."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from gradcam.eligibility import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from gradcam.phantoms import Phantom, phantom_uid

__all__ = ["phantom_dataset", "header_variant", "write_dicom", "DX_FOR_PRESENTATION", "CR_IMAGE"]

CR_IMAGE = CR_IMAGE_STORAGE
_BASE_DATE = dt.date(2025, 1, 6)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def phantom_dataset(
    ph: Phantom,
    seed: int,
    index: int,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
) -> Dataset:
    """A complete DX (For Presentation) or CR dataset, file meta included, for one phantom.

    ``body_part`` or ``view`` None leaves the attribute out (for CR that breaks the IOD's type 2 rules on
    purpose: inputs with missing attributes). MONOCHROME1 stores inverted values, so the displayed image is
    the same.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality: DX or CR, got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric: MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 < bits_stored <= 16:
        raise ValueError(f"bits_stored: 9 to 16, got {bits_stored}")
    top = (1 << bits_stored) - 1
    values = np.round(ph.image * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        values = (top - values).astype(np.uint16)
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    date = (_BASE_DATE + dt.timedelta(days=(seed * 7919 + index) % 600)).strftime("%Y%m%d")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = phantom_uid(seed, index, f"instance-{modality}-{photometric}-{bits_stored}-{view}")
    ds.StudyInstanceUID = study_uid or phantom_uid(seed, index, "study")
    ds.SeriesInstanceUID = phantom_uid(seed, index, f"series-{ds.StudyInstanceUID}-{modality}")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "093000"
    ds.AccessionNumber = f"PH{seed % 10000:04d}{index:06d}"
    ds.Modality = modality
    ds.Manufacturer = "Synthetic Phantom"
    ds.InstitutionName = "Phantom Institute"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic chest phantom"
    ds.SeriesDescription = f"Chest {view or ''}".strip()
    ds.ManufacturerModelName = "gradcam-node phantoms"
    ds.PatientName = f"PHANTOM^{seed}-{index:05d}"
    ds.PatientID = f"PH-{seed}-{index}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "055Y"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.DeviceSerialNumber = "PHANTOM-1"
    ds.SoftwareVersions = "1"
    ds.StudyID = f"{index % 100000}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    if view is not None:
        ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    # The window spans the stored range (PS3.3 C.11.2.1.2.1, LINEAR: 0 -> 0.0, top -> 1.0), so that the
    # displayed image is the phantom, as in the PNG of the same phantom: the demo models were trained on
    # the PNGs, and a narrower window (it was the 1st to 99th percentile) showed them a different contrast
    # on DICOM (7 of 40 consensus decisions differed between the PNG and the DICOM of one phantom).
    ds.WindowCenter = f"{(top + 1) / 2:.1f}"
    ds.WindowWidth = f"{top + 1:.1f}"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    spacing = f"{430.0 / values.shape[1]:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    if modality == "DX":
        _dx_modules(ds, view, photometric)
    ds.PixelData = values.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _dx_modules(ds: Dataset, view: str | None, photometric: str) -> None:
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.PixelIntensityRelationship = "LOG"
    # +1: higher values = more X-ray intensity (less attenuation), i.e. MONOCHROME1 as stored here.
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
    ds.ImageLaterality = "U"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "NONE"
    ds.PatientPosition = ""  # type 2: unknown for a phantom
    ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
    if view == "PA":
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
    elif view == "AP":
        ds.ViewCodeSequence = [_code("399182009", "SCT", "antero-posterior")]
    ds.AcquisitionContextSequence = []


def header_variant(seed: int, index: int) -> dict[str, object]:
    """The header choices of image ``index`` in a generated data set: DX or CR (half each), a quarter
    MONOCHROME1, 12 to 16 bits stored, PA or AP."""
    rng = np.random.default_rng([seed, index, 3])
    return {
        "modality": "DX" if rng.random() < 0.5 else "CR",
        "photometric": "MONOCHROME1" if rng.random() < 0.25 else "MONOCHROME2",
        "bits_stored": int(rng.integers(12, 17)),
        "view": "PA" if rng.random() < 0.8 else "AP",
    }


def write_dicom(ds: Dataset, path: Path) -> None:
    """Write a dataset as a DICOM file (with preamble and file meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
