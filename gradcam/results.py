"""Result types shared by the analysis, the command line and the node."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ModelResult", "AnalysisResult", "consensus_of", "format_pair", "DISCLAIMER"]

DISCLAIMER = "AI research output - not for diagnostic use"


@dataclass(frozen=True)
class ModelResult:
    """One model's decision and Grad-CAM on one image.

    ``cam`` is float32 at source resolution, scaled to [0, 1] by dividing by its maximum (it is already
    non-negative after the ReLU of Grad-CAM; an all-zero map stays zero). ``cam_peak`` is (row, col) in
    source pixel coordinates.
    """

    model: str
    builder: str
    probability: float
    threshold: float
    positive: bool
    cam: np.ndarray = field(repr=False)
    cam_peak: tuple[int, int]
    checkpoint_sha256: str
    ms: float

    def summary(self) -> dict[str, object]:
        """JSON-ready fields (no CAM array)."""
        return {
            "probability": round(self.probability, 6),
            "threshold": self.threshold,
            "positive": self.positive,
            "cam_peak": [int(self.cam_peak[0]), int(self.cam_peak[1])],
            "checkpoint_sha256": self.checkpoint_sha256,
            "ms": round(self.ms, 3),
        }


def consensus_of(results: list[ModelResult] | tuple[ModelResult, ...]) -> bool:
    """Majority vote of the models' decisions; a tie counts as positive (a missed pneumonia costs more)."""
    if not results:
        raise ValueError("results: at least one model result is needed for a consensus")
    positives = sum(1 for r in results if r.positive)
    return positives * 2 >= len(results)


@dataclass(frozen=True)
class AnalysisResult:
    """All models' results on one image."""

    source: str
    height: int
    width: int
    models: dict[str, ModelResult]

    @property
    def consensus(self) -> bool:
        return consensus_of(list(self.models.values()))


def format_pair(
    probability: float, threshold: float, decimals: int = 3, *, threshold_as_set: bool = False
) -> tuple[str, str]:
    """A probability and its threshold as text that never contradicts the decision (``p >= threshold``).

    ``decimals`` decimals for both (the threshold as configured, ``:g``, with ``threshold_as_set``), and
    more for both while the printed numbers would compare otherwise than the real ones, or print the same
    when they differ: ``p=0.383300 < threshold 0.3833`` becomes ``p=0.3832999 < threshold 0.3833000``.
    """
    for digits in range(decimals, 18):
        p = f"{probability:.{digits}f}"
        t = f"{threshold:g}" if threshold_as_set and digits == decimals else f"{threshold:.{digits}f}"
        agrees = (float(p) >= float(t)) == (probability >= threshold)
        if agrees and (p != t or probability == threshold):
            return p, t
    return repr(probability), repr(threshold)
