"""Secondary Capture of one model's Grad-CAM overlay on one source image (highdicom ``SCImage``).

What identifies the algorithm: DerivationDescription (model, probability, threshold, decision, builder,
checkpoint SHA-256, software version), DerivationCodeSequence (DCM 130403 "Gradient-weighted class
activation", plus DCM 113085 "Spatial resampling" when the overlay is smaller than the source), the node
as processing equipment in ContributingEquipmentSequence (its ContributionDescription repeats model and
checkpoint), and ImageComments (the disclaimer and the same facts).
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from gradcam.results import DISCLAIMER, ModelResult
from node.config import OutputsConfig
from node.outputs.common import (
    MANUFACTURER,
    MODEL_NAME,
    SOFTWARE_VERSION,
    algorithm_line,
    copy_patient_study,
    lo,
    processing_equipment,
    reference_header,
)
from node.outputs.uids import sc_instance_uid, sc_series_uid

__all__ = ["build_secondary_capture", "derivation_description"]

# highdicom insists on an orientation for patient images; the source's own value (or an empty one,
# allowed for type 2C) replaces it right after construction.
_PLACEHOLDER_ORIENTATION = ("L", "F")


def _code_item(code: object) -> Dataset:
    return hd.sr.CodedConcept.from_code(code)  # type: ignore[arg-type]


def _check_overlay(overlay: np.ndarray) -> np.ndarray:
    arr = np.asarray(overlay)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"overlay: expected an RGB image of shape (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"overlay: expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _decision(result: ModelResult) -> str:
    return "positive" if result.positive else "negative"


def derivation_description(result: ModelResult) -> str:
    """Human-readable derivation of the SC: what was computed, the decision, the algorithm, the disclaimer."""
    return (
        f"Grad-CAM heatmap of {result.model} (p={result.probability:.3f}, threshold {result.threshold:g}, "
        f"{_decision(result)}); {algorithm_line(result)}; {DISCLAIMER}"
    )


def _image_comments(result: ModelResult) -> str:
    return (
        f"{DISCLAIMER}. Pneumonia classification with Grad-CAM heatmap: {result.model} "
        f"probability {result.probability:.6f}, threshold {result.threshold:g}, "
        f"decision {_decision(result)}; {algorithm_line(result)}."
    )


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    return item


def _derivation_codes(source: Dataset, overlay: np.ndarray) -> list[Dataset]:
    items = [_code_item(codes.DCM.GradientWeightedClassActivation)]
    if (source.get("Rows"), source.get("Columns")) != overlay.shape[:2]:
        items.append(_code_item(codes.DCM.SpatialResampling))
    return items


def build_secondary_capture(
    source: Dataset,
    overlay: np.ndarray,
    result: ModelResult,
    outputs: OutputsConfig,
    instance_number: int = 1,
    ref: Dataset | None = None,
) -> Dataset:
    """One Secondary Capture (RGB, explicit VR little endian) of ``overlay`` in the source's study.

    Patient and study attributes are the source's, the series is the study's SC series of this node
    (:func:`node.outputs.uids.sc_series_uid`), the SOP Instance UID is deterministic
    (:func:`node.outputs.uids.sc_instance_uid`). ``ref`` is :func:`node.outputs.common.reference_header`
    of ``source`` when the caller has it already. Raises ValueError/TypeError for a bad overlay or source.
    """
    pixels = _check_overlay(overlay)
    ref = reference_header(source) if ref is None else ref
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=sc_series_uid(str(source.StudyInstanceUID)),
        series_number=outputs.sc_series_number,
        sop_instance_uid=sc_instance_uid(str(source.SOPInstanceUID), result),
        instance_number=max(1, int(instance_number)),
        manufacturer=MANUFACTURER,
        patient_orientation=_PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(f"Grad-CAM heatmap: {algorithm_line(result)}")],
        series_description=lo(outputs.sc_series_description),
        manufacturer_model_name=MODEL_NAME,
        software_versions=SOFTWARE_VERSION,
    )
    copy_patient_study(source, sc)
    if "PatientOrientation" in source:
        sc.add(copy.deepcopy(source["PatientOrientation"]))
    else:
        sc.PatientOrientation = None
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and source[keyword].value:
            sc.add(copy.deepcopy(source[keyword]))
    _describe(sc, source, pixels, result)
    return sc


def _describe(sc: Dataset, source: Dataset, pixels: np.ndarray, result: ModelResult) -> None:
    """Derivation, references, burned-in annotation and the disclaimer."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # caption with model, probability, decision and disclaimer
    sc.ConversionType = "WSD"  # made by a workstation (software), not digitised
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = MODEL_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = SOFTWARE_VERSION
    sc.SourceImageSequence = [_source_reference(source)]
    sc.DerivationDescription = derivation_description(result)[:1024]
    sc.DerivationCodeSequence = _derivation_codes(source, pixels)
    sc.ImageComments = _image_comments(result)
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        # the heatmap is drawn on a lossy-compressed image: say so, as the standard asks of derived images
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc.add(copy.deepcopy(source[keyword]))
