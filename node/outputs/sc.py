"""Secondary Captures: one model's Grad-CAM overlay (kind ``sc``), or the summary of every model and the
consensus on one image (kind ``summary``), both in RGB: the objects highdicom's ``SCImage`` made, assembled
from encoded parts (:mod:`node.outputs.encoding`).

What identifies the algorithm: DerivationDescription (models, probabilities, thresholds, decisions, the
consensus, checkpoints, software version), DerivationCodeSequence (DCM 130403 "Gradient-weighted class
activation", plus DCM 113085 "Spatial resampling" when the picture does not have the source's geometry),
ContributingEquipmentSequence (each model as Processing Algorithm, 99IHE 1630, and the node as processing
equipment), and ImageComments (the disclaimer and the same facts). Burned In Annotation is NO: the
caption holds model names, numbers and the disclaimer, nothing that identifies the patient.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage

from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult, format_pair
from node.outputs.common import (
    MANUFACTURER,
    MODEL_NAME,
    SOURCE_IMAGE_PURPOSE,
    Placement,
    algorithm_item,
    contributing_equipment,
    equipment_item,
    instance_elements,
    series_elements,
)
from node.outputs.encoding import Encodings, assemble, code_item, element, encode, item, sequence, timestamp
from node.outputs.identity import OutputContext
from node.outputs.source import SourceParts, source_parts

__all__ = ["build_secondary_capture", "derivation_description"]

SC_SOP_CLASS = str(SecondaryCaptureImageStorage)


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
    p, threshold = format_pair(r.probability, r.threshold, 6, threshold_as_set=True)
    return (
        f"{r.model} p={p} {relation} threshold {threshold}: {_decision(r.positive)} "
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


@lru_cache(maxsize=16)
def _picture_elements(version: str, encodings: Encodings) -> tuple[bytes, ...]:
    """What every Secondary Capture says about itself and its pixels."""
    return (
        element(0x00080008, "CS", ["DERIVED", "SECONDARY"]),
        element(0x00080064, "CS", "WSD"),  # made by a workstation (software), not digitised
        element(0x00181016, "LO", MANUFACTURER, encodings),
        element(0x00181018, "LO", MODEL_NAME, encodings),
        element(0x00181019, "LO", version, encodings),
        element(0x00280002, "US", 3),
        element(0x00280004, "CS", "RGB"),
        element(0x00280006, "US", 0),
        element(0x00280100, "US", 8),
        element(0x00280101, "US", 8),
        element(0x00280102, "US", 7),
        element(0x00280103, "US", 0),
        element(0x00280301, "CS", "NO"),  # the caption names models, numbers and the disclaimer: no patient
    )


@lru_cache(maxsize=16)
def _derivation_codes(resampled: bool, encodings: Encodings) -> bytes:
    """DCM 130403 "Gradient-weighted class activation", and "Spatial resampling" when the picture does
    not have the source's geometry."""
    items = [code_item(codes.DCM.GradientWeightedClassActivation, encodings)]
    if resampled:
        items.append(code_item(codes.DCM.SpatialResampling, encodings))
    return sequence(0x00089215, items)


def _source_reference(parts: SourceParts) -> bytes:
    purpose = code_item(SOURCE_IMAGE_PURPOSE, parts.encodings)
    reference = item(
        [
            element(0x00081150, "UI", parts.sop_class_uid),
            element(0x00081155, "UI", parts.sop_instance_uid),
            sequence(0x0040A170, [purpose]),
        ]
    )
    return sequence(0x00082112, [reference])


def _copied_from_source(source: Dataset, encodings: Encodings) -> list[bytes]:
    """Body part and laterality where the source has them; lossy compression where it was lossy (a
    picture drawn on a lossy-compressed image says so, as the standard asks of derived images)."""
    out = [
        encode(source[k], encodings)
        for k in ("BodyPartExamined", "Laterality")
        if k in source and source[k].value
    ]
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        out.append(element(0x00282110, "CS", "01"))
        out.extend(
            encode(source[k], encodings)
            for k in ("LossyImageCompressionRatio", "LossyImageCompressionMethod")
            if k in source
        )
    return out


def _equipment(
    results: Sequence[ModelResult], ctx: OutputContext, what: str, parts: SourceParts, now: datetime.datetime
) -> bytes:
    enc = parts.encodings
    items = [algorithm_item(r.model, ctx.model(r.model).version, ctx.device_uid, enc) for r in results]
    processing = equipment_item(what, ctx.device_uid, ctx.software_version, enc)
    return contributing_equipment(parts, [*items, processing], now)


def build_secondary_capture(
    source: Dataset,
    overlay: np.ndarray,
    analysis: AnalysisResult,
    model: str | None,
    ctx: OutputContext,
    placement: Placement,
    parts: SourceParts | None = None,
) -> Dataset:
    """One Secondary Capture (RGB, explicit VR little endian) of ``overlay`` in the source's study.

    ``model`` names the model whose map ``overlay`` shows; None for the summary of all models. Patient and
    study attributes are the source's; series, SOP Instance UID and Instance Number come from
    ``placement``. ``parts`` is :func:`node.outputs.source.source_parts` of ``source`` when the caller has
    it already. Raises ValueError/TypeError for a bad overlay or source, KeyError for an unknown model.
    """
    pixels = _check_overlay(overlay)
    parts = source_parts(source) if parts is None else parts
    enc = parts.encodings
    results = list(analysis.models.values()) if model is None else [analysis.models[model]]
    what = "Summary of the pneumonia classification" if model is None else f"Grad-CAM heatmap of {model}"
    description = derivation_description(analysis, model, ctx)
    rows, columns = pixels.shape[:2]
    now = datetime.datetime.now()
    date, time, _ = timestamp(now)
    elements = [
        *series_elements(ctx, "sc", SC_SOP_CLASS, "OT", enc),
        *_picture_elements(ctx.software_version, enc),
        *instance_elements(placement, now),
        *parts.patient_study,
        parts.orientation,
        element(0x00181012, "DA", date),  # Date and Time of Secondary Capture
        element(0x00181014, "TM", time),
        element(0x00280010, "US", rows),
        element(0x00280011, "US", columns),
        element(0x00082111, "ST", description[:1024], enc),
        element(0x00204000, "LT", f"{DISCLAIMER}. {description}"[:10240], enc),
        _source_reference(parts),
        _derivation_codes((source.get("Rows"), source.get("Columns")) != (rows, columns), enc),
        *_copied_from_source(source, enc),
        _equipment(results, ctx, what, parts, now),
    ]
    return assemble(
        elements, SC_SOP_CLASS, placement.sop_uid, DataElement(0x7FE00010, "OB", pixels.tobytes())
    )
