"""One model's Grad-CAM as an object a viewer overlays on the source: a FRACTIONAL Segmentation.

IHE AI Results names the Parametric Map for heatmaps, but the Parametric Map IOD requires a patient frame
of reference with plane position and orientation in every frame, which a projection radiograph (CR/DX)
does not have; highdicom refuses to build one for a DX ("mismatch between dimension index values"). The
Segmentation IOD allows images without a frame of reference, so the map is a FRACTIONAL Segmentation (IHE
AIR's other choice): one frame at the source's rows and columns, referencing the source image, one segment
whose fractional values (0..255) are the CAM scaled to [0, 1], the same map as ``analyze``'s
``<model>_cam.npy``. The values are relative saliency (divided by the map's maximum), not a probability of
pneumonia at a pixel: the segment's description says so.

The object is the one highdicom's ``Segmentation`` made for a source without a patient coordinate system
(CR and DX have none), assembled from encoded parts (:mod:`node.outputs.encoding`): highdicom spent most of
its time on checks and copies that give the same answer for every image of a configuration.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

import highdicom as hd
import numpy as np
from highdicom.spatial import get_image_coordinate_system
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from gradcam.results import DISCLAIMER, ModelResult, format_pair
from node.outputs.common import (
    MANUFACTURER,
    SOURCE_IMAGE_PURPOSE,
    Placement,
    algorithm_item,
    contributing_equipment,
    equipment_item,
    instance_elements,
    lo,
    series_elements,
)
from node.outputs.encoding import Encodings, assemble, code_item, element, encode_dataset, item, sequence
from node.outputs.identity import OutputContext
from node.outputs.source import SourceParts, source_parts

__all__ = ["build_heatmap", "segment_label", "SEGMENTATION_SOP_CLASS", "FINDING", "PNEUMONIA", "NORMAL"]

SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
FINDING = Code("404684003", "SCT", "Finding")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NORMAL = Code("17621005", "SCT", "Normal")
_MAX_FRACTION = 255
_SEGMENTATION_DERIVATION = codes.cid7203.SegmentationImageDerivation
_CONTENT_DESCRIPTION = lo("Grad-CAM map, relative 0-1; AI research output, not diagnostic")


def _check_cam(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    arr = np.asarray(cam, dtype=np.float32)
    if arr.shape != (rows, columns):
        raise ValueError(f"cam: expected the source's shape ({rows}, {columns}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("cam: holds values that are not finite")
    return np.clip(arr, 0.0, 1.0)


def segment_label(model: str, positive: bool) -> str:
    """What the segment shows, in a viewer's segment list."""
    return lo(f"{model} Grad-CAM: evidence for {'pneumonia' if positive else 'NORMAL'}")


# --- what the configuration decides ---------------------------------------------------------------------


@lru_cache(maxsize=16)
def _map_elements(encodings: Encodings) -> tuple[bytes, ...]:
    """What every heatmap says about itself and its pixels: one FRACTIONAL frame of 8 bits."""
    return (
        element(0x00080008, "CS", ["DERIVED", "PRIMARY"]),
        element(0x00280002, "US", 1),
        element(0x00280004, "CS", "MONOCHROME2"),
        element(0x00280008, "IS", 1),  # Number of Frames
        element(0x00280100, "US", 8),
        element(0x00280101, "US", 8),
        element(0x00280102, "US", 7),
        element(0x00280103, "US", 0),
        element(0x00620001, "CS", "FRACTIONAL"),
        element(0x0062000E, "US", _MAX_FRACTION),
        element(0x00620010, "CS", "PROBABILITY"),
        element(0x00620013, "CS", "NO"),  # Segments Overlap: one segment
        element(0x00700080, "CS", "GRADCAM"),
        element(0x00700081, "LO", _CONTENT_DESCRIPTION, encodings),
        element(0x20500020, "CS", "IDENTITY"),
    )


@lru_cache(maxsize=256)
def _algorithm_elements(model: str, version: str, encodings: Encodings) -> tuple[bytes, ...]:
    """The segment's algorithm identification but its parameters (which carry the decision)."""
    return (
        element(0x00240202, "LO", MANUFACTURER, encodings),  # Algorithm Source
        sequence(0x0066002F, [code_item(codes.DCM.ArtificialIntelligence, encodings)]),
        element(0x00660031, "LO", lo(version), encodings),
        element(0x00660036, "LO", lo(model), encodings),
    )


@lru_cache(maxsize=256)
def _segment_elements(model: str, positive: bool, encodings: Encodings) -> tuple[bytes, ...]:
    """The segment's description but its algorithm identification."""
    return (
        sequence(0x00620003, [code_item(FINDING, encodings)]),
        element(0x00620004, "US", 1),
        element(0x00620005, "LO", segment_label(model, positive), encodings),
        element(0x00620008, "CS", "AUTOMATIC"),
        element(0x00620009, "LO", lo(model), encodings),
        sequence(0x0062000F, [code_item(PNEUMONIA if positive else NORMAL, encodings)]),
    )


def _segment(result: ModelResult, version: str, encodings: Encodings) -> bytes:
    """The Segment Sequence: one segment, the model's map, its decision in the algorithm's parameters."""
    decision = "positive" if result.positive else "negative"
    parameters = f"probability={result.probability:.6f},threshold={result.threshold:g},decision={decision}"
    algorithm = item(
        [
            *_algorithm_elements(result.model, version, encodings),
            element(0x00660032, "LT", parameters, encodings),
        ]
    )
    segment = [
        *_segment_elements(result.model, bool(result.positive), encodings),
        sequence(0x00620007, [algorithm]),
    ]
    return sequence(0x00620002, [item(segment)])


# --- what the source decides ---------------------------------------------------------------------------


def _check_geometry(source: Dataset) -> None:
    """Only sources without a patient (or slide) coordinate system: highdicom would lay the map out on
    planes then, which a projection radiograph does not have."""
    if get_image_coordinate_system(source) is not None:
        raise ValueError("heatmap: the source has a patient coordinate system (only CR and DX are supported)")


def _frame_of_reference(source: Dataset, encodings: Encodings) -> list[bytes]:
    if "FrameOfReferenceUID" not in source:
        return []
    return [
        element(0x00200052, "UI", source.FrameOfReferenceUID),
        element(0x00201040, "LO", source.get("PositionReferenceIndicator"), encodings),
    ]


def _lossy(source: Dataset) -> list[bytes]:
    """Lossy Image Compression as the source says (``00`` if it does not), with ratio and method if lossy."""
    value = source.get("LossyImageCompression", "00")
    out = [element(0x00282110, "CS", value)]
    if value == "01":
        for tag in (0x00282112, 0x00282114):  # Lossy Image Compression Ratio, Method
            if tag in source:
                out.append(element(tag, dictionary_VR(tag), source[tag].value))
    return out


def _source_image(parts: SourceParts) -> list[bytes]:
    return [element(0x00081150, "UI", parts.sop_class_uid), element(0x00081155, "UI", parts.sop_instance_uid)]


def _references(parts: SourceParts) -> list[bytes]:
    """Referenced Series Sequence and Source Image Sequence: the source image."""
    series = item(
        [sequence(0x0008114A, [item(_source_image(parts))]), element(0x0020000E, "UI", parts.series_uid)]
    )
    return [sequence(0x00081115, [series]), sequence(0x00082112, [item(_source_image(parts))])]


def _dimensions(encodings: Encodings) -> list[bytes]:
    """Dimension Organization and Index: frames indexed by segment number, under a new UID (as highdicom
    made one for every object)."""
    uid = str(hd.UID())
    index = [
        element(0x00209164, "UI", uid),
        element(0x00209165, "AT", 0x0062000B),  # Referenced Segment Number
        element(0x00209167, "AT", 0x0062000A),  # in the Segment Identification Sequence
        element(0x00209421, "LO", "Referenced Segment Number", encodings),
    ]
    return [sequence(0x00209221, [item([index[0]])]), sequence(0x00209222, [item(index)])]


def _shared_groups(source: Dataset, encodings: Encodings) -> bytes:
    """Segment 1 in every frame, and the source's pixel spacing where it has one."""
    groups = [sequence(0x0062000A, [item([element(0x0062000B, "US", 1)])])]
    spacing = source.get("PixelSpacing")
    if spacing is not None:
        measures = hd.PixelMeasuresSequence(
            pixel_spacing=spacing,
            slice_thickness=source.get("SliceThickness"),
            spacing_between_slices=source.get("SpacingBetweenSlices"),
        )
        groups.append(sequence(0x00289110, [item(encode_dataset(measures[0], encodings))]))
    return sequence(0x52009229, [item(groups)])


def _per_frame_groups(parts: SourceParts) -> bytes:
    """The one frame: derived from the source image by segmentation, spatial locations preserved."""
    purpose = code_item(SOURCE_IMAGE_PURPOSE, parts.encodings)
    source_image = item(
        [*_source_image(parts), element(0x0028135A, "CS", "YES"), sequence(0x0040A170, [purpose])]
    )
    derivation = item(
        [
            sequence(0x00082112, [source_image]),
            sequence(0x00089215, [code_item(_SEGMENTATION_DERIVATION, parts.encodings)]),
        ]
    )
    frame = item([element(0x00209157, "UL", [1])])  # Dimension Index Values
    return sequence(0x52009230, [item([sequence(0x00089124, [derivation]), sequence(0x00209111, [frame])])])


# --- the heatmap ---------------------------------------------------------------------------------------


def _comments(result: ModelResult, version: str) -> str:
    decision = "positive" if result.positive else "negative"
    p, threshold = format_pair(result.probability, result.threshold, 6, threshold_as_set=True)
    return (
        f"{DISCLAIMER}. Grad-CAM of {result.model} ({version}): relative saliency scaled to its maximum "
        f"(0-1), not a probability per pixel. {result.model} p={p}, threshold {threshold}, decision "
        f"{decision}."
    )


def build_heatmap(
    source: Dataset,
    result: ModelResult,
    ctx: OutputContext,
    placement: Placement,
    parts: SourceParts | None = None,
) -> Dataset:
    """The FRACTIONAL Segmentation of ``result``'s Grad-CAM on ``source``, at the source's geometry.

    ``parts`` is :func:`node.outputs.source.source_parts` of ``source`` when the caller has it already.
    Raises ValueError when the map does not have the source's rows and columns or is not finite, or the
    source has a patient coordinate system.
    """
    cam = _check_cam(result.cam, int(source.Rows), int(source.Columns))
    _check_geometry(source)
    parts = source_parts(source) if parts is None else parts
    enc = parts.encodings
    version = ctx.model(result.model).version
    equipment = [
        algorithm_item(result.model, version, ctx.device_uid, enc),
        equipment_item(
            f"Grad-CAM map of {result.model} ({version})", ctx.device_uid, ctx.software_version, enc
        ),
    ]
    now = datetime.datetime.now()
    elements = [
        *series_elements(ctx, "heatmap", SEGMENTATION_SOP_CLASS, "SEG", enc),
        *_map_elements(enc),
        *instance_elements(placement, now),
        *parts.specimen,
        *parts.modules,
        *parts.patient_study,
        parts.orientation,  # General Image: type 2C without a frame of reference
        *_frame_of_reference(source, enc),
        *_references(parts),
        *_dimensions(enc),
        element(0x00280010, "US", cam.shape[0]),
        element(0x00280011, "US", cam.shape[1]),
        *_lossy(source),
        _segment(result, version, enc),
        _shared_groups(source, enc),
        _per_frame_groups(parts),
        element(0x00204000, "LT", _comments(result, version), enc),
        contributing_equipment(parts, equipment, now),
    ]
    # highdicom's FRACTIONAL encoding: the float32 map times the maximum, rounded half to even
    fractions = np.around(cam * float(_MAX_FRACTION)).astype(np.uint8)
    return assemble(
        elements,
        SEGMENTATION_SOP_CLASS,
        placement.sop_uid,
        DataElement(0x7FE00010, "OB", fractions.tobytes()),
    )
