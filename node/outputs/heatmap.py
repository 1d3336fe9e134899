"""One model's Grad-CAM as an object a viewer overlays on the source: a FRACTIONAL Segmentation.

IHE AI Results names the Parametric Map for heatmaps, but the Parametric Map IOD requires a patient frame
of reference with plane position and orientation in every frame, which a projection radiograph (CR/DX)
does not have; highdicom refuses to build one for a DX ("mismatch between dimension index values"). The
Segmentation IOD allows images without a frame of reference, so the map is a FRACTIONAL Segmentation (IHE
AIR's other choice): one frame at the source's rows and columns, referencing the source image, one segment
whose fractional values (0..255) are the CAM scaled to [0, 1], the same map as ``analyze``'s
``<model>_cam.npy``. The values are relative saliency (divided by the map's maximum), not a probability of
pneumonia at a pixel: the segment's description says so.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from gradcam.results import DISCLAIMER, ModelResult
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

__all__ = ["build_heatmap", "SEGMENTATION_SOP_CLASS", "FINDING", "PNEUMONIA", "NORMAL"]

SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
FINDING = Code("404684003", "SCT", "Finding")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
NORMAL = Code("17621005", "SCT", "Normal")
_MAX_FRACTION = 255


def _check_cam(cam: np.ndarray, rows: int, columns: int) -> np.ndarray:
    arr = np.asarray(cam, dtype=np.float32)
    if arr.shape != (rows, columns):
        raise ValueError(f"cam: expected the source's shape ({rows}, {columns}), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("cam: holds values that are not finite")
    return np.clip(arr, 0.0, 1.0)


def segment_label(result: ModelResult) -> str:
    """What the segment shows, in a viewer's segment list."""
    evidence = "pneumonia" if result.positive else "NORMAL"
    return lo(f"{result.model} Grad-CAM: evidence for {evidence}")


def _segment(result: ModelResult, version: str) -> hd.seg.SegmentDescription:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=lo(result.model),
        version=lo(version),
        family=codes.DCM.ArtificialIntelligence,
        source=MANUFACTURER,
        parameters={
            "probability": f"{result.probability:.6f}",
            "threshold": f"{result.threshold:g}",
            "decision": "positive" if result.positive else "negative",
        },
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label(result),
        segmented_property_category=FINDING,
        segmented_property_type=PNEUMONIA if result.positive else NORMAL,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )


def build_heatmap(
    source: Dataset,
    result: ModelResult,
    ctx: OutputContext,
    placement: Placement,
    ref: Dataset | None = None,
) -> Dataset:
    """The FRACTIONAL Segmentation of ``result``'s Grad-CAM on ``source``, at the source's geometry.

    Raises ValueError when the map does not have the source's rows and columns or is not finite.
    """
    cam = _check_cam(result.cam, int(source.Rows), int(source.Columns))
    ref = reference_header(source) if ref is None else ref
    version = ctx.model(result.model).version
    seg = hd.seg.Segmentation(
        source_images=[ref],
        pixel_array=cam,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[_segment(result, version)],
        series_instance_uid=placement.series_uid,
        series_number=ctx.outputs.heatmap_series_number,
        sop_instance_uid=placement.sop_uid,
        instance_number=placement.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_uid,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=_MAX_FRACTION,
        content_label="GRADCAM",
        content_description=lo("Grad-CAM map, relative 0-1; AI research output, not diagnostic"),
        series_description=lo(ctx.outputs.heatmap_series_description),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[
            processing_algorithm(result.model, version, ctx.device_uid),
            processing_equipment(
                f"Grad-CAM map of {result.model} ({version})", ctx.device_uid, ctx.software_version
            ),
        ],
    )
    copy_patient_study(source, seg)
    # General Image: type 2C without a frame of reference (projection radiographs have none)
    copy_patient_orientation(source, seg)
    seg.ImageComments = (
        f"{DISCLAIMER}. Grad-CAM of {result.model} ({version}): relative saliency scaled to its maximum "
        f"(0-1), not a probability per pixel. {result.model} p={result.probability:.6f}, threshold "
        f"{result.threshold:g}, decision {'positive' if result.positive else 'negative'}."
    )
    return seg
