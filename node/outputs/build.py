"""Which outputs one analysed image gets, and building them: the one place that knows the output kinds.

Per image, in this order (``[outputs] kinds`` chooses among them; see ``node.config.OUTPUT_KINDS``):

``summary``
    one Secondary Capture with every model's decision and map side by side and the consensus: what a PACS
    user opens first; made for every image, positive or not.
``sc``
    one Secondary Capture per model with a map: that model's overlay at full resolution.
``heatmap``
    one FRACTIONAL Segmentation per model with a map (:mod:`node.outputs.heatmap`): the map at the source's
    geometry, for viewers that overlay, toggle and measure.
``sr``
    the Comprehensive 3D SR (:mod:`node.outputs.sr`), referencing all of the above.

A model "has a map" when its decision is positive. A negative decision's map shows what the model took
as evidence for *normal*; drawn like a positive one it would show a hot blob over the lungs of a negative
study, so it is made only with ``[outputs] negative_maps = true``, and then drawn and labelled as such.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from gradcam.preprocess import SourceImage
from gradcam.render import render_overlay, render_summary
from gradcam.results import AnalysisResult
from node.outputs.common import Placement
from node.outputs.heatmap import build_heatmap
from node.outputs.identity import OutputContext
from node.outputs.sc import build_secondary_capture
from node.outputs.source import source_parts
from node.outputs.sr import build_sr
from node.outputs.sr_content import Evidence
from node.outputs.uids import output_uid, series_uid, sr_uid

__all__ = ["Built", "Planned", "plan_outputs", "build_outputs"]


@dataclass(frozen=True)
class Built:
    """One output made for an image; ``supersedes`` is the predecessor SR's UID (an SR only)."""

    kind: str
    model: str | None
    dataset: Dataset
    supersedes: str | None = None


@dataclass(frozen=True)
class Planned:
    """One output an image gets: its kind, its model (per-model kinds), its series and SOP Instance UID."""

    kind: str
    model: str | None
    series_uid: str
    sop_uid: str


def plan_outputs(
    source: Dataset, analysis: AnalysisResult, ctx: OutputContext, predecessor_uid: str | None = None
) -> list[Planned]:
    """Every output the image gets, in the order they are built and sent, with their UIDs."""
    kinds, key = ctx.outputs.kinds, ctx.content_key
    source_uid, study_uid = str(source.SOPInstanceUID), str(source.StudyInstanceUID)
    mapped = [m for m, r in analysis.models.items() if r.positive or ctx.outputs.negative_maps]
    wanted: list[tuple[str, str | None]] = []
    if "summary" in kinds:
        wanted.append(("summary", None))
    if "sc" in kinds:
        wanted.extend(("sc", m) for m in mapped)
    if "heatmap" in kinds:
        wanted.extend(("heatmap", m) for m in mapped)
    if "sr" in kinds:
        wanted.append(("sr", None))
    return [
        Planned(
            kind,
            model,
            series_uid(study_uid, kind, key),
            sr_uid(source_uid, key, predecessor_uid)
            if kind == "sr"
            else output_uid(source_uid, kind, model, key),
        )
        for kind, model in wanted
    ]


def build_outputs(
    source: Dataset,
    image: SourceImage,
    analysis: AnalysisResult,
    ctx: OutputContext,
    numbers: Mapping[str, int],
    predecessor: Dataset | None = None,
) -> list[Built]:
    """Every planned output of one image (:func:`plan_outputs`), built in memory (nothing is written).

    ``numbers`` maps each planned SOP Instance UID to its Instance Number; ``predecessor`` is the header
    of the SR this image's new SR supersedes (:func:`node.outputs.sr.build_sr`). Raises ValueError,
    TypeError or KeyError when the source or the analysis cannot make valid outputs.
    """
    parts = source_parts(source)  # what every output copies from the source, encoded once
    before = str(predecessor.SOPInstanceUID) if predecessor is not None else None
    built: list[Built] = []
    for p in plan_outputs(source, analysis, ctx, before):
        placement = Placement(p.series_uid, p.sop_uid, numbers[p.sop_uid])
        if p.kind == "sr":
            evidence = [Evidence(b.kind, b.model, b.dataset) for b in built]
            ds = build_sr(source, analysis, ctx, placement, evidence, predecessor, parts)
            built.append(Built(p.kind, None, ds, supersedes=before))
            continue
        if p.kind == "summary":
            pixels = render_summary(image, analysis, ctx.render, ctx.outputs.negative_maps)
            ds = build_secondary_capture(source, pixels, analysis, None, ctx, placement, parts)
        elif p.kind == "sc":
            assert p.model is not None
            pixels = render_overlay(image, analysis.models[p.model], ctx.render, analysis)
            ds = build_secondary_capture(source, pixels, analysis, p.model, ctx, placement, parts)
        else:
            assert p.model is not None
            ds = build_heatmap(source, analysis.models[p.model], ctx, placement, parts)
        built.append(Built(p.kind, p.model, ds))
    return built
