"""Heatmap overlays with a burned-in caption band."""

from __future__ import annotations

import cv2
import numpy as np

from gradcam.config import COLORMAPS, RenderConfig
from gradcam.preprocess import SourceImage
from gradcam.results import DISCLAIMER, ModelResult

__all__ = ["render_overlay", "caption_lines"]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_SIDE = 512


def caption_lines(result: ModelResult) -> list[str]:
    decision = "POSITIVE (pneumonia suspected)" if result.positive else "negative"
    return [
        f"{result.model}: p={result.probability:.3f}  threshold={result.threshold:.3f}  {decision}",
        DISCLAIMER,
    ]


def _fit_scale(lines: list[str], width: int, thickness: int) -> float:
    """Largest font scale (capped) at which the longest line fits the width with margins."""
    longest = max(cv2.getTextSize(line, _FONT, 1.0, thickness)[0][0] for line in lines)
    return float(min(width * 0.94 / max(longest, 1), width / 900.0 + 0.25, 1.6))


def render_overlay(image: SourceImage, result: ModelResult, cfg: RenderConfig) -> np.ndarray:
    """The CAM over the image at source resolution (long side capped), caption band below.

    Returns uint8 RGB, shape (H + band, W, 3).
    """
    h, w = image.height, image.width
    # Small images are enlarged (up to 512 px, within max_side) so the caption stays legible.
    scale = min(1.0, cfg.max_side / max(h, w))
    if max(h, w) < _MIN_SIDE:
        scale = min(_MIN_SIDE, cfg.max_side) / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey, cam = image.pixels, result.cam
    if scale != 1.0:
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        cam = cv2.resize(cam, size, interpolation=cv2.INTER_LINEAR)
    base = cv2.cvtColor((np.clip(grey, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), COLORMAPS[cfg.colormap])
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    overlay = cv2.addWeighted(base, 1.0 - cfg.opacity, heat, cfg.opacity, 0.0)

    lines = caption_lines(result)
    width = overlay.shape[1]
    thickness = 1 if width < 700 else 2
    font_scale = _fit_scale(lines, width, thickness)
    line_h = cv2.getTextSize("Ag", _FONT, font_scale, thickness)[0][1]
    gap = max(4, line_h // 2)
    band = np.zeros((gap + len(lines) * (line_h + gap) + gap, width, 3), np.uint8)
    y = gap
    for i, line in enumerate(lines):
        y += line_h
        colour = (255, 80, 80) if i == 0 and result.positive else (255, 255, 255)
        if i == len(lines) - 1:
            colour = (255, 210, 0)
        cv2.putText(band, line, (max(2, width // 50), y), _FONT, font_scale, colour, thickness, cv2.LINE_AA)
        y += gap
    return np.ascontiguousarray(np.vstack([overlay, band]))
