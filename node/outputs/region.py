"""The hot region of a Grad-CAM as a closed outline on the source image, for the SR's SCOORDs."""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["hot_region", "HOT_FRACTION"]

HOT_FRACTION = 0.5  # the region is where the map reaches at least this fraction of its maximum
_MAX_POINTS = 64


def _circle(row: int, col: int, radius: float) -> np.ndarray:
    n = 16
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    pts = np.stack([col + 0.5 + radius * np.cos(angles), row + 0.5 + radius * np.sin(angles)], axis=1)
    return np.vstack([pts, pts[:1]]).astype(np.float32)


def _outline(region: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """The outer boundary of a binary region in DICOM image coordinates, just inside the pixel edges.

    Traced on the region enlarged 2x, so that the boundary runs a quarter pixel inside the region's outer
    pixel edges instead of through the centres of its border pixels: every pixel of the region, a
    one-pixel region included, has its centre strictly inside. ``region`` may be cut out of the image at
    ``origin`` (column, row), with a margin of background where it does not reach the image's edge.
    """
    big = cv2.resize(region, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea).reshape(-1, 2) + 2 * np.asarray(origin)
    return (contour.astype(np.float32) + 0.5) / 2.0


def _component(mask: np.ndarray, row: int, col: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The 8-connected component of ``mask`` at (``row``, ``col``), cut out with a one-pixel margin, and
    where it was cut (column, row): tracing only its box is the same trace, a fraction of the work."""
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    region = (labels == labels[row, col]).astype(np.uint8)
    left, top, width, height = cv2.boundingRect(region)
    x0, y0 = max(left - 1, 0), max(top - 1, 0)
    x1, y1 = min(left + width + 1, mask.shape[1]), min(top + height + 1, mask.shape[0])
    return region[y0:y1, x0:x1], (x0, y0)


def _simplified(outline: np.ndarray, inside: tuple[float, float]) -> np.ndarray:
    """At most 64 points of ``outline``, keeping ``inside`` (the peak's centre) strictly inside."""
    epsilon = 0.25
    best = outline
    while len(best) > _MAX_POINTS and epsilon < 1e4:
        approx = cv2.approxPolyDP(outline.reshape(-1, 1, 2), epsilon, True).reshape(-1, 2)
        if len(approx) >= 3 and cv2.pointPolygonTest(approx.reshape(-1, 1, 2), inside, False) > 0:
            best = approx
        epsilon *= 1.5
    return best


def hot_region(cam: np.ndarray, peak: tuple[int, int], fraction: float = HOT_FRACTION) -> np.ndarray:
    """Closed outline of the connected region around the map's peak where ``cam >= fraction * max``.

    Returns float32 ``(n, 2)`` image coordinates (column, row) as DICOM SCOORDs use them: the top left
    corner of the top left pixel is (0, 0), pixel centres are at .5; the last point repeats the first. At
    most 64 points where the region allows (the outline is simplified, never so far that the peak falls
    outside it). The peak's pixel centre is strictly inside. A map without such a region (all zero) gives
    a small circle around the peak instead, so that a positive finding always has a place to point at.
    """
    arr = np.asarray(cam, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"cam: expected a 2-D map, got shape {arr.shape}")
    h, w = arr.shape
    row, col = min(max(int(peak[0]), 0), h - 1), min(max(int(peak[1]), 0), w - 1)
    top = float(arr.max())
    if not np.isfinite(top) or top <= 0:
        return _circle(row, col, max(2.0, 0.02 * min(h, w)))
    mask = (arr >= fraction * top).astype(np.uint8)
    mask[row, col] = 1  # the peak belongs to its region even if the caller's peak is not the maximum
    outline = _outline(*_component(mask, row, col))
    if outline is None:
        return _circle(row, col, max(2.0, 0.02 * min(h, w)))
    pts = _simplified(outline, (col + 0.5, row + 0.5))
    return np.vstack([pts, pts[:1]]).astype(np.float32)
