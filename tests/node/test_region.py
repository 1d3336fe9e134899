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


def _traced_on_the_whole_map(cam: np.ndarray, peak: tuple[int, int], fraction: float) -> np.ndarray | None:
    """The previous release's trace: the peak's component on the whole map, enlarged 2x, traced, before
    simplification (the outline is now traced on the component's box only)."""
    arr = np.asarray(cam, np.float32)
    top = float(arr.max())
    if not np.isfinite(top) or top <= 0:
        return None
    mask = (arr >= fraction * top).astype(np.uint8)
    mask[peak] = 1
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    big = cv2.resize(
        (labels == labels[peak]).astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST
    )
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return (max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float32) + 0.5) / 2.0


def _maps(seed: int) -> list[np.ndarray]:
    """Maps of several kinds and sizes: blobs (one touching the edge), noise, a half-filled map, specks."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(5, 300, 2))
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    blobs = np.zeros((h, w), np.float32)
    for _ in range(3):
        r, c, sigma = rng.integers(0, h), rng.integers(0, w), rng.uniform(1, max(h, w) / 3)
        blobs += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2)).astype(np.float32)
    half = rng.random((h, w), dtype=np.float32)
    half[:, : w // 2] = 1.0
    specks = (rng.random((h, w)) > 0.8).astype(np.float32)
    return [blobs, rng.random((h, w), dtype=np.float32), half, specks]


@pytest.mark.parametrize("seed", range(25))
def test_the_outline_is_the_trace_of_the_whole_map(seed: int) -> None:
    """Tracing the peak's component in its box gives the points that tracing the whole map gave."""
    from node.outputs.region import _simplified

    for cam in _maps(seed):
        for peak in [tuple(int(v) for v in np.unravel_index(cam.argmax(), cam.shape)), (0, 0)]:
            for fraction in (0.5, 0.9):
                whole = _traced_on_the_whole_map(cam, peak, fraction)
                expected = _simplified(whole, (peak[1] + 0.5, peak[0] + 0.5))
                outline = hot_region(cam, peak, fraction)
                np.testing.assert_array_equal(outline, np.vstack([expected, expected[:1]]))
