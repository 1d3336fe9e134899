"""ROC analysis and the pointing game, in plain numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["roc_auc", "roc_curve", "choose_threshold", "sens_spec", "pointing_game", "RocPoint"]


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half). NaN when one class is absent."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class RocPoint:
    threshold: float
    sensitivity: float
    specificity: float


def roc_curve(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> list[RocPoint]:
    """Operating points for every distinct score used as threshold (decision: score >= threshold),
    from the highest threshold down, plus a point above the maximum."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    points = []
    for t in thresholds:
        sens, spec = sens_spec(y, s, float(t))
        points.append(RocPoint(float(t), sens, spec))
    return points


def sens_spec(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    sens = float((pred & y).sum() / max(1, y.sum()))
    spec = float((~pred & ~y).sum() / max(1, (~y).sum()))
    return sens, spec


def choose_threshold(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    min_sensitivity: float | None = None,
) -> RocPoint:
    """Youden's J optimum; or, with ``min_sensitivity``, the highest threshold reaching it.

    A threshold between two observed scores is placed midway, so it does not sit on a training
    example's exact score.
    """
    s = np.asarray(scores, dtype=np.float64)
    points = [p for p in roc_curve(labels, s) if np.isfinite(p.threshold)]
    if min_sensitivity is not None:
        ok = [p for p in points if p.sensitivity >= min_sensitivity]
        best = ok[0] if ok else points[-1]
    else:
        best = max(points, key=lambda p: (p.sensitivity + p.specificity - 1.0, p.threshold))
    below = s[s < best.threshold]
    t = (best.threshold + below.max()) / 2.0 if below.size else best.threshold
    sens, spec = sens_spec(np.asarray(labels), s, t)
    return RocPoint(float(t), sens, spec)


def pointing_game(
    peaks: Sequence[tuple[int, int]], boxes: Sequence[Sequence[tuple[int, int, int, int]]]
) -> float:
    """Share of images whose CAM peak (row, col) falls inside any of their boxes (x0, y0, x1, y1)."""
    if not peaks:
        return float("nan")
    hits = 0
    for (row, col), bs in zip(peaks, boxes, strict=True):
        hits += any(x0 <= col < x1 and y0 <= row < y1 for x0, y0, x1, y1 in bs)
    return hits / len(peaks)
