"""The findings of all models on one image as a Comprehensive 3D SR with a TID 1500 Measurement Report.

Content tree (coded concepts in brackets)::

    Imaging Measurement Report (DCM 126000)
      Language, Observer Type = Device (DCM 121007) + the node as device observer (TID 1004)
      Procedure Reported = Plain chest X-ray (SCT 399208008)
      Image Library: the source image
      Imaging Measurements (DCM 126010)
        one Measurement Group (TID 1501) per model:
          Tracking Identifier "Pneumonia classification: <model>", Tracking UID (deterministic)
          Finding (DCM 121071) = Pneumonia (SCT 233604007)
          Finding Site (SCT 363698007) = Lung (SCT 39607008)
          Algorithm Identification (TID 4019): name = model, version = node version, family = Artificial
            Intelligence (DCM 123110), parameters "builder=...", "checkpoint_sha256=..."
          Probability (DCM 122157) = p, unit "no units" (UCUM 1), full precision (FD and DS)
          Threshold Value (DCM 122411) = t, unit "no units" (UCUM 1)
          Pneumonia (SCT 233604007) = Present (SCT 52101004) / Absent (SCT 272519000)
          Source: the source image
        one Measurement Group "Pneumonia consensus (majority vote)": the same finding and evaluation, the
          majority vote (a tie counts as positive) as algorithm, the models as its parameter
      Comment (DCM 121106): "AI research output - not for diagnostic use. ..."

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

from gradcam.results import DISCLAIMER, ModelResult
from node.config import OutputsConfig
from node.outputs.common import (
    MANUFACTURER,
    MODEL_NAME,
    SOFTWARE_VERSION,
    copy_patient_study,
    lo,
    processing_equipment,
    reference_header,
)
from node.outputs.uids import DEVICE_UID, sr_instance_uid, sr_series_uid, tracking_uid

__all__ = [
    "build_sr",
    "sr_content",
    "sr_document_arguments",
    "read_sr_findings",
    "SRFindings",
    "ModelFinding",
    "SRReadError",
    "CONSENSUS_TRACKING_ID",
]

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000 (CID 241)
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = codes.DCM.Probability  # 122157
THRESHOLD = codes.DCM.ThresholdValue  # 122411
NO_UNITS = codes.UCUM.NoUnits  # "1"
COMMENT = codes.DCM.Comment  # 121106
_ALGORITHM_NAME = "111001"
_ALGORITHM_PARAMETERS = "111002"

MODEL_TRACKING_PREFIX = "Pneumonia classification: "
CONSENSUS_TRACKING_ID = "Pneumonia consensus (majority vote)"
CONSENSUS_ALGORITHM = "gradcam-node majority vote"


class SRReadError(ValueError):
    """The SR is not one this node made, or it is damaged."""


@dataclass(frozen=True)
class ModelFinding:
    """One model's finding as read back from an SR."""

    model: str
    probability: float
    threshold: float
    positive: bool
    builder: str = ""
    checkpoint_sha256: str = ""


@dataclass(frozen=True)
class SRFindings:
    """Everything :func:`read_sr_findings` reads from an SR: each model's finding and the consensus."""

    models: tuple[ModelFinding, ...]
    consensus: bool

    def as_dict(self) -> dict[str, object]:
        """``{model: {"probability", "threshold", "positive"}, ..., "consensus": bool}``."""
        out: dict[str, object] = {
            f.model: {"probability": f.probability, "threshold": f.threshold, "positive": f.positive}
            for f in self.models
        }
        out["consensus"] = self.consensus
        return out

    def by_model(self) -> dict[str, ModelFinding]:
        return {f.model: f for f in self.models}


# --- building ----------------------------------------------------------------------------------------


def _presence(positive: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=PRESENT if positive else ABSENT)


def _finding_sites() -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)]


def _model_group(ref: Dataset, result: ModelResult) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model,
        version=SOFTWARE_VERSION,
        parameters=[f"builder={result.builder}", f"checkpoint_sha256={result.checkpoint_sha256}"],
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=NO_UNITS),
        hd.sr.Measurement(name=THRESHOLD, value=float(result.threshold), unit=NO_UNITS),
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(str(ref.SOPInstanceUID), result.model),
            identifier=f"{MODEL_TRACKING_PREFIX}{result.model}",
        ),
        finding_type=PNEUMONIA,
        finding_sites=_finding_sites(),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[_presence(bool(result.positive))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )


def _consensus_group(
    ref: Dataset, results: Sequence[ModelResult], consensus: bool
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(
        name=CONSENSUS_ALGORITHM,
        version=SOFTWARE_VERSION,
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
        finding_sites=_finding_sites(),
        algorithm_id=algorithm,
        qualitative_evaluations=[_presence(bool(consensus))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
    )


def _observation_context() -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=DEVICE_UID, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _comment(results: Sequence[ModelResult], consensus: bool) -> hd.sr.TextContentItem:
    votes = ", ".join(f"{r.model} {'positive' if r.positive else 'negative'}" for r in results)
    text = (
        f"{DISCLAIMER}. Pneumonia classification of a chest radiograph by {len(results)} model(s) "
        f"({votes}); consensus by majority vote: {'positive' if consensus else 'negative'}."
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
    it for referenced instances (the Current Requested Procedure Evidence); that was most of the time the
    node spent per image. Every reference in this report is to the one source image, so the document is
    made from this stand-in, which yields the same evidence, and the real content sequence is set right
    after (``test_sr_equals_the_plain_highdicom_document`` checks the two agree element for element).
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


def sr_content(ref: Dataset, results: list[ModelResult], consensus: bool) -> hd.sr.ContainerContentItem:
    """The TID 1500 content tree (root container) of the report on one image."""
    groups = [_model_group(ref, r) for r in results] + [_consensus_group(ref, results, consensus)]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[_library_entry(ref)],
    )
    root = report[0]
    root.ContentSequence.append(_comment(results, consensus))  # TID 1500 is extensible
    return root


def sr_document_arguments(source: Dataset, results: list[ModelResult], outputs: OutputsConfig) -> dict:
    """Everything but evidence and content that :class:`highdicom.sr.Comprehensive3DSR` is given."""
    names = ", ".join(r.model for r in results)
    return {
        "series_instance_uid": sr_series_uid(str(source.StudyInstanceUID)),
        "series_number": outputs.sr_series_number,
        "sop_instance_uid": sr_instance_uid(str(source.SOPInstanceUID), results),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "is_complete": True,
        "is_final": False,  # a research output is never the definitive report
        "is_verified": False,
        "contributing_equipment": [processing_equipment(f"pneumonia classification by {names}")],
        "series_description": lo(outputs.sr_series_description),
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": SOFTWARE_VERSION,
    }


def build_sr(
    source: Dataset,
    results: list[ModelResult],
    consensus: bool,
    outputs: OutputsConfig,
    ref: Dataset | None = None,
) -> Dataset:
    """One Comprehensive 3D SR with every model's finding and the consensus, in the source's study.

    ``ref`` is :func:`node.outputs.common.reference_header` of ``source`` when the caller has it already.
    Raises ValueError when ``results`` is empty or the source lacks what an SR must reference.
    """
    if not results:
        raise ValueError("build_sr: at least one model result is needed")
    ref = reference_header(source) if ref is None else ref
    root = sr_content(ref, results, consensus)
    arguments = sr_document_arguments(source, results, outputs)
    sr = hd.sr.Comprehensive3DSR(evidence=[ref], content=_evidence_stand_in(root, ref), **arguments)
    sr.ContentSequence = root.ContentSequence
    sr._content = hd.sr.ContentSequence([root], is_root=True)  # what highdicom's own constructor keeps
    copy_patient_study(source, sr)
    return sr


# --- reading -----------------------------------------------------------------------------------------


def _texts(group: Dataset, code_value: str) -> list[str]:
    """TEXT values of the group's direct children whose concept name has ``code_value``."""
    out = []
    for item in group.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if item.get("ValueType") == "TEXT" and names and names[0].CodeValue == code_value:
            out.append(str(item.TextValue))
    return out


def _one_value(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: Code, what: str) -> float:
    found = group.get_measurements(name=name)
    if len(found) != 1:
        raise SRReadError(f"{what}: expected one {name.meaning} measurement, found {len(found)}")
    return float(found[0].value)


def _presence_of(group: hd.sr.MeasurementsAndQualitativeEvaluations, what: str) -> bool:
    found = group.get_qualitative_evaluations(name=PNEUMONIA)
    if len(found) != 1:
        raise SRReadError(f"{what}: expected one Pneumonia evaluation, found {len(found)}")
    value = found[0].value
    if value == PRESENT:
        return True
    if value == ABSENT:
        return False
    raise SRReadError(f"{what}: Pneumonia evaluation has an unexpected value {value.meaning!r}")


def _model_finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> ModelFinding:
    names = _texts(group[0], _ALGORITHM_NAME)
    if len(names) != 1:
        raise SRReadError(f"group {group.tracking_identifier!r}: expected one algorithm name")
    params = dict(p.partition("=")[::2] for p in _texts(group[0], _ALGORITHM_PARAMETERS))
    what = f"model {names[0]}"
    return ModelFinding(
        model=names[0],
        probability=_one_value(group, PROBABILITY, what),
        threshold=_one_value(group, THRESHOLD, what),
        positive=_presence_of(group, what),
        builder=params.get("builder", ""),
        checkpoint_sha256=params.get("checkpoint_sha256", ""),
    )


def read_sr_findings(ds: Dataset) -> SRFindings:
    """Parse an SR made by :func:`build_sr` back into each model's finding and the consensus.

    Raises :class:`SRReadError` when ``ds`` is not such an SR.
    """
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        groups = report.get_image_measurement_groups(finding_type=PNEUMONIA)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, SRReadError):
            raise
        raise SRReadError(f"not a readable TID 1500 measurement report: {exc}") from exc
    models: list[ModelFinding] = []
    consensus: bool | None = None
    for group in groups:
        if group.tracking_identifier == CONSENSUS_TRACKING_ID:
            consensus = _presence_of(group, "consensus")
        elif str(group.tracking_identifier or "").startswith(MODEL_TRACKING_PREFIX):
            models.append(_model_finding(group))
    if consensus is None:
        raise SRReadError("the SR holds no consensus group")
    if not models:
        raise SRReadError("the SR holds no model group")
    return SRFindings(models=tuple(models), consensus=consensus)
