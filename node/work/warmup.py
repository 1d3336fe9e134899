"""A tiny built-in DX image for warming up the output builders at start (no patient, no phantom)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from gradcam.eligibility import DX_FOR_PRESENTATION
from node.outputs.uids import derive_uid

__all__ = ["warm_up_source"]

_SIZE = 64


def warm_up_source() -> Dataset:
    """A 64 x 64 DX (For Presentation) with a smooth gradient, fixed UIDs and an empty patient."""
    rows = np.linspace(0, 4095, _SIZE, dtype=np.float32)
    pixels = (np.add.outer(rows, rows) / 2).astype(np.uint16)
    ds = Dataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = derive_uid("gradcam-node", "warm-up", "image")
    ds.StudyInstanceUID = derive_uid("gradcam-node", "warm-up", "study")
    ds.SeriesInstanceUID = derive_uid("gradcam-node", "warm-up", "series")
    ds.Modality = "DX"
    ds.PatientName = "WARM^UP"
    ds.PatientID = "WARM-UP"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = "20000101"
    ds.StudyTime = "000000"
    ds.AccessionNumber = ""
    ds.StudyID = ""
    ds.ReferringPhysicianName = ""
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = _SIZE
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds
