"""Reading an SR made by :mod:`node.outputs.sr` back: each model's finding, region and references, and the
consensus (used by the tests, the demo and anyone checking what a PACS holds)."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from node.outputs.sr_content import (
    ABSENT,
    CONSENSUS_TRACKING_ID,
    ILLUSTRATION,
    MODEL_TRACKING_PREFIX,
    PNEUMONIA,
    PRESENT,
    PROBABILITY,
    REFERENCED_SEGMENT,
    THRESHOLD,
)

__all__ = ["read_sr_findings", "SRFindings", "ModelFinding", "SRReadError"]

_ALGORITHM_NAME = "111001"
_ALGORITHM_VERSION = "111003"
_ALGORITHM_PARAMETERS = "111002"


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
    version: str = ""
    references: tuple[str, ...] = ()  # SOP Instance UIDs of the model's map and picture
    region: tuple[tuple[float, float], ...] = ()  # (column, row) outline on the source, positive only


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


def _references(group: Dataset) -> tuple[str, ...]:
    """SOP Instance UIDs of the group's Referenced Segment and Illustration of ROI items."""
    wanted = {REFERENCED_SEGMENT.value, ILLUSTRATION.value}
    out = []
    for item in group.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence", [])
        if item.get("ValueType") == "IMAGE" and names and names[0].CodeValue in wanted:
            out.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
    return tuple(out)


def _region(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> tuple[tuple[float, float], ...]:
    region = getattr(group, "roi", None)
    if region is None:
        return ()
    data = region.value
    return tuple((float(c), float(r)) for c, r in data)


def _model_finding(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> ModelFinding:
    names = _texts(group[0], _ALGORITHM_NAME)
    if len(names) != 1:
        raise SRReadError(f"group {group.tracking_identifier!r}: expected one algorithm name")
    params = dict(p.partition("=")[::2] for p in _texts(group[0], _ALGORITHM_PARAMETERS))
    versions = _texts(group[0], _ALGORITHM_VERSION)
    what = f"model {names[0]}"
    return ModelFinding(
        model=names[0],
        probability=_one_value(group, PROBABILITY, what),
        threshold=_one_value(group, THRESHOLD, what),
        positive=_presence_of(group, what),
        builder=params.get("builder", ""),
        checkpoint_sha256=params.get("checkpoint_sha256", ""),
        version=versions[0] if versions else "",
        references=_references(group[0]),
        region=_region(group),
    )


def read_sr_findings(ds: Dataset) -> SRFindings:
    """Parse an SR made by :func:`build_sr` back into each model's finding and the consensus.

    Raises :class:`SRReadError` when ``ds`` is not such an SR.
    """
    try:
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        groups = [
            *report.get_image_measurement_groups(finding_type=PNEUMONIA),
            *report.get_planar_roi_measurement_groups(finding_type=PNEUMONIA),
        ]
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
    models.sort(key=lambda f: f.model)
    return SRFindings(models=tuple(models), consensus=consensus)
