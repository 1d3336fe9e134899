"""Content-addressed UIDs of the node's outputs.

Every UID is ``2.25.<decimal>`` (ISO/IEC 9834-8: the decimal form of a 128-bit number) where the number is
the first 128 bits of a SHA-256 over what defines the object: the source image, the output kind, the
model, and the :attr:`~node.outputs.identity.OutputContext.content_key` of the configuration (models,
checkpoints, thresholds, input sizes, windows, drawing and output settings, software version).

- The same image analysed with the same configuration, on this node or a fresh one, gives the same UIDs:
  a PACS that gets the outputs twice keeps one instance, not duplicates.
- Any change to what decides an output's content gives new UIDs: a PACS that refuses to overwrite an
  instance (Orthanc's ``OverwriteInstances: false``) can never keep serving an old result under them.
- An SR that supersedes an earlier one (:mod:`node.outputs.sr`, Predecessor Documents Sequence) also
  takes that predecessor's UID into its own: its content names it.

Series: per study and configuration, the node's Secondary Captures (per-model and summary) share one
series, its heatmap Segmentations another, its SRs a third. Repeated runs and every image of a study land
in the same series; a new configuration starts new series beside the old ones.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["derive_uid", "output_uid", "series_uid", "sr_uid", "tracking_uid", "SERIES_OF_KIND"]

_UID_ROOT = "2.25."

# Which series each output kind goes into (one modality per series: SC is OT, Segmentation SEG, SR SR).
SERIES_OF_KIND = {"summary": "sc", "sc": "sc", "heatmap": "heatmap", "sr": "sr"}


def derive_uid(source_uid: str, kind: str, model: str = "", key: str = "") -> str:
    """Deterministic ``2.25.<int>`` UID (at most 44 characters) of one output of ``source_uid``."""
    if not source_uid or not str(source_uid).strip():
        raise ValueError("derive_uid: the source UID is empty")
    # JSON keeps the fields apart unambiguously ("a", "bc" never hashes like "ab", "c")
    text = json.dumps([str(source_uid).strip(), kind, model, key], ensure_ascii=True)
    number = int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:16], "big")
    return f"{_UID_ROOT}{number}"


def output_uid(source_sop_uid: str, kind: str, model: str | None, content_key: str) -> str:
    """SOP Instance UID of the ``kind`` output (of ``model``, for per-model kinds) on one source image."""
    if kind not in SERIES_OF_KIND:
        raise ValueError(f"kind: expected one of {', '.join(SERIES_OF_KIND)}, got {kind!r}")
    return derive_uid(source_sop_uid, kind, model or "", content_key)


def sr_uid(source_sop_uid: str, content_key: str, predecessor_uid: str | None = None) -> str:
    """SOP Instance UID of the SR on one source image (that supersedes ``predecessor_uid``, if given)."""
    key = content_key if not predecessor_uid else f"{content_key};predecessor={predecessor_uid}"
    return derive_uid(source_sop_uid, "sr", "", key)


def series_uid(study_instance_uid: str, kind: str, content_key: str) -> str:
    """Series Instance UID of the node's ``kind`` outputs in a study, for one configuration."""
    if kind not in SERIES_OF_KIND:
        raise ValueError(f"kind: expected one of {', '.join(SERIES_OF_KIND)}, got {kind!r}")
    return derive_uid(study_instance_uid, f"{SERIES_OF_KIND[kind]}-series", "", content_key)


def tracking_uid(source_sop_uid: str, group: str) -> str:
    """Tracking UID of one finding (a model's, or the consensus) on a source image: the same across
    re-analyses, so that a viewer can follow the finding from one version of the report to the next."""
    return derive_uid(source_sop_uid, "tracking", group)
