"""The TID 1500 Measurement Report of the node's SR (:mod:`node.outputs.sr`): every model's finding tied
to the source image, each map and picture of the result referenced, the regions a viewer can draw as
SCOORDs, each algorithm identified by its checkpoint.

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

Present/Absent are DICOM CID 241 "Present-Absent Only", whose Absent is SCT 272519000 (not 2667000).
The concept name of the evaluation is the finding itself, as IHE AI Results does for binary findings.

The tree is the one highdicom's ``MeasurementReport`` made, assembled from encoded items
(:mod:`node.outputs.sr_items`): what the configuration decides (the observer, each model's tracking
identifier, finding and algorithm) is made by highdicom once and encoded; per image only the findings, the
region, the image library and the references are encoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import highdicom as hd
from highdicom.sr.templates import DEFAULT_LANGUAGE, _get_coded_modality
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult, format_pair
from node.outputs import sr_items as si
from node.outputs.common import MANUFACTURER, MODEL_NAME
from node.outputs.encoding import Encodings, encode_dataset, item
from node.outputs.identity import OutputContext
from node.outputs.region import hot_region
from node.outputs.source import SourceParts
from node.outputs.uids import tracking_uid

__all__ = [
    "content_elements",
    "comment_text",
    "Evidence",
    "PNEUMONIA",
    "PRESENT",
    "ABSENT",
    "PROBABILITY",
    "THRESHOLD",
    "REFERENCED_SEGMENT",
    "ILLUSTRATION",
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

# concepts of the items made per image, as highdicom names them (looked up once: pydicom's code
# dictionary takes microseconds an attribute)
_SOURCE = Code("260753009", "SCT", "Source")
_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_MM = codes.UCUM.Millimeter
_MODALITY = codes.DCM.Modality
_FRAME_OF_REFERENCE = codes.DCM.FrameOfReferenceUID
_ROWS, _COLUMNS = codes.DCM.PixelDataRows, codes.DCM.PixelDataColumns
_ORIENTATION_ROW, _ORIENTATION_COLUMN = codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn
_HORIZONTAL_SPACING, _VERTICAL_SPACING = codes.DCM.HorizontalPixelSpacing, codes.DCM.VerticalPixelSpacing
_IMAGE_LIBRARY, _IMAGE_LIBRARY_GROUP = codes.DCM.ImageLibrary, codes.DCM.ImageLibraryGroup
_IMAGE_REGION = codes.DCM.ImageRegion
_SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement
_TRACKING_UID = codes.DCM.TrackingUniqueIdentifier
_MEASUREMENT_GROUP = codes.DCM.MeasurementGroup
_IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
_REPORT = codes.cid7021.ImagingMeasurementReport
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")  # highdicom's TID 1603 ones


@dataclass(frozen=True)
class Evidence:
    """An object of the result that the SR references: ``kind`` ``summary``, ``sc`` or ``heatmap``."""

    kind: str
    model: str | None
    dataset: Dataset


def _encoded(items: Iterable[Dataset], encodings: Encodings) -> tuple[bytes, ...]:
    return tuple(item(encode_dataset(i, encodings)) for i in items)


# --- what the configuration decides: made by highdicom once, encoded -----------------------------------


def _observation_context(device_uid: str) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


@lru_cache(maxsize=16)
def _report_head(device_uid: str, encodings: Encodings) -> tuple[bytes, ...]:
    """Language, the node as device observer (with the installation's device UID), procedure reported."""
    procedure = hd.sr.CodeContentItem(
        name=codes.DCM.ProcedureReported,
        value=CHEST_XRAY,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    items = [*hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE), *_observation_context(device_uid)]
    return _encoded([*items, procedure], encodings)


def _group_head(
    identifier: str, algorithm: hd.sr.AlgorithmIdentification, encodings: Encodings
) -> tuple[bytes, tuple[bytes, ...]]:
    """A measurement group's constant items: its tracking identifier, and what follows the tracking UID
    (finding category, finding, finding site, the algorithm).

    highdicom makes the group once, with a placeholder tracking UID; each image's group puts its own
    tracking UID between the two parts.
    """
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid="2.25.0", identifier=identifier),
        finding_type=PNEUMONIA,
        finding_category=FINDING,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        algorithm_id=algorithm,
    )
    name, uid, *rest = group[0].ContentSequence
    assert uid.ValueType == "UIDREF", "highdicom puts the tracking UID second"
    return _encoded([name], encodings)[0], _encoded(rest, encodings)


@lru_cache(maxsize=64)
def _model_head(
    model: str, version: str, builder: str, checkpoint: str, input_size: int, encodings: Encodings
) -> tuple[bytes, tuple[bytes, ...]]:
    """:func:`_group_head` of one model: its algorithm is identified by its checkpoint (TID 4019)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=model,
        version=version,
        parameters=[f"builder={builder}", f"checkpoint_sha256={checkpoint}", f"input_size={input_size}"],
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )
    return _group_head(f"{MODEL_TRACKING_PREFIX}{model}", algorithm, encodings)


@lru_cache(maxsize=64)
def _consensus_head(
    models: tuple[str, ...], version: str, encodings: Encodings
) -> tuple[bytes, tuple[bytes, ...]]:
    """:func:`_group_head` of the consensus: the majority vote of ``models``."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=CONSENSUS_ALGORITHM,
        version=version,
        parameters=[
            "models=" + ",".join(models),
            "rule=majority of the model decisions; a tie counts as positive",
        ],
        manufacturer=MANUFACTURER,
    )
    return _group_head(CONSENSUS_TRACKING_ID, algorithm, encodings)


@lru_cache(maxsize=16)
def _presence(positive: bool, encodings: Encodings) -> bytes:
    """Pneumonia = Present or Absent (CID 241)."""
    return _encoded(
        hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if positive else ABSENT), encodings
    )[0]


# --- per image -----------------------------------------------------------------------------------------


def _has_projection_geometry(source: Dataset) -> bool:
    orientation = source.get("PatientOrientation", None)
    spacing = source.get("ImagerPixelSpacing", None)
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


_coded_modality = lru_cache(maxsize=16)(_get_coded_modality)  # highdicom's table, built on every call


def _library_descriptors(source: Dataset, encodings: Encodings) -> list[bytes]:
    """The source's Image Library Entry Descriptors as highdicom made them (TID 1602, and TID 1603 for a
    radiograph with Patient Orientation and Imager Pixel Spacing; without both, TID 1602 only)."""
    acq = si.HAS_ACQ_CONTEXT
    modality = _coded_modality(str(source.SOPClassUID))
    out = [si.code(acq, _MODALITY, modality, encodings)]
    if "FrameOfReferenceUID" in source:
        out.append(si.uidref(acq, _FRAME_OF_REFERENCE, source.FrameOfReferenceUID, encodings))
    out.append(si.num(acq, _ROWS, source.Rows, _PIXELS, encodings))
    out.append(si.num(acq, _COLUMNS, source.Columns, _PIXELS, encodings))
    if _has_projection_geometry(source) and source.Modality in _PROJECTION_MODALITIES:
        orientation, spacing = source.PatientOrientation, source.ImagerPixelSpacing
        out += [
            si.text(acq, _ORIENTATION_ROW, orientation[0], encodings),
            si.text(acq, _ORIENTATION_COLUMN, orientation[1], encodings),
            si.num(acq, _HORIZONTAL_SPACING, spacing[1], _MM, encodings),
            si.num(acq, _VERTICAL_SPACING, spacing[0], _MM, encodings),
        ]
    return out


def _image_library(source: Dataset, parts: SourceParts) -> bytes:
    """The Image Library: one group with the source image (highdicom names no frame of reference at the
    group level: it looks for one in the IMAGE item, which never has one)."""
    enc = parts.encodings
    descriptors = _library_descriptors(source, enc)
    entry = si.image(
        si.CONTAINS, _SOURCE, parts.sop_class_uid, parts.sop_instance_uid, enc, children=descriptors
    )
    library_group = si.container(si.CONTAINS, _IMAGE_LIBRARY_GROUP, [entry], enc)
    return si.container(si.CONTAINS, _IMAGE_LIBRARY, [library_group], enc)


# How each kind of the model's objects is referenced from its group: concept, and the segment (if any).
_REFERENCE_OF_KIND = {"heatmap": (REFERENCED_SEGMENT, [1]), "sc": (ILLUSTRATION, None)}


def _references(model: str, evidence: Sequence[Evidence], encodings: Encodings) -> list[bytes]:
    """The model's heatmap (as a segment) and picture, as IMAGE items of its group."""
    items = []
    for e in evidence:
        if e.model != model or e.kind not in _REFERENCE_OF_KIND:
            continue
        concept, segments = _REFERENCE_OF_KIND[e.kind]
        ds = e.dataset
        items.append(si.image(si.CONTAINS, concept, ds.SOPClassUID, ds.SOPInstanceUID, encodings, segments))
    return items


def _region(result: ModelResult, parts: SourceParts) -> bytes:
    """The outline of the map's hot region on the source image (TID 1410 Image Region)."""
    enc = parts.encodings
    on = si.image(si.SELECTED_FROM, _SOURCE, parts.sop_class_uid, parts.sop_instance_uid, enc)
    points = hot_region(result.cam, result.cam_peak)
    return si.scoord(si.CONTAINS, _IMAGE_REGION, "POLYLINE", points, [on], enc)


def _source_of_measurement(parts: SourceParts) -> bytes:
    return si.image(
        si.CONTAINS,
        _SOURCE_OF_MEASUREMENT,
        parts.sop_class_uid,
        parts.sop_instance_uid,
        parts.encodings,
    )


def _group(
    head: tuple[bytes, tuple[bytes, ...]],
    uid: str,
    findings: Sequence[bytes],
    template_id: str,
    encodings: Encodings,
) -> bytes:
    """A Measurement Group: the constant head around its tracking UID, then its findings."""
    name, rest = head
    tracking = si.uidref(si.HAS_OBS_CONTEXT, _TRACKING_UID, uid, encodings)
    children = [name, tracking, *rest, *findings]
    return si.container(si.CONTAINS, _MEASUREMENT_GROUP, children, encodings, template_id)


def _model_group(
    result: ModelResult, ctx: OutputContext, parts: SourceParts, evidence: Sequence[Evidence]
) -> bytes:
    enc = parts.encodings
    identity = ctx.model(result.model)
    head = _model_head(
        result.model, identity.version, result.builder, result.checkpoint_sha256, identity.input_size, enc
    )
    findings = [
        si.num(si.CONTAINS, PROBABILITY, float(result.probability), NO_UNITS, enc),
        si.num(si.CONTAINS, THRESHOLD, float(result.threshold), NO_UNITS, enc),
        _presence(bool(result.positive), enc),
        _region(result, parts) if result.positive else _source_of_measurement(parts),
        *_references(result.model, evidence, enc),  # TID 1500 is extensible
    ]
    uid = tracking_uid(parts.sop_instance_uid, result.model)
    return _group(head, uid, findings, "1410" if result.positive else "1501", enc)


def _consensus_group(
    results: Sequence[ModelResult], consensus: bool, version: str, parts: SourceParts
) -> bytes:
    enc = parts.encodings
    head = _consensus_head(tuple(r.model for r in results), version, enc)
    findings = [_presence(bool(consensus), enc), _source_of_measurement(parts)]
    return _group(head, tracking_uid(parts.sop_instance_uid, "consensus"), findings, "1501", enc)


def comment_text(results: Sequence[ModelResult], consensus: bool) -> str:
    """The report's comment: the disclaimer, each model's vote, the consensus, what the maps are."""

    def vote(r: ModelResult) -> str:
        p, threshold = format_pair(r.probability, r.threshold, 6, threshold_as_set=True)
        relation = ">=" if r.positive else "<"
        return (
            f"{r.model} {'positive' if r.positive else 'negative'} (p={p} {relation} threshold {threshold})"
        )

    votes = ", ".join(vote(r) for r in results)
    return (
        f"{DISCLAIMER}. Pneumonia classification of a chest radiograph by {len(results)} model(s) "
        f"({votes}); consensus by majority vote: {'positive' if consensus else 'negative'}. Maps are "
        "Grad-CAM saliency relative to their maximum, not a probability per pixel."
    )


def content_elements(
    source: Dataset,
    analysis: AnalysisResult,
    ctx: OutputContext,
    parts: SourceParts,
    evidence: Sequence[Evidence],
) -> list[bytes]:
    """The TID 1500 content tree of the report on ``source``: its root container's elements, which are
    the document's top level."""
    enc = parts.encodings
    results = list(analysis.models.values())
    groups = [_model_group(r, ctx, parts, evidence) for r in results]
    groups.append(_consensus_group(results, analysis.consensus, ctx.software_version, parts))
    children = [
        *_report_head(ctx.device_uid, enc),
        _image_library(source, parts),
        si.container(si.CONTAINS, _IMAGING_MEASUREMENTS, groups, enc),
        si.text(
            si.CONTAINS, COMMENT, comment_text(results, analysis.consensus), enc
        ),  # TID 1500 is extensible
    ]
    return si.container_elements(None, _REPORT, children, enc, "1500")
