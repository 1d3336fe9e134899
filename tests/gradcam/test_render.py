"""Overlays and summaries: size, colour schemes by decision, colour bar, unambiguous caption, consensus."""

from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np
import pytest

from gradcam.config import COLORMAPS, RenderConfig
from gradcam.preprocess import SourceImage
from gradcam.render import caption_lines, render_overlay, render_summary
from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult, format_pair

NAMES = ("ResNet18", "EfficientNet-B0", "DenseNet121")


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


def analysis_of(*results: ModelResult) -> AnalysisResult:
    first = results[0]
    return AnalysisResult("test", first.cam.shape[0], first.cam.shape[1], {r.model: r for r in results})


def three_models(height: int, width: int, positives: tuple[bool, ...]) -> tuple[SourceImage, AnalysisResult]:
    """One model per entry of ``positives``, named after NAMES, each with its own CAM."""
    image, base = make_case(height, width)
    results = []
    for name, positive in zip(NAMES, positives, strict=False):
        p = 0.7 if positive else 0.05
        results.append(dataclasses.replace(base, model=name, probability=p, positive=positive))
    return image, analysis_of(*results)


def jet_lut() -> np.ndarray:
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return cv2.applyColorMap(ramp, COLORMAPS["jet"])[:, 0, ::-1].astype(int)


def strongly_red(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return (r > g + 30) & (r > b + 30)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def colour_bar(band: np.ndarray) -> np.ndarray:
    """The middle row of the band's colour bar (its longest run of coloured pixels), or fail."""
    rgb = band.astype(int)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) >= 30
    rows = np.flatnonzero(coloured.mean(axis=1) > 0.5)
    assert rows.size >= 3, "no colour bar in the caption band"
    row = rgb[rows[rows.size // 2]]
    start, stop = max(runs(coloured[rows[rows.size // 2]]), key=lambda r: r[1] - r[0])
    return row[start:stop]


def text_runs(band: np.ndarray) -> list[tuple[int, int]]:
    return runs(band.any(axis=2).any(axis=1))


# --- geometry ------------------------------------------------------------------------------------------


def test_output_is_uint8_rgb_with_a_caption_band_below() -> None:
    image, result = make_case(480, 640)
    out = render_overlay(image, result, RenderConfig(max_side=1024, opacity=0.4), analysis_of(result))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    assert out.shape[1] == 640 and out.shape[0] > 480 + 20
    band = out[480:]
    assert (band == 0).all(axis=2).mean() > 0.5  # mostly the dark band background
    text = band.any(axis=2)
    assert text.sum() > 50, "no caption text drawn"
    assert not text[:, -1].any(), "caption runs off the right edge"
    start, stop = text_runs(band)[-1]  # the last line: the disclaimer, in yellow
    last = band[start:stop]
    yellow = (last[..., 0] > 200) & (last[..., 1] > 150) & (last[..., 2] < 80)
    assert yellow.sum() > 10, "the disclaimer line (yellow) is missing"
    assert stop - start >= 7, "disclaimer text too small to read"
    # The band is not a copy of the image: the image area has no black rows.
    assert (out[:480].max(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize(("height", "width", "expected"), [(600, 900, (171, 256)), (900, 300, (256, 85))])
def test_long_side_is_capped(height: int, width: int, expected: tuple[int, int]) -> None:
    image, result = make_case(height, width)
    out = render_overlay(image, result, RenderConfig(max_side=256, opacity=0.4), analysis_of(result))
    assert out.shape[1] == expected[1]
    # Image rows end where the black band begins.
    image_rows = int(np.argmax(out.max(axis=(1, 2)) == 0))
    assert image_rows == expected[0]


def test_small_image_is_enlarged_for_a_legible_caption() -> None:
    image, result = make_case(70, 90)
    analysis = analysis_of(result)
    out = render_overlay(image, result, RenderConfig(max_side=1024), analysis)
    assert out.shape[1] == 512 and out[398:].any(axis=2).sum() > 50
    # ...but never beyond max_side.
    assert render_overlay(image, result, RenderConfig(max_side=90), analysis).shape[1] == 90


@pytest.mark.parametrize("positive", [True, False])
def test_opacity_zero_shows_the_grey_image_unchanged(positive: bool) -> None:
    image, result = make_case(120, 160, positive)
    out = render_overlay(image, result, RenderConfig(opacity=0.0, max_side=160), analysis_of(result))
    grey = (image.pixels * 255).astype(np.uint8)
    for c in range(3):
        assert np.abs(out[:120, :, c].astype(int) - grey).max() <= 1


def test_opacity_one_shows_the_heatmap_in_rgb_order() -> None:
    image, result = make_case(120, 160)
    cfg = RenderConfig(opacity=1.0, colormap="jet", max_side=160)
    out = render_overlay(image, result, cfg, analysis_of(result)).astype(int)
    hot, cold = out[10, 10], out[100, 140]
    assert hot[0] > hot[2] + 60, f"hot area should be red: {hot}"  # jet: high = red
    assert cold[2] > cold[0] + 60, f"cold area should be blue: {cold}"  # jet: low = blue
    assert (out[:120, 140] == out[0, 140]).all()  # the image itself does not show through


# --- colour schemes and colour bar ---------------------------------------------------------------------


@pytest.mark.parametrize("opacity", [0.4, 1.0])
def test_negative_map_has_none_of_the_positive_hot_colours(opacity: float) -> None:
    image, positive = make_case(120, 160, positive=True)
    negative = dataclasses.replace(positive, positive=False, probability=0.1)
    analysis = analysis_of(positive)
    cfg = RenderConfig(opacity=opacity, colormap="jet", max_side=160)
    pos = render_overlay(image, positive, cfg, analysis)[:120]
    neg = render_overlay(image, negative, cfg, analysis)[:120]
    hot = (slice(0, 40), slice(0, 53))  # where the CAM is 1
    assert strongly_red(pos[hot]).mean() > 0.9, "the positive map should be red where the CAM is high"
    assert not strongly_red(neg).any(), "a negative decision's map must show no red"
    r, g, b = (neg[hot][..., c].astype(int) for c in range(3))
    assert ((b > r + 40 * opacity) & (b >= g)).all(), "the negative map's high end should be blue"
    yellow = (r > 150) & (g > 150) & (b < 100)
    assert not yellow.any()


def test_negative_scheme_is_fixed_whatever_the_configured_colormap() -> None:
    image, result = make_case(120, 160, positive=False)
    analysis = analysis_of(result)
    outs = [
        render_overlay(image, result, RenderConfig(opacity=1.0, colormap=name, max_side=160), analysis)
        for name in COLORMAPS
    ]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
    positives = [
        render_overlay(image, dataclasses.replace(result, positive=True), RenderConfig(colormap=n), analysis)
        for n in COLORMAPS
    ]
    assert not any(np.array_equal(outs[0][:120], p[:120]) for p in positives)


def test_positive_overlay_carries_a_colour_bar_running_through_its_colormap() -> None:
    image, result = make_case(480, 640)
    out = render_overlay(image, result, RenderConfig(colormap="jet"), analysis_of(result))
    bar = colour_bar(out[480:])
    assert bar.shape[0] > 0.4 * 640, "colour bar too short"
    lut = jet_lut()
    distance = np.abs(bar[:, None, :] - lut[None, :, :]).sum(axis=2)
    index = distance.argmin(axis=1)
    assert distance.min(axis=1).max() <= 6, "bar colours are not the colormap's"
    assert (np.diff(index) >= 0).all(), "bar is not monotonic through the colormap"
    assert index[0] <= 8 and index[-1] >= 247, "bar does not run from low to high"


def test_negative_overlay_carries_a_blue_colour_bar_dark_to_bright() -> None:
    image, result = make_case(480, 640, positive=False)
    out = render_overlay(image, result, RenderConfig(colormap="jet"), analysis_of(result))
    band = out[480:]
    bar = colour_bar(band)
    assert bar.shape[0] > 0.4 * 640
    assert (bar[:, 2] > bar[:, 0]).all() and not strongly_red(bar).any()
    brightness = bar.sum(axis=1)
    assert (np.diff(brightness) >= 0).all() and brightness[0] < 150 and bar[-1, 2] > 240


def test_legend_says_what_the_colours_mean() -> None:
    _, positive = make_case(48, 64, positive=True)
    negative = dataclasses.replace(positive, positive=False, probability=0.1)
    analysis = analysis_of(positive)
    pos_legend = caption_lines(positive, analysis)[2]
    neg_legend = caption_lines(negative, analysis)[2]
    assert "evidence for PNEUMONIA" in pos_legend and "NORMAL" not in pos_legend
    assert "evidence for NORMAL" in neg_legend and "PNEUMONIA" not in neg_legend
    for legend in (pos_legend, neg_legend):
        assert "Grad-CAM" in legend and "relative" in legend and "low 0" in legend and "1 high" in legend


# --- caption text --------------------------------------------------------------------------------------

LINE = re.compile(
    r"^(?P<model>\S+): (?P<decision>POSITIVE|negative)  p=(?P<p>[\d.]+) (?P<op>>=|<) threshold (?P<t>[\d.]+)$"
)


def check_decision_line(result: ModelResult, line: str) -> tuple[str, str]:
    match = LINE.match(line)
    assert match, line
    p, t, op = match["p"], match["t"], match["op"]
    assert match["model"] == result.model
    assert (match["decision"] == "POSITIVE") == result.positive == (op == ">=")
    assert (float(p) >= float(t)) if op == ">=" else (float(p) < float(t)), line
    assert p != t or result.probability == result.threshold, f"p and threshold print equal: {line}"
    assert len(p.split(".")[1]) >= 3 and len(t.split(".")[1]) >= 3
    return p, t


@pytest.mark.parametrize(
    ("p", "t", "expected"),
    [
        (0.38331, 0.3833, "ResNet18: POSITIVE  p=0.38331 >= threshold 0.38330"),
        (0.38329, 0.3833, "ResNet18: negative  p=0.38329 < threshold 0.38330"),
        (0.412, 0.383, "ResNet18: POSITIVE  p=0.412 >= threshold 0.383"),
        (0.031, 0.065, "ResNet18: negative  p=0.031 < threshold 0.065"),
        (0.5, 0.5, "ResNet18: POSITIVE  p=0.500 >= threshold 0.500"),
    ],
)
def test_decision_line_is_never_ambiguous(p: float, t: float, expected: str) -> None:
    _, base = make_case(48, 64)
    result = dataclasses.replace(base, probability=p, threshold=t, positive=p >= t)
    first = caption_lines(result, analysis_of(result))[0]
    assert first == expected
    check_decision_line(result, first)


def test_decision_lines_agree_with_their_numbers_near_the_threshold() -> None:
    rng = np.random.default_rng(0)
    _, base = make_case(48, 64)
    for _ in range(500):
        t = float(rng.uniform(0.001, 0.999))
        p = float(np.clip(t + rng.normal(0, 10.0 ** -rng.integers(3, 9)), 0, 1))
        result = dataclasses.replace(base, probability=p, threshold=t, positive=p >= t)
        check_decision_line(result, caption_lines(result, analysis_of(result))[0])


@pytest.mark.parametrize(
    ("p", "t", "expected"),
    [
        (0.873123, 0.25, ("0.873123", "0.25")),  # the threshold as configured
        (0.38329996, 0.3833, ("0.38329996", "0.38330000")),  # not "p=0.383300 < threshold 0.3833"
        (0.3833, 0.3833, ("0.383300", "0.3833")),
    ],
)
def test_the_texts_of_dicom_outputs_never_contradict_the_decision(
    p: float, t: float, expected: tuple[str, str]
) -> None:
    assert format_pair(p, t, 6, threshold_as_set=True) == expected


def test_pairs_with_the_threshold_as_set_agree_with_their_numbers_near_it() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        t = round(float(rng.uniform(0.001, 0.999)), int(rng.integers(1, 9)))
        p = float(np.clip(t + rng.normal(0, 10.0 ** -rng.integers(3, 10)), 0, 1))
        shown_p, shown_t = format_pair(p, t, 6, threshold_as_set=True)
        assert (float(shown_p) >= float(shown_t)) == (p >= t), (p, t, shown_p, shown_t)
        assert shown_p != shown_t or p == t, (p, t)


@pytest.mark.parametrize(
    ("positives", "expected"),
    [
        (
            (True, False, False),
            "Consensus of 3 models: NEGATIVE  (1 of 3 positive; majority vote, tie = positive)",
        ),
        (
            (True, True, False),
            "Consensus of 3 models: POSITIVE  (2 of 3 positive; majority vote, tie = positive)",
        ),
        ((True, False), "Consensus of 2 models: POSITIVE  (1 of 2 positive; majority vote, tie = positive)"),
        ((False,), "Consensus of 1 model: NEGATIVE  (0 of 1 positive; majority vote, tie = positive)"),
    ],
)
def test_every_caption_states_the_consensus_and_the_disclaimer(
    positives: tuple[bool, ...], expected: str
) -> None:
    _, analysis = three_models(48, 64, positives)
    for result in analysis.models.values():
        lines = caption_lines(result, analysis)
        check_decision_line(result, lines[0])
        assert lines[1] == expected
        assert lines[-1] == DISCLAIMER


def test_decision_line_is_red_only_when_positive() -> None:
    image, analysis = three_models(480, 640, (True, False, False))
    positive, negative, _ = analysis.models.values()
    red = render_overlay(image, positive, RenderConfig(), analysis)[480:]
    white = render_overlay(image, negative, RenderConfig(), analysis)[480:]
    first = text_runs(red)[0]
    redish = (red[..., 0] > 200) & (red[..., 1] < 140) & (red[..., 2] < 140)
    assert redish[first[0] : first[1]].sum() > 10
    # Negative model, negative consensus: no red anywhere in the band (text or colour bar).
    assert not ((white[..., 0] > 200) & (white[..., 1] < 140)).any()


# --- summary -------------------------------------------------------------------------------------------


def panels(out: np.ndarray) -> list[tuple[slice, slice]]:
    """(rows, columns) of each picture in a summary: columns mostly non-black, rows entirely non-black."""
    lit = out.max(axis=2) > 0
    found = []
    for c0, c1 in runs(lit.mean(axis=0) > 0.4):
        r0, r1 = max(runs(lit[:, c0:c1].all(axis=1)), key=lambda r: r[1] - r[0])
        found.append((slice(r0, r1), slice(c0, c1)))
    return found


def is_grey(rgb: np.ndarray) -> bool:
    return bool((np.ptp(rgb.astype(int), axis=2) <= 1).all())


@pytest.mark.parametrize("positives", [(True, False, False), (False, True), (True,)])
def test_summary_has_one_panel_per_model(positives: tuple[bool, ...]) -> None:
    image, analysis = three_models(480, 640, positives)
    out = render_summary(image, analysis, RenderConfig())
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
    found = panels(out)
    assert len(found) == len(positives)
    for rows, cols in found:
        assert (cols.stop - cols.start, rows.stop - rows.start) == (512, 384)  # 512 px on the long side
    assert out.shape[1] <= 1600
    # Panels keep 512 px (legible titles) whatever max_side caps the overlays to.
    narrow = render_summary(image, analysis, RenderConfig(max_side=256))
    assert [(c.stop - c.start, r.stop - r.start) for r, c in panels(narrow)] == [(512, 384)] * len(positives)


def test_summary_draws_no_map_for_a_negative_model_unless_asked() -> None:
    image, analysis = three_models(480, 640, (True, False, False))
    hot = (slice(0, 100), slice(0, 140))  # within the CAM's hot corner (a third of each side)
    plain = render_summary(image, analysis, RenderConfig(colormap="jet"))
    pos, neg1, neg2 = (plain[r, c] for r, c in panels(plain))
    assert strongly_red(pos[hot]).mean() > 0.9, "the positive model's map is missing"
    assert is_grey(neg1) and is_grey(neg2), "a negative model's panel must show the plain image"

    drawn = render_summary(image, analysis, RenderConfig(colormap="jet"), negative_maps=True)
    pos, neg1, neg2 = (drawn[r, c] for r, c in panels(drawn))
    assert strongly_red(pos[hot]).mean() > 0.9
    for neg in (neg1, neg2):
        assert not is_grey(neg) and not strongly_red(neg).any()
        assert (neg[hot][..., 2].astype(int) > neg[hot][..., 0] + 30).all(), "normal evidence is blue"


def test_summary_header_states_the_consensus_in_large_type_and_footer_the_disclaimer() -> None:
    for positives, consensus_red in (((True, False, False), False), ((True, True, False), True)):
        image, analysis = three_models(480, 640, positives)
        out = render_summary(image, analysis, RenderConfig())
        lines = text_runs(out[: panels(out)[0][0].start])
        header, title = out[slice(*lines[0])], out[slice(*lines[-1])]
        redish = (header[..., 0] > 200) & (header[..., 1] < 140)
        assert redish.any() == consensus_red
        assert header.shape[0] > 1.5 * title.shape[0], "consensus not in large type"
        below = out[panels(out)[0][0].stop :]
        footer = below[slice(*text_runs(below)[-1])]
        yellow = (footer[..., 0] > 200) & (footer[..., 1] > 150) & (footer[..., 2] < 80)
        assert yellow.sum() > 50, "the disclaimer (yellow) is missing from the footer"
