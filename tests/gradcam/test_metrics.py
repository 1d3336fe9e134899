"""ROC analysis and the pointing game against scikit-learn and hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradcam.metrics import choose_threshold, pointing_game, roc_auc, roc_curve, sens_spec


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes present
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # rounding makes many ties, labels shift them up
    assert len(np.unique(scores)) < n
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # The curve's trapezoid area is the same number.
    curve = roc_curve(labels, scores)
    fpr = np.array([1 - p.specificity for p in curve])
    tpr = np.array([p.sensitivity for p in curve])
    assert (curve[0].sensitivity, curve[0].specificity) == (0.0, 1.0)
    assert (curve[-1].sensitivity, curve[-1].specificity) == (1.0, 0.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))


# Hand-made: negatives 0.1 0.2 0.6, positives 0.4 0.7 0.8.
#   threshold  0.8   0.7   0.6   0.4   0.2   0.1
#   sens       1/3   2/3   2/3   1     1     1
#   spec       1     1     2/3   2/3   1/3   0
#   Youden J   1/3   2/3   1/3   2/3   1/3   0      -> tie 0.7 / 0.4: the higher threshold, 0.7
LABELS = [0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.2, 0.6, 0.4, 0.7, 0.8]


def test_youden_threshold_on_a_hand_made_case() -> None:
    best = choose_threshold(LABELS, SCORES)
    assert best.threshold == pytest.approx(0.65)  # midway between 0.7 and the next score below, 0.6
    assert (best.sensitivity, best.specificity) == pytest.approx((2 / 3, 1.0))


@pytest.mark.parametrize(
    ("minimum", "threshold", "sens", "spec"),
    [(1.0, 0.3, 1.0, 2 / 3), (0.9, 0.3, 1.0, 2 / 3), (0.5, 0.65, 2 / 3, 1.0), (0.2, 0.75, 1 / 3, 1.0)],
)
def test_min_sensitivity_threshold_on_a_hand_made_case(
    minimum: float, threshold: float, sens: float, spec: float
) -> None:
    best = choose_threshold(LABELS, SCORES, min_sensitivity=minimum)
    assert best.threshold == pytest.approx(threshold)
    assert (best.sensitivity, best.specificity) == pytest.approx((sens, spec))
    assert best.sensitivity >= minimum


def test_lowest_threshold_has_nothing_below() -> None:
    best = choose_threshold([0, 1, 1], [0.2, 0.2, 0.9], min_sensitivity=1.0)
    assert best.threshold == pytest.approx(0.2) and best.sensitivity == 1.0 and best.specificity == 0.0


def test_sens_spec_counts() -> None:
    labels, scores = np.array(LABELS), np.array(SCORES)
    assert sens_spec(labels, scores, 0.5) == pytest.approx((2 / 3, 2 / 3))
    assert sens_spec(labels, scores, 0.7) == pytest.approx((2 / 3, 1.0))  # decision is score >= threshold


def test_pointing_game_on_a_hand_made_case() -> None:
    peaks = [(5, 5), (20, 20), (0, 9), (2, 15), (5, 10)]  # (row, col)
    boxes = [
        [(0, 0, 10, 10)],  # hit
        [(0, 0, 10, 10), (15, 15, 25, 25)],  # hit in the second box
        [(10, 0, 20, 10)],  # miss: col 9 is left of x0 = 10
        [(10, 0, 20, 5)],  # hit: col 15 in x 10..20, row 2 in y 0..5 (swapped axes would miss)
        [(0, 0, 10, 10)],  # miss: x1 is exclusive
    ]
    assert pointing_game(peaks, boxes) == pytest.approx(3 / 5)
    assert pointing_game([(1, 1)], [[]]) == 0.0
    assert math.isnan(pointing_game([], []))
    with pytest.raises(ValueError):
        pointing_game([(1, 1)], [])
