"""Grad-CAM pictures for people: one model's overlay, and one summary per image with every model.

Every picture says, burned into its pixels, what a reader needs so that it cannot be misread on its own:
each model's decision with probability and threshold (printed with enough decimals that they never look
equal while the comparison goes one way), the consensus of all models (majority vote, a tie counts as
positive), a colour bar with the meaning of the colours, and :data:`gradcam.results.DISCLAIMER`.

Colour schemes
--------------
Evidence for PNEUMONIA (the CAM of a positive decision, which targets the positive logit)
    ``RenderConfig.colormap`` (an OpenCV colour map, ``jet`` by default: blue low, red high).
Evidence for NORMAL (the CAM of a negative decision, which targets the negative logit)
    A fixed single-hue azure ramp, dark navy (low) to bright azure (high), whatever the configured map:
    it has no red, orange or yellow, so a negative study never shows a "hot" blob.

A CAM is relative: it is scaled to its own maximum, so 1 means "the strongest evidence in this map",
not a probability; the colour bar says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from gradcam.config import COLORMAPS, RenderConfig
from gradcam.preprocess import SourceImage
from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult, format_pair

__all__ = [
    "render_overlay",
    "render_summary",
    "caption_lines",
    "decision_line",
    "consensus_line",
    "legend_line",
    "NORMAL_RAMP_RGB",
]

Colour = tuple[int, int, int]

# Hot end of the evidence-for-NORMAL ramp (RGB); the ramp runs from 20 % to 100 % of it.
NORMAL_RAMP_RGB: Colour = (40, 160, 255)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_MIN_SIDE = 512  # small images are enlarged to this (within max_side) so captions stay legible
_PANEL_SIDE = 512  # long side of each model's panel in the summary
_PANEL_GAP = 16  # black columns between summary panels
_MIN_SCALE = 0.4  # smallest font scale on a 512-px wide band; longer lines wrap instead of shrinking

_RED: Colour = (255, 80, 80)
_WHITE: Colour = (255, 255, 255)
_GREY: Colour = (200, 200, 200)
_YELLOW: Colour = (255, 210, 0)
_BORDER: Colour = (128, 128, 128)


@dataclass(frozen=True)
class _Scheme:
    """A colour scheme (also a caption row: its colour bar): 256 RGB colours, index = CAM * 255."""

    lut: np.ndarray


@dataclass(frozen=True)
class _Text:
    """One logical caption line (wrapped to the width when drawn)."""

    text: str
    colour: Colour


_Row = _Text | _Scheme  # a caption row: a line of text, or a colour bar


# --- colour schemes ------------------------------------------------------------------------------------


def _read_only(table: np.ndarray) -> np.ndarray:
    table.flags.writeable = False  # made once and shared by every picture
    return table


@lru_cache(maxsize=32)
def _opencv_lut(name: str) -> np.ndarray:
    """The named OpenCV colour map as a (256, 3) uint8 RGB table."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return _read_only(np.ascontiguousarray(cv2.applyColorMap(ramp, COLORMAPS[name])[:, 0, ::-1]))


@lru_cache(maxsize=1)
def _normal_lut() -> np.ndarray:
    """The evidence-for-NORMAL ramp: one hue, brightness rising from 20 % to 100 % of NORMAL_RAMP_RGB."""
    level = 0.2 + 0.8 * np.linspace(0.0, 1.0, 256)[:, None]
    return _read_only(np.round(level * np.array(NORMAL_RAMP_RGB, np.float64)).astype(np.uint8))


def _scheme(result: ModelResult, cfg: RenderConfig) -> _Scheme:
    """The configured map for a positive decision; the fixed azure ramp for a negative one."""
    if result.positive:
        return _Scheme(_opencv_lut(cfg.colormap))
    return _Scheme(_normal_lut())


# --- caption text --------------------------------------------------------------------------------------


def decision_line(result: ModelResult) -> str:
    """One model's decision with the numbers behind it.

    Examples
    --------
    ``ResNet18: POSITIVE  p=0.412 >= threshold 0.383`` or ``DenseNet121: negative  p=0.031 < threshold
    0.065``. Rounding is monotonic and the digits grow until the two numbers differ, so the printed
    numbers always agree with the printed comparison.
    """
    p, t = format_pair(result.probability, result.threshold)
    if result.positive:
        return f"{result.model}: POSITIVE  p={p} >= threshold {t}"
    return f"{result.model}: negative  p={p} < threshold {t}"


def consensus_line(analysis: AnalysisResult) -> str:
    """``Consensus of 3 models: NEGATIVE  (1 of 3 positive; majority vote, tie = positive)``."""
    n = len(analysis.models)
    positives = sum(1 for r in analysis.models.values() if r.positive)
    verdict = "POSITIVE" if analysis.consensus else "NEGATIVE"
    noun = "model" if n == 1 else "models"
    return f"Consensus of {n} {noun}: {verdict}  ({positives} of {n} positive; majority vote, tie = positive)"


def legend_line(positive: bool) -> str:
    """What the colours of a map drawn for a positive (or negative) decision mean."""
    meaning = "PNEUMONIA" if positive else "NORMAL"
    return f"Grad-CAM: evidence for {meaning}  (relative to its own maximum: low 0 .. 1 high)"


def caption_lines(result: ModelResult, analysis: AnalysisResult) -> list[str]:
    """The caption of one model's overlay: decision, consensus, colour legend, disclaimer (always last).

    Parameters
    ----------
    result
        The model whose map is drawn.
    analysis
        All models' results on the same image, for the consensus.
    """
    return [decision_line(result), consensus_line(analysis), legend_line(result.positive), DISCLAIMER]


# --- text layout ---------------------------------------------------------------------------------------


def _text_width(text: str, scale: float, thickness: int) -> int:
    return int(cv2.getTextSize(text, _FONT, scale, thickness)[0][0])


def _text_scale(texts: Sequence[str], width: int, thickness: int, cap: float = 1.6) -> float:
    """Largest scale (capped) at which the longest text fits; never below a legible floor (then: wrap)."""
    usable = width * 0.94

    def widest(scale: float) -> int:
        return max(_text_width(t, scale, thickness) for t in texts)

    scale = min(usable / max(widest(1.0), 1), width / 900.0 + 0.25, cap)
    floor = _MIN_SCALE * min(1.0, width / 512.0)
    while scale > floor and widest(scale) > usable:
        scale *= 0.97  # text width is not quite proportional to the scale
    return float(max(scale, floor))


def _wrap(text: str, width: int, scale: float, thickness: int) -> list[str]:
    """Greedy wrap: phrases (separated by double spaces) stay whole when they fit, else break at words."""
    usable = width * 0.94

    def fits(line: str) -> bool:
        return _text_width(line, scale, thickness) <= usable

    lines: list[str] = []
    for phrase in text.split("  "):
        words = [phrase] if fits(phrase) else phrase.split(" ")
        for i, word in enumerate(words):
            joined = f"{lines[-1]}{' ' if i else '  '}{word}" if lines else word
            if lines and fits(joined):
                lines[-1] = joined
            else:
                lines.append(word)
    return lines


def _metrics(scale: float, thickness: int) -> tuple[int, int]:
    """Cap height of a text line and the gap between lines, in pixels."""
    line_h = int(cv2.getTextSize("Ag", _FONT, scale, thickness)[0][1])
    return line_h, max(4, line_h // 2)


def _text_strip(text: str, colour: Colour, width: int, scale: float, thickness: int) -> np.ndarray:
    line_h, gap = _metrics(scale, thickness)
    strip = np.zeros((line_h + gap, width, 3), np.uint8)
    cv2.putText(strip, text, (max(2, width // 50), line_h), _FONT, scale, colour, thickness, cv2.LINE_AA)
    return strip


def _bar_strip(scheme: _Scheme, width: int, scale: float, thickness: int) -> np.ndarray:
    """A horizontal colour bar, "low 0" at its left end and "1 high" at its right end."""
    line_h, gap = _metrics(scale, thickness)
    height = max(6, round(line_h * 1.3))
    strip = np.zeros((height + gap, width, 3), np.uint8)
    margin = max(2, width // 50)
    left, right = "low 0", "1 high"
    x0 = margin + _text_width(left, scale, thickness) + margin
    x1 = width - margin - _text_width(right, scale, thickness) - margin
    if x1 - x0 < 8:  # too narrow for labels: the bar alone
        x0, x1 = margin, width - margin
    else:
        baseline = (height + line_h) // 2
        cv2.putText(strip, left, (margin, baseline), _FONT, scale, _GREY, thickness, cv2.LINE_AA)
        cv2.putText(strip, right, (x1 + margin, baseline), _FONT, scale, _GREY, thickness, cv2.LINE_AA)
    index = np.round(np.linspace(0, 255, max(x1 - x0, 1))).astype(np.intp)
    strip[0:height, x0:x1] = scheme.lut[index][None, :, :]
    cv2.rectangle(strip, (x0 - 1, 0), (x1, height - 1), _BORDER, 1)
    return strip


def _band(rows: Sequence[_Row], width: int, scale: float, thickness: int) -> np.ndarray:
    """Black band of caption rows (texts wrapped to the width, colour bars), with a gap above and below."""
    _, gap = _metrics(scale, thickness)
    strips = [np.zeros((gap, width, 3), np.uint8)]
    for row in rows:
        if isinstance(row, _Scheme):
            strips.append(_bar_strip(row, width, scale, thickness))
        else:
            for line in _wrap(row.text, width, scale, thickness):
                strips.append(_text_strip(line, row.colour, width, scale, thickness))
    strips.append(np.zeros((gap, width, 3), np.uint8))
    return np.vstack(strips)


def _thickness(width: int) -> int:
    return 1 if width < 700 else 2


# --- pictures ------------------------------------------------------------------------------------------


def _overlay_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(width, height) at source resolution, long side capped; small images enlarged to 512 (within cap)."""
    scale = min(1.0, max_side / max(height, width))
    if max(height, width) < _MIN_SIDE:
        scale = min(_MIN_SIDE, max_side) / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resized(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (values.shape[1], values.shape[0]) == size:
        return values
    shrink = size[0] < values.shape[1]
    return cv2.resize(values, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _grey_rgb(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as grey RGB levels 0..255 (clipped, truncated)."""
    levels = np.clip(values, 0, 1)
    levels *= 255  # in place: the numbers of ``clip(...) * 255`` without another temporary array
    return cv2.cvtColor(levels.astype(np.uint8), cv2.COLOR_GRAY2RGB)


def _blend(grey_rgb: np.ndarray, cam: np.ndarray, scheme: _Scheme, opacity: float) -> np.ndarray:
    """The grey image (:func:`_grey_rgb`) with the CAM in the scheme's colours on top, at a uniform
    opacity."""
    # cv2.LUT on the level in all three channels looks up the same colours as ``lut[levels]``, 5x faster
    heat = cv2.LUT(_grey_rgb(cam), scheme.lut.reshape(1, 256, 3))
    return cv2.addWeighted(grey_rgb, 1.0 - opacity, heat, opacity, 0.0)


def _caption_rows(result: ModelResult, analysis: AnalysisResult, scheme: _Scheme) -> list[_Row]:
    decision, consensus, legend, disclaimer = caption_lines(result, analysis)
    return [
        _Text(decision, _RED if result.positive else _WHITE),
        _Text(consensus, _RED if analysis.consensus else _WHITE),
        _Text(legend, _GREY),
        scheme,
        _Text(disclaimer, _YELLOW),
    ]


def _row_texts(rows: Sequence[_Row]) -> list[str]:
    return [r.text for r in rows if isinstance(r, _Text)]


def render_overlay(
    image: SourceImage, result: ModelResult, cfg: RenderConfig, analysis: AnalysisResult
) -> np.ndarray:
    """One model's CAM over the image at source resolution, with a caption band below.

    Parameters
    ----------
    image
        The grey source image.
    result
        The model whose CAM is drawn: in ``cfg.colormap`` as evidence for pneumonia if its decision is
        positive, in the fixed azure ramp as evidence for normal if it is negative.
    cfg
        ``max_side`` caps the long side (images under 512 px are enlarged to 512 within it), ``opacity``
        is the weight of the colours, ``colormap`` the positive scheme.
    analysis
        All models' results on this image: the caption states their consensus.

    Returns
    -------
    numpy.ndarray
        uint8 RGB, C-contiguous, shape (H + band, W, 3): the picture, then a black band with the decision,
        the consensus, the colour legend and bar, and the disclaimer.
    """
    scheme = _scheme(result, cfg)
    size = _overlay_size(image.height, image.width, cfg.max_side)
    picture = _blend(_grey_rgb(_resized(image.pixels, size)), _resized(result.cam, size), scheme, cfg.opacity)
    rows = _caption_rows(result, analysis, scheme)
    width, thickness = size[0], _thickness(size[0])
    band = _band(rows, width, _text_scale(_row_texts(rows), width, thickness), thickness)
    return np.ascontiguousarray(np.vstack([picture, band]))


def _panel(
    grey_rgb: np.ndarray, result: ModelResult, cfg: RenderConfig, negative_maps: bool
) -> tuple[list[_Row], np.ndarray, list[_Row]]:
    """One model's summary panel: rows above the picture, the picture, rows below it."""
    size = (grey_rgb.shape[1], grey_rgb.shape[0])
    title = [_Text(decision_line(result), _RED if result.positive else _WHITE)]
    if result.positive or negative_maps:
        scheme = _scheme(result, cfg)
        picture = _blend(grey_rgb, _resized(result.cam, size), scheme, cfg.opacity)
        return title, picture, [_Text(legend_line(result.positive), _GREY), scheme]
    return title, grey_rgb, [_Text("no map: negative decision", _GREY)]


def _pad_rows(block: np.ndarray, height: int) -> np.ndarray:
    return np.vstack([block, np.zeros((height - block.shape[0], *block.shape[1:]), np.uint8)])


def _panel_row(
    grey: np.ndarray, analysis: AnalysisResult, cfg: RenderConfig, negative_maps: bool
) -> np.ndarray:
    """Every model's panel (title, picture, legend) side by side, black gaps between them."""
    grey_rgb = _grey_rgb(grey)  # the same picture under every panel's map
    panels = [_panel(grey_rgb, r, cfg, negative_maps) for r in analysis.models.values()]
    width, thickness = grey.shape[1], 1
    # Sized so that the decision lines fit on one line; the longer legend lines wrap.
    titles = [t for above, _, _ in panels for t in _row_texts(above)]
    scale = _text_scale(titles, width, thickness, cap=0.8)
    tops = [_band(above, width, scale, thickness) for above, _, _ in panels]
    bottoms = [_band(below, width, scale, thickness) for _, _, below in panels]
    top_h, bottom_h = max(t.shape[0] for t in tops), max(b.shape[0] for b in bottoms)
    columns = [
        np.vstack([_pad_rows(top, top_h), picture, _pad_rows(bottom, bottom_h)])
        for top, (_, picture, _), bottom in zip(tops, panels, bottoms, strict=True)
    ]
    gap = np.zeros((columns[0].shape[0], _PANEL_GAP, 3), np.uint8)
    return np.hstack([part for column in columns for part in (gap, column)][1:])


def render_summary(
    image: SourceImage, analysis: AnalysisResult, cfg: RenderConfig, negative_maps: bool = False
) -> np.ndarray:
    """One picture per source image for a radiologist: every model's panel side by side.

    Parameters
    ----------
    image
        The grey source image.
    analysis
        All models' results on it, one panel each in their order.
    cfg
        ``opacity`` and ``colormap`` as for :func:`render_overlay`. ``max_side`` does not apply: every
        panel is 512 px on its long side, so the text stays legible and 3 panels stay under 1600 px.
    negative_maps
        Draw the CAM of negative decisions too (as evidence for normal, in the azure ramp). By default a
        negative model's panel shows the plain image and says "no map: negative decision".

    Returns
    -------
    numpy.ndarray
        uint8 RGB, C-contiguous: a header with the consensus in large type, the panels (each titled with
        its model's decision, its colour bar below), and a footer with the disclaimer.
    """
    size = _overlay_size(image.height, image.width, _PANEL_SIDE)
    body = _panel_row(_resized(image.pixels, size), analysis, cfg, negative_maps)

    width = body.shape[1]
    thickness = _thickness(width)
    consensus = [_Text(consensus_line(analysis), _RED if analysis.consensus else _WHITE)]
    header = _band(consensus, width, _text_scale(_row_texts(consensus), width, thickness, cap=1.3), thickness)
    shown = "positive and negative decisions" if negative_maps else "positive decisions only"
    note = [_Text(f"Grad-CAM maps drawn for {shown}", _GREY)]
    footer = [_Text(DISCLAIMER, _YELLOW)]
    small = _text_scale(_row_texts(footer + note), width, thickness, cap=0.8)
    return np.ascontiguousarray(
        np.vstack(
            [header, _band(note, width, small, thickness), body, _band(footer, width, small, thickness)]
        )
    )
