"""The DICOM objects the node makes (highdicom): one Secondary Capture per model with the Grad-CAM overlay,
and one Comprehensive 3D SR (TID 1500) with every model's finding and the consensus.

All outputs go into the source's study, in two series of their own (see :mod:`node.outputs.uids`), carry
deterministic UIDs, Manufacturer ``gradcam-node`` and the disclaimer "AI research output - not for
diagnostic use"; :func:`is_own_output` recognises them so that the node never analyses its own results.
"""

from __future__ import annotations

from node.outputs.common import MANUFACTURER, MODEL_NAME, SOFTWARE_VERSION, is_own_output
from node.outputs.sc import build_secondary_capture
from node.outputs.sr import ModelFinding, SRFindings, SRReadError, build_sr, read_sr_findings
from node.outputs.uids import (
    derive_uid,
    sc_instance_uid,
    sc_series_uid,
    sr_instance_uid,
    sr_series_uid,
)

__all__ = [
    "MANUFACTURER",
    "MODEL_NAME",
    "SOFTWARE_VERSION",
    "is_own_output",
    "derive_uid",
    "sc_instance_uid",
    "sr_instance_uid",
    "sc_series_uid",
    "sr_series_uid",
    "build_secondary_capture",
    "build_sr",
    "read_sr_findings",
    "SRFindings",
    "ModelFinding",
    "SRReadError",
]
