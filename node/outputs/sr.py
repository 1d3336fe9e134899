"""The findings of all models on one image as a Comprehensive 3D SR with a TID 1500 Measurement Report,
following IHE Radiology AI Results: every finding tied to the source image, each map and picture of the
result referenced, the regions a viewer can draw as SCOORDs, each algorithm identified by its checkpoint.

The content tree is :mod:`node.outputs.sr_content`.

The Current Requested Procedure Evidence lists the source and every object of the result (summary, SCs,
heatmaps). An SR that replaces an earlier analysis of the same image lists that SR in its Predecessor
Documents Sequence.

The document is the one highdicom's ``Comprehensive3DSR`` made, assembled from encoded parts
(:mod:`node.outputs.encoding`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from gradcam.results import AnalysisResult
from node.outputs.common import (
    Placement,
    algorithm_item,
    contributing_equipment,
    equipment_item,
    instance_elements,
    series_elements,
)
from node.outputs.encoding import assemble, element, item, sequence
from node.outputs.identity import OutputContext
from node.outputs.source import SourceParts, source_parts
from node.outputs.sr_content import Evidence, content_elements

__all__ = ["build_sr", "Evidence"]

SR_SOP_CLASS = str(Comprehensive3DSRStorage)


def _by_study(instances: Iterable[tuple[str, str, str, str]]) -> list[bytes]:
    """Items of a hierarchical reference (study, its series, their instances), in first-seen order, from
    (study, series, SOP class, SOP instance) UIDs: as highdicom groups evidence and predecessors."""
    series: dict[tuple[str, str], list[bytes]] = {}
    for study_uid, series_uid, sop_class, sop_instance in instances:
        reference = item([element(0x00081150, "UI", sop_class), element(0x00081155, "UI", sop_instance)])
        series.setdefault((study_uid, series_uid), []).append(reference)
    studies: dict[str, list[bytes]] = {}
    for (study_uid, series_uid), references in series.items():
        series_item = item([sequence(0x00081199, references), element(0x0020000E, "UI", series_uid)])
        studies.setdefault(study_uid, []).append(series_item)
    return [item([element(0x0020000D, "UI", s), sequence(0x00081115, items)]) for s, items in studies.items()]


def _uids(ds: Dataset) -> tuple[str, str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def _evidence(parts: SourceParts, evidence: Sequence[Evidence]) -> list[bytes]:
    """Current Requested Procedure Evidence (the source and every object of the result in its study) and
    Pertinent Other Evidence (any other), each instance once."""
    source = (parts.study_uid, parts.series_uid, parts.sop_class_uid, parts.sop_instance_uid)
    listed, same, other = set(), [], []
    for uids in [source, *(_uids(e.dataset) for e in evidence)]:
        if uids[3] in listed:
            continue
        listed.add(uids[3])
        (same if uids[0] == parts.study_uid else other).append(uids)
    out = [sequence(0x0040A375, _by_study(same))]
    if other:
        out.append(sequence(0x0040A385, _by_study(other)))
    return out


# What every SR says about itself: a complete report, not verified, and never final (a research output is
# never the definitive report); no procedure step or code (type 2, empty).
_DOCUMENT_ELEMENTS = (
    sequence(0x00081111, []),  # Referenced Performed Procedure Step Sequence
    sequence(0x0040A372, []),  # Performed Procedure Code Sequence
    element(0x0040A491, "CS", "COMPLETE"),
    element(0x0040A493, "CS", "UNVERIFIED"),
    element(0x0040A496, "CS", "PRELIMINARY"),
)


def _equipment(
    analysis: AnalysisResult, ctx: OutputContext, parts: SourceParts, now: datetime.datetime
) -> bytes:
    """Each model of the analysis as processing algorithm (in the configuration's order), then the node."""
    enc = parts.encodings
    names = ", ".join(analysis.models)
    items = [
        algorithm_item(m.name, m.version, ctx.device_uid, enc)
        for m in ctx.models
        if m.name in analysis.models
    ]
    processing = equipment_item(
        f"pneumonia classification by {names}", ctx.device_uid, ctx.software_version, enc
    )
    return contributing_equipment(parts, [*items, processing], now)


def build_sr(
    source: Dataset,
    analysis: AnalysisResult,
    ctx: OutputContext,
    placement: Placement,
    evidence: Sequence[Evidence] = (),
    predecessor: Dataset | None = None,
    parts: SourceParts | None = None,
) -> Dataset:
    """One Comprehensive 3D SR with every model's finding and the consensus, in the source's study.

    ``evidence`` are the other objects of the result (referenced from the model groups and listed as
    evidence); ``predecessor`` the header (study, series, class and instance UIDs) of the SR this one
    supersedes. ``parts`` is :func:`node.outputs.source.source_parts` of ``source`` when the caller has it
    already. Raises ValueError when ``analysis`` holds no model or the source lacks what an SR must
    reference.
    """
    if not analysis.models:
        raise ValueError("build_sr: at least one model result is needed")
    parts = source_parts(source) if parts is None else parts
    enc = parts.encodings
    now = datetime.datetime.now()
    elements = [
        *series_elements(ctx, "sr", SR_SOP_CLASS, "SR", enc),
        *_DOCUMENT_ELEMENTS,
        *instance_elements(placement, now),
        *parts.modules,
        *parts.patient_study,
        *content_elements(source, analysis, ctx, parts, evidence),
        *_evidence(parts, evidence),
        _equipment(analysis, ctx, parts, now),
    ]
    if predecessor is not None:
        elements.append(sequence(0x0040A360, _by_study([_uids(predecessor)])))
    return assemble(elements, SR_SOP_CLASS, placement.sop_uid)
