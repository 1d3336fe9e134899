"""Secondary Captures: one model's Grad-CAM overlay (kind ``sc``), or the summary of every model and the
consensus on one image (kind ``summary``), both highdicom ``SCImage`` in RGB.

What identifies the algorithm: DerivationDescription (models, probabilities, thresholds, decisions, the
consensus, checkpoints, software version), DerivationCodeSequence (DCM 130403 "Gradient-weighted class
activation", plus DCM 113085 "Spatial resampling" when the picture does not have the source's geometry),
ContributingEquipmentSequence (each model as Processing Algorithm, 99IHE 1630, and the node as processing
equipment), and ImageComments (the disclaimer and the same facts). Burned In Annotation is NO: the
caption holds model names, numbers and the disclaimer, nothing that identifies the patient.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult
from node.outputs.common import (
    MANUFACTURER,
    MODEL_NAME,
    Placement,
    copy_patient_orientation,
    copy_patient_study,
    lo,
    processing_algorithm,
    processing_equipment,
    reference_header,
)
from node.outputs.identity import OutputContext

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


def _decision(positive: bool) -> str:
    return "positive" if positive else "negative"


def _finding(r: ModelResult, ctx: OutputContext) -> str:
    relation = ">=" if r.positive else "<"
    return (
        f"{r.model} p={r.probability:.6f} {relation} threshold {r.threshold:g}: {_decision(r.positive)} "
        f"(checkpoint {ctx.model(r.model).version})"
    )


def _consensus(analysis: AnalysisResult) -> str:
    n = len(analysis.models)
    k = sum(1 for r in analysis.models.values() if r.positive)
    return f"consensus of {n} models by majority vote: {_decision(analysis.consensus)} ({k} of {n} positive)"


def derivation_description(analysis: AnalysisResult, model: str | None, ctx: OutputContext) -> str:
    """What the picture shows (one model's map, or the summary), the decisions, the consensus, the
    algorithm and the disclaimer, in one line."""
    if model is not None:
        what = f"Grad-CAM heatmap of {_finding(analysis.models[model], ctx)}"
    else:
        what = "Summary of " + "; ".join(_finding(r, ctx) for r in analysis.models.values())
    return f"{what}; {_consensus(analysis)}; {MANUFACTURER} {ctx.software_version}; {DISCLAIMER}"


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


def _equipment(
    results: Sequence[ModelResult], ctx: OutputContext, what: str
) -> list[hd.ContributingEquipment]:
    items = [processing_algorithm(r.model, ctx.model(r.model).version, ctx.device_uid) for r in results]
    return [*items, processing_equipment(what, ctx.device_uid, ctx.software_version)]


def build_secondary_capture(
    source: Dataset,
    overlay: np.ndarray,
    analysis: AnalysisResult,
    model: str | None,
    ctx: OutputContext,
    placement: Placement,
    ref: Dataset | None = None,
) -> Dataset:
    """One Secondary Capture (RGB, explicit VR little endian) of ``overlay`` in the source's study.

    ``model`` names the model whose map ``overlay`` shows; None for the summary of all models. Patient and
    study attributes are the source's; series, SOP Instance UID and Instance Number come from
    ``placement``. ``ref`` is :func:`node.outputs.common.reference_header` of ``source`` when the caller has
    it already. Raises ValueError/TypeError for a bad overlay or source, KeyError for an unknown model.
    """
    pixels = _check_overlay(overlay)
    ref = reference_header(source) if ref is None else ref
    results = list(analysis.models.values()) if model is None else [analysis.models[model]]
    what = "Summary of the pneumonia classification" if model is None else f"Grad-CAM heatmap of {model}"
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=placement.series_uid,
        series_number=ctx.outputs.sc_series_number,
        sop_instance_uid=placement.sop_uid,
        instance_number=placement.instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=_PLACEHOLDER_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=_equipment(results, ctx, what),
        series_description=lo(ctx.outputs.sc_series_description),
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
    )
    copy_patient_study(source, sc)
    copy_patient_orientation(source, sc)
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and source[keyword].value:
            sc.add(copy.deepcopy(source[keyword]))
    sc.DeviceSerialNumber = ctx.device_uid
    description = derivation_description(analysis, model, ctx)
    _describe(sc, source, pixels, description, ctx.software_version)
    return sc


def _describe(sc: Dataset, source: Dataset, pixels: np.ndarray, description: str, version: str) -> None:
    """Derivation, references, burned-in annotation and the disclaimer."""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"  # the caption names models, numbers and the disclaimer: no patient
    sc.ConversionType = "WSD"  # made by a workstation (software), not digitised
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = MODEL_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = version
    sc.SourceImageSequence = [_source_reference(source)]
    sc.DerivationDescription = description[:1024]
    sc.DerivationCodeSequence = _derivation_codes(source, pixels)
    sc.ImageComments = f"{DISCLAIMER}. {description}"[:10240]
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        # the heatmap is drawn on a lossy-compressed image: say so, as the standard asks of derived images
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc.add(copy.deepcopy(source[keyword]))
