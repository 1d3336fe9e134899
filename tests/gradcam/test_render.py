"""Overlays: uint8 RGB, long side capped, caption band below, opacity and colour order."""

from __future__ import annotations

import numpy as np
import pytest

from gradcam.config import RenderConfig
from gradcam.preprocess import SourceImage
from gradcam.render import caption_lines, render_overlay
from gradcam.results import DISCLAIMER, ModelResult


def make_case(height: int, width: int, positive: bool = True) -> tuple[SourceImage, ModelResult]:
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = ((xx / (width - 1)) * 0.8 + 0.1).astype(np.float32)  # a left-to-right grey ramp
    cam = np.zeros((height, width), np.float32)
    cam[: height // 3, : width // 3] = 1.0  # hot top-left corner, cold elsewhere
    result = ModelResult(
        model="ResNet18",
        builder="resnet18",
        probability=0.8123 if positive else 0.1,
        threshold=0.25,
        positive=positive,
        cam=cam,
        cam_peak=(height // 6, width // 6),
        checkpoint_sha256="0" * 64,
        ms=1.0,
    )
    return SourceImage(pixels=pixels, source="test"), result


def test_output_is_uint8_rgb_with_a_caption_band_below() -> None:
    image, result = make_case(480, 640)
    out = render_overlay(image, result, RenderConfig(max_side=1024, opacity=0.4))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    assert out.shape[1] == 640 and out.shape[0] > 480 + 20
    band = out[480:]
    assert (band == 0).all(axis=2).mean() > 0.5  # mostly the dark band background
    text = band.any(axis=2)
    assert text.sum() > 50, "no caption text drawn"
    assert not text[:, -1].any(), "caption runs off the right edge"
    yellow = (band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 80)
    assert yellow.sum() > 10, "the disclaimer line (yellow) is missing"
    rows = np.flatnonzero(yellow.any(axis=1))
    assert rows[-1] - rows[0] >= 7, "disclaimer text too small to read"
    # The band is not a copy of the image: the image area has no black rows.
    assert (out[:480].max(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize(("height", "width", "expected"), [(600, 900, (171, 256)), (900, 300, (256, 85))])
def test_long_side_is_capped(height: int, width: int, expected: tuple[int, int]) -> None:
    image, result = make_case(height, width)
    out = render_overlay(image, result, RenderConfig(max_side=256, opacity=0.4))
    assert out.shape[1] == expected[1]
    # Image rows end where the black band begins.
    image_rows = int(np.argmax(out.max(axis=(1, 2)) == 0))
    assert image_rows == expected[0]


def test_small_image_is_enlarged_for_a_legible_caption() -> None:
    image, result = make_case(70, 90)
    out = render_overlay(image, result, RenderConfig(max_side=1024))
    assert out.shape[1] == 512 and out[398:].any(axis=2).sum() > 50
    # ...but never beyond max_side.
    assert render_overlay(image, result, RenderConfig(max_side=90)).shape[1] == 90


def test_opacity_zero_shows_the_grey_image_unchanged() -> None:
    image, result = make_case(120, 160)
    out = render_overlay(image, result, RenderConfig(opacity=0.0, max_side=160))
    grey = (image.pixels * 255).astype(np.uint8)
    for c in range(3):
        assert np.abs(out[:120, :, c].astype(int) - grey).max() <= 1


def test_opacity_one_shows_the_heatmap_in_rgb_order() -> None:
    image, result = make_case(120, 160)
    out = render_overlay(image, result, RenderConfig(opacity=1.0, colormap="jet", max_side=160)).astype(int)
    hot, cold = out[10, 10], out[100, 140]
    assert hot[0] > hot[2] + 60, f"hot area should be red: {hot}"  # jet: high = red
    assert cold[2] > cold[0] + 60, f"cold area should be blue: {cold}"  # jet: low = blue
    assert (out[:120, 140] == out[0, 140]).all()  # the image itself does not show through


def test_caption_names_model_probability_threshold_decision_and_disclaimer() -> None:
    image, positive = make_case(480, 640, positive=True)
    _, negative = make_case(480, 640, positive=False)
    first, last = caption_lines(positive)
    assert "ResNet18" in first and "0.812" in first and "0.250" in first and "POSITIVE" in first
    assert last == DISCLAIMER
    assert "negative" in caption_lines(negative)[0]
    red = render_overlay(image, positive, RenderConfig())[480:]
    white = render_overlay(image, negative, RenderConfig())[480:]
    redish = (red[..., 0] > 200) & (red[..., 1] < 140) & (red[..., 2] < 140)
    assert redish.sum() > 10 and not ((white[..., 0] > 200) & (white[..., 1] < 140)).any()
