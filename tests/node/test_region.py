"""node.outputs.region: the hot region's outline holds the map's peak, wherever it is, in few points."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from node.outputs.region import hot_region


def _inside(outline: np.ndarray, row: int, col: int) -> float:
    return cv2.pointPolygonTest(outline[:-1].reshape(-1, 1, 2), (col + 0.5, row + 0.5), False)


@pytest.mark.parametrize(
    ("peak", "shape"),
    [((0, 0), (128, 128)), ((127, 127), (128, 128)), ((0, 199), (100, 200)), ((50, 60), (100, 200))],
)
def test_a_one_pixel_region_at_any_place_holds_its_peak(
    peak: tuple[int, int], shape: tuple[int, int]
) -> None:
    cam = np.zeros(shape, np.float32)
    cam[peak] = 1.0
    outline = hot_region(cam, peak)
    assert _inside(outline, *peak) > 0
    assert np.array_equal(outline[0], outline[-1])  # closed
    assert outline[:, 0].min() >= 0 and outline[:, 1].min() >= 0
    assert outline[:, 0].max() <= shape[1] and outline[:, 1].max() <= shape[0]


def test_a_ragged_region_is_simplified_and_keeps_its_peak() -> None:
    cam = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    peak = tuple(int(v) for v in np.unravel_index(cam.argmax(), cam.shape))
    outline = hot_region(cam, peak)
    assert len(outline) <= 65 and _inside(outline, *peak) > 0


def test_the_outline_follows_half_the_maximum() -> None:
    yy, xx = np.mgrid[0:200, 0:200]
    cam = np.exp(-((yy - 80) ** 2 + (xx - 120) ** 2) / (2 * 20.0**2)).astype(np.float32)
    outline = hot_region(cam, (80, 120))
    radius = np.hypot(outline[:, 0] - 120.5, outline[:, 1] - 80.5)
    half = 20.0 * np.sqrt(2 * np.log(2))  # where the Gaussian falls to half its peak
    assert np.all(np.abs(radius - half) < 2.0), (radius.min(), radius.max(), half)


def test_an_empty_map_still_points_at_its_peak() -> None:
    outline = hot_region(np.zeros((64, 64), np.float32), (10, 20))
    assert _inside(outline, 10, 20) > 0
