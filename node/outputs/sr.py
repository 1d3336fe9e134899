"""The findings of all models on one image as a Comprehensive 3D SR with a TID 1500 Measurement Report,
following IHE Radiology AI Results: every finding tied to the source image, each map and picture of the
result referenced, the regions a viewer can draw as SCOORDs, each algorithm identified by its checkpoint.

Content tree (coded concepts in brackets)::

    Imaging Measurement Report (DCM 126000)
      Language, Observer Type = Device (DCM 121007) + the node as device observer (TID 1004), with the
        installation's device UID
      Procedure Reported = Plain chest X-ray (SCT 399208008)
      Image Library: the source image
      Imaging Measurements (DCM 126010)
        per model with a positive decision, a Planar ROI group (TID 1410):
          Tracking Identifier "Pneumonia classification: <model>", Tracking UID (per source and model)
          Image Region (SCOORD POLYLINE, closed) on the source image: the outline of the map's hot region
            (CAM >= 0.5 x its maximum, around the peak)
          Finding Category = Finding (SCT 404684003); Finding (DCM 121071) = Pneumonia (SCT 233604007)
          Finding Site (SCT 363698007) = Lung (SCT 39607008)
          Algorithm Identification (TID 4019): name = model, version = "sha256:<first 12 hex digits of the
            checkpoint>", family = Artificial Intelligence (DCM 123110), parameters "builder=...",
            "checkpoint_sha256=...", "input_size=..."
          Probability (DCM 122157) = p, unit "no units" (UCUM 1), full precision (FD and DS)
          Threshold Value (DCM 122411) = t, unit "no units" (UCUM 1)
          Pneumonia (SCT 233604007) = Present (SCT 52101004)
          Referenced Segment (DCM 121191): the model's heatmap Segmentation, segment 1
          Illustration of ROI (DCM 121200): the model's Secondary Capture
        per model with a negative decision, a Measurement Group (TID 1501): the same without a region,
          Pneumonia = Absent (SCT 272519000), Source = the source image, and references to a map and a
          picture only where "evidence for normal" maps are switched on
        one Measurement Group "Pneumonia consensus (majority vote)": the same finding and evaluation, the
          majority vote (a tie counts as positive) as algorithm, the models as its parameter
      Comment (DCM 121106): "AI research output - not for diagnostic use. ..."

The Current Requested Procedure Evidence lists the source and every object of the result (summary, SCs,
heatmaps). An SR that replaces an earlier analysis of the same image lists that SR in its Predecessor
Documents Sequence.

Present/Absent are DICOM CID 241 "Present-Absent Only", whose Absent is SCT 272519000 (not 2667000).
The concept name of the evaluation is the finding itself, as IHE AI Results does for binary findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult
from node.outputs.common import (
    MANUFACTURER,
    MODEL_NAME,
    Placement,
    copy_patient_study,
    lo,
    processing_algorithm,
    processing_equipment,
    reference_header,
)
from node.outputs.identity import OutputContext
from node.outputs.region import hot_region
from node.outputs.uids import tracking_uid

__all__ = [
    "build_sr",
    "sr_content",
    "sr_document_arguments",
    "evidence_header",
    "Evidence",
    "CONSENSUS_TRACKING_ID",
    "MODEL_TRACKING_PREFIX",
]

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
FINDING = Code("404684003", "SCT", "Finding")
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000 (CID 241)
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = codes.DCM.Probability  # 122157
THRESHOLD = codes.DCM.ThresholdValue  # 122411
NO_UNITS = codes.UCUM.NoUnits  # "1"
COMMENT = codes.DCM.Comment  # 121106
REFERENCED_SEGMENT = codes.DCM.ReferencedSegment  # 121191
ILLUSTRATION = codes.DCM.IllustrationOfROI  # 121200

MODEL_TRACKING_PREFIX = "Pneumonia classification: "
CONSENSUS_TRACKING_ID = "Pneumonia consensus (majority vote)"
CONSENSUS_ALGORITHM = "gradcam-node majority vote"


@dataclass(frozen=True)
class Evidence:
    """An object of the result that the SR references: ``kind`` ``summary``, ``sc`` or ``heatmap``."""

    kind: str
    model: str | None
    dataset: Dataset


# --- building ----------------------------------------------------------------------------------------


def _presence(positive: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if positive else ABSENT)


def _finding_sites() -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)]


# How each kind of the model's objects is referenced from its group: concept, and the segment (if any).
_REFERENCE_OF_KIND = {"heatmap": (REFERENCED_SEGMENT, [1]), "sc": (ILLUSTRATION, None)}


def _reference_items(model: str, evidence: Sequence[Evidence]) -> list[hd.sr.ImageContentItem]:
    """The model's heatmap (as a segment) and picture, as IMAGE items of its group."""
    items = []
    for e in evidence:
        if e.model != model or e.kind not in _REFERENCE_OF_KIND:
            continue
        concept, segments = _REFERENCE_OF_KIND[e.kind]
        items.append(
            hd.sr.ImageContentItem(
                name=concept,
                referenced_sop_class_uid=e.dataset.SOPClassUID,
                referenced_sop_instance_uid=e.dataset.SOPInstanceUID,
                referenced_segment_numbers=segments,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return items


def _model_group(
    ref: Dataset, result: ModelResult, ctx: OutputContext, evidence: Sequence[Evidence]
) -> hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    identity = ctx.model(result.model)
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model,
        version=identity.version,
        parameters=[
            f"builder={result.builder}",
            f"checkpoint_sha256={result.checkpoint_sha256}",
            f"input_size={identity.input_size}",
        ],
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(str(ref.SOPInstanceUID), result.model),
            identifier=f"{MODEL_TRACKING_PREFIX}{result.model}",
        ),
        "finding_type": PNEUMONIA,
        "finding_category": FINDING,
        "finding_sites": _finding_sites(),
        "algorithm_id": algorithm,
        "measurements": [
            hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=float(result.threshold), unit=NO_UNITS),
        ],
        "qualitative_evaluations": [_presence(bool(result.positive))],
    }
    group: hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    if result.positive:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=hot_region(result.cam, result.cam_peak),
            source_image=hd.sr.SourceImageForRegion.from_source_image(ref),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)], **common
        )
    group[0].ContentSequence.extend(_reference_items(result.model, evidence))  # TID 1500 is extensible
    return group


def _consensus_group(
    ref: Dataset, results: Sequence[ModelResult], consensus: bool, version: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(
        name=CONSENSUS_ALGORITHM,
        version=version,
        parameters=[
            "models=" + ",".join(r.model for r in results),
            "rule=majority of the model decisions; a tie counts as positive",
        ],
        manufacturer=MANUFACTURER,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(str(ref.SOPInstanceUID), "consensus"), identifier=CONSENSUS_TRACKING_ID
        ),
        finding_type=PNEUMONIA,
        finding_category=FINDING,
        finding_sites=_finding_sites(),
        algorithm_id=algorithm,
        qualitative_evaluations=[_presence(bool(consensus))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )


def _observation_context(device_uid: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _comment(results: Sequence[ModelResult], consensus: bool) -> hd.sr.TextContentItem:
    votes = ", ".join(
        f"{r.model} {'positive' if r.positive else 'negative'} (p={r.probability:.6f} "
        f"{'>=' if r.positive else '<'} threshold {r.threshold:g})"
        for r in results
    )
    text = (
        f"{DISCLAIMER}. Pneumonia classification of a chest radiograph by {len(results)} model(s) "
        f"({votes}); consensus by majority vote: {'positive' if consensus else 'negative'}. Maps are "
        "Grad-CAM saliency relative to their maximum, not a probability per pixel."
    )
    return hd.sr.TextContentItem(
        name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _has_projection_geometry(ref: Dataset) -> bool:
    orientation = ref.get("PatientOrientation", None)
    spacing = ref.get("ImagerPixelSpacing", None)
    if orientation is None or spacing is None or isinstance(orientation, str) or isinstance(spacing, str):
        return False  # absent, or one value only (pydicom gives a single value unwrapped)
    try:
        return (
            len(orientation) == 2
            and all(str(v).strip() for v in orientation)
            and len(spacing) == 2
            and all(float(v) > 0 for v in spacing)
        )
    except (TypeError, ValueError):
        return False


def _library_entry(ref: Dataset) -> Dataset:
    """The source as highdicom's image library should see it.

    highdicom adds the projection-radiography descriptors (TID 1603) for CR/DX and then needs Patient
    Orientation and Imager Pixel Spacing, which CR images may lack: without both, the entry keeps the
    general descriptors (TID 1602) only, instead of failing.
    """
    if _has_projection_geometry(ref):
        return ref
    entry = Dataset()
    entry.update(ref)
    entry.Modality = "OT"  # only decides which descriptors are made; the coded modality comes from the class
    return entry


def _evidence_stand_in(root: Dataset, ref: Dataset) -> Dataset:
    """The report's root container holding only a reference to the source image.

    :class:`highdicom.sr.Comprehensive3DSR` deep-copies the content tree it is given and searches all of
    it for referenced instances; that was most of the time the node spent per image. Every object the
    content references is passed as evidence anyway, so the document is made from this stand-in, which
    yields the same evidence, and the real content sequence is set right after
    (``test_sr_equals_the_plain_highdicom_document`` checks the two agree element for element).
    """
    stand_in = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            stand_in.add(element)
    stand_in.ContentSequence = [
        hd.sr.ImageContentItem(
            name=codes.DCM.SourceImageForImageProcessingOperation,
            referenced_sop_class_uid=ref.SOPClassUID,
            referenced_sop_instance_uid=ref.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    return stand_in


def sr_content(
    ref: Dataset, analysis: AnalysisResult, ctx: OutputContext, evidence: Sequence[Evidence] = ()
) -> hd.sr.ContainerContentItem:
    """The TID 1500 content tree (root container) of the report on one image."""
    results = list(analysis.models.values())
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ]
    groups = [_model_group(ref, r, ctx, evidence) for r in results]
    groups.append(_consensus_group(ref, results, analysis.consensus, ctx.software_version))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(ctx.device_uid),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[_library_entry(ref)],
    )
    root = report[0]
    root.ContentSequence.append(_comment(results, analysis.consensus))  # TID 1500 is extensible
    return root


def sr_document_arguments(
    analysis: AnalysisResult, ctx: OutputContext, placement: Placement, predecessor: Dataset | None = None
) -> dict:
    """Everything but evidence and content that :class:`highdicom.sr.Comprehensive3DSR` is given."""
    names = ", ".join(analysis.models)
    algorithms = [
        processing_algorithm(m.name, m.version, ctx.device_uid)
        for m in ctx.models
        if m.name in analysis.models
    ]
    return {
        "series_instance_uid": placement.series_uid,
        "series_number": ctx.outputs.sr_series_number,
        "sop_instance_uid": placement.sop_uid,
        "instance_number": placement.instance_number,
        "manufacturer": MANUFACTURER,
        "is_complete": True,
        "is_final": False,  # a research output is never the definitive report
        "is_verified": False,
        "contributing_equipment": [
            *algorithms,
            processing_equipment(
                f"pneumonia classification by {names}", ctx.device_uid, ctx.software_version
            ),
        ],
        "series_description": lo(ctx.outputs.sr_series_description),
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": ctx.software_version,
        "device_serial_number": ctx.device_uid,
        "previous_versions": [predecessor] if predecessor is not None else None,
    }


def evidence_header(ds: Dataset) -> Dataset:
    """The attributes of an output that evidence and references need (no pixel data is copied)."""
    header = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(header, keyword, getattr(ds, keyword))
    return header


def build_sr(
    source: Dataset,
    analysis: AnalysisResult,
    ctx: OutputContext,
    placement: Placement,
    evidence: Sequence[Evidence] = (),
    predecessor: Dataset | None = None,
    ref: Dataset | None = None,
) -> Dataset:
    """One Comprehensive 3D SR with every model's finding and the consensus, in the source's study.

    ``evidence`` are the other objects of the result (referenced from the model groups and listed as
    evidence); ``predecessor`` the header (study, series, class and instance UIDs) of the SR this one
    supersedes. ``ref`` is :func:`node.outputs.common.reference_header` of ``source`` when the caller has
    it already. Raises ValueError when ``analysis`` holds no model or the source lacks what an SR must
    reference.
    """
    if not analysis.models:
        raise ValueError("build_sr: at least one model result is needed")
    ref = reference_header(source) if ref is None else ref
    headers = [Evidence(e.kind, e.model, evidence_header(e.dataset)) for e in evidence]
    root = sr_content(ref, analysis, ctx, headers)
    arguments = sr_document_arguments(analysis, ctx, placement, predecessor)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ref, *(e.dataset for e in headers)], content=_evidence_stand_in(root, ref), **arguments
    )
    sr.ContentSequence = root.ContentSequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)  # what highdicom's own constructor keeps
    copy_patient_study(source, sr)
    return sr
