"""The DICOM objects the node makes for an analysed image, following IHE Radiology AI Results: a summary
Secondary Capture, per-model Secondary Captures and heatmap Segmentations for the models with a map, and
one Comprehensive 3D SR (TID 1500) that ties them together (see :mod:`node.outputs.build`).

All outputs go into the source's study, in series of their own, carry content-addressed UIDs
(:mod:`node.outputs.uids`, :mod:`node.outputs.identity`), Manufacturer ``gradcam-node`` and the disclaimer
"AI research output - not for diagnostic use"; :func:`is_own_output` recognises them so that the node
never analyses its own results.
"""

from __future__ import annotations

from node.outputs.build import Built, Planned, build_outputs, plan_outputs
from node.outputs.common import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION, Placement, is_own_output
from node.outputs.heatmap import build_heatmap
from node.outputs.identity import ModelIdentity, OutputContext
from node.outputs.sc import build_secondary_capture
from node.outputs.sr import build_sr
from node.outputs.sr_content import Evidence
from node.outputs.sr_read import ModelFinding, SRFindings, SRReadError, read_sr_findings
from node.outputs.uids import derive_uid, output_uid, series_uid, sr_uid

__all__ = [
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "Built",
    "Planned",
    "Evidence",
    "ModelIdentity",
    "OutputContext",
    "Placement",
    "is_own_output",
    "derive_uid",
    "output_uid",
    "series_uid",
    "sr_uid",
    "plan_outputs",
    "build_outputs",
    "build_heatmap",
    "build_secondary_capture",
    "build_sr",
    "read_sr_findings",
    "SRFindings",
    "ModelFinding",
    "SRReadError",
]
