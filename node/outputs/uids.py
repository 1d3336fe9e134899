"""Deterministic UIDs of the node's outputs.

Every UID is ``2.25.<decimal>`` (ISO/IEC 9834-8: the decimal form of a 128-bit number) where the number is
the first 128 bits of a SHA-256 over the inputs that define the object. Analysing the same image again with
the same checkpoint and threshold therefore gives the same SOP Instance UIDs: a PACS that gets the outputs
twice sees one instance, not duplicates. A new checkpoint (digest) or threshold gives new UIDs, because the
content differs.

Series: all Secondary Captures of a study share one new series, all SRs of a study another one, each UID
derived from the study's UID (``"sc-series"`` / ``"sr-series"``): repeated runs and every image of a study
land in the same two series, next to the source series.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Protocol

__all__ = [
    "derive_uid",
    "sc_instance_uid",
    "sr_instance_uid",
    "sc_series_uid",
    "sr_series_uid",
    "tracking_uid",
    "DEVICE_UID",
    "ResultKey",
]

_UID_ROOT = "2.25."


def derive_uid(source_sop_uid: str, kind: str, model: str = "", digest: str = "") -> str:
    """Deterministic ``2.25.<int>`` UID (at most 44 characters) of one output of ``source_sop_uid``."""
    if not source_sop_uid:
        raise ValueError("derive_uid: the source UID is empty")
    # JSON keeps the fields apart unambiguously ("a", "bc" never hashes like "ab", "c")
    key = json.dumps([str(source_sop_uid).strip(), kind, model, digest], ensure_ascii=True)
    number = int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:16], "big")
    return f"{_UID_ROOT}{number}"


class ResultKey(Protocol):
    """What identifies one model's result: a ``gradcam.results.ModelResult`` or a ``node.db.Result`` row."""

    @property
    def model(self) -> str: ...

    @property
    def checkpoint_sha256(self) -> str: ...

    @property
    def threshold(self) -> float: ...


def _threshold_key(checkpoint_sha256: str, threshold: float) -> str:
    # the threshold changes the decision (and the caption burned into the SC): part of the identity
    return f"{checkpoint_sha256};threshold={float(threshold)!r}"


def sc_instance_uid(source_sop_uid: str, result: ResultKey) -> str:
    """SOP Instance UID of the Secondary Capture of ``result`` on the source image."""
    return derive_uid(
        source_sop_uid, "sc", result.model, _threshold_key(result.checkpoint_sha256, result.threshold)
    )


def sr_instance_uid(source_sop_uid: str, results: Iterable[ResultKey]) -> str:
    """SOP Instance UID of the SR holding ``results`` (order of the models does not matter)."""
    parts = sorted((r.model, _threshold_key(r.checkpoint_sha256, r.threshold)) for r in results)
    models = ",".join(m for m, _ in parts)
    digest = ",".join(d for _, d in parts)
    return derive_uid(source_sop_uid, "sr", models, digest)


def sc_series_uid(study_instance_uid: str) -> str:
    """Series Instance UID shared by all Secondary Captures the node makes in a study."""
    return derive_uid(study_instance_uid, "sc-series")


def sr_series_uid(study_instance_uid: str) -> str:
    """Series Instance UID shared by all SRs the node makes in a study."""
    return derive_uid(study_instance_uid, "sr-series")


def tracking_uid(source_sop_uid: str, group: str) -> str:
    """Tracking UID of one measurement group (a model, or the consensus) in the SR of a source image."""
    return derive_uid(source_sop_uid, "tracking", group)


# The node as an SR device observer: one fixed UID for every installation of this software.
DEVICE_UID = derive_uid("gradcam-node", "device")
