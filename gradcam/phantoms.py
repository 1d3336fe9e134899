"""Synthetic chest radiograph phantoms with labelled "consolidations", deterministic for a seed.

Synthetic data only: the names, IDs and UIDs are made up; no patient data is involved anywhere.

Image ``i`` of seed ``s`` is drawn from its own generators (anatomy, geometry, exposure and noise
``[s, i, 0]``; label ``[s, i, 1]``: positive with probability ``positive_fraction``, a per-image draw;
lesions ``[s, i, 2, attempt]``; distractors ``[s, i, 4]``), so it is the same whatever ``count`` is, and
the positive and negative versions of one index share the anatomy, the distractors and the noise.

Anatomy: body habitus, two lung fields with diaphragm domes and costophrenic angles, posterior and anterior
ribs, clavicles, spine, trachea, heart with aortic knob, hila and vessel markings, gastric bubble; then
rotation (+-7 degrees), zoom, shift, exposure (gamma, gain, offset), detector blur, quantum noise,
collimation bands and side markers. Positives carry 1-2 irregular, textured opacities inside a lung field
(equivalent diameter about 14-33 % of the width); both classes may carry small calcified granulomas or ECG
electrodes. Smooth structures are drawn at most at 256 px and upscaled; noise is added at full size.
Pixel values are attenuation-like: bright = dense, as on a light box.

A generated folder: ``images/phantom_<seed>_<i:05d>.png`` (16-bit grey) and/or ``.dcm`` with the same
stem, ``masks/<stem>.png`` (uint8 0/255) for positives and ``labels.csv`` (``file,label,mask,boxes``; with
``--format both`` ``file`` names the PNG and the DICOM lies beside it).
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

_DICOM_HELPERS = ("phantom_dataset", "write_dicom", "header_variant")
__all__ = [
    "Phantom",
    "make_phantom",
    "phantom_label",
    "generate_dataset",
    "phantom_uid",
    *_DICOM_HELPERS,
]

FORMATS = ("png", "dicom", "both")


@dataclass(frozen=True)
class Phantom:
    """One phantom: ``image`` float32 in [0, 1] (display space), ``mask`` uint8 0/255 of the lesions,
    ``boxes`` as (x0, y0, x1, y1) pixel boxes (x1, y1 exclusive)."""

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)
    boxes: tuple[tuple[int, int, int, int], ...]
    positive: bool
    params: dict[str, Any] = field(default_factory=dict)


def phantom_uid(seed: int, index: int, kind: str) -> str:
    """A deterministic UID ('2.25.' + 128 bits of sha256) for phantom studies, series and instances."""
    digest = hashlib.sha256(f"gradcam-node-phantom|{seed}|{index}|{kind}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def phantom_label(seed: int, index: int, positive_fraction: float) -> bool:
    """Whether image ``index`` is positive: its own draw, so independent of the data set's size."""
    return bool(np.random.default_rng([seed, index, 1]).random() < positive_fraction)


_WORK = 256  # anatomy and lesions are smooth: drawn at most at this size, then upscaled


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    return np.meshgrid(ax, ax)  # xx (columns), yy (rows), both in [-1, 1]


def _pts(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Normalised [-1, 1] coordinates to cv2 fixed-point pixel points (``shift=4``)."""
    return (np.stack([(x + 1) / 2 * n, (y + 1) / 2 * n], -1) * 16).astype(np.int32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), max(sigma, 0.3))


def _smooth_noise(rng: np.random.Generator, n: int, scale: int, sigma: float) -> np.ndarray:
    small = _blur(rng.standard_normal((scale, scale), dtype=np.float32), sigma)
    small /= small.std() + 1e-6
    return cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC)


def _anatomy_params(rng: np.random.Generator) -> dict[str, float]:
    body_w = rng.uniform(0.84, 1.04)
    p = {
        "body_w": body_w,
        "neck_w": rng.uniform(0.2, 0.28),
        "shoulder_y": rng.uniform(-1.0, -0.82),
        "lung_top": rng.uniform(-0.8, -0.66),
        "lung_lat": rng.uniform(0.62, min(0.82, body_w - 0.1)),
        "lung_med": rng.uniform(0.07, 0.12),
        "cp_y": rng.uniform(0.42, 0.66),
        "dome_h": rng.uniform(0.1, 0.2),
        "left_drop": rng.uniform(0.0, 0.07),
        "heart_x": rng.uniform(0.08, 0.17),
        "heart_rx": rng.uniform(0.3, 0.42),
        "heart_ry": rng.uniform(0.2, 0.28),
        "heart_angle": rng.uniform(-28, -8),
        "soft_density": rng.uniform(0.5, 0.62),
        "air": rng.uniform(0.4, 0.5),
    }
    return p


def _lung_polygon(p: dict[str, float], side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outline of one lung (``side`` -1: image left, patient's right) in normalised coordinates."""
    top = p["lung_top"] + rng.uniform(-0.03, 0.03)
    cp = p["cp_y"] + (p["left_drop"] if side > 0 else 0.0)
    lat = p["lung_lat"] + rng.uniform(-0.03, 0.03)
    med = p["lung_med"] + (0.03 if side > 0 else 0.0)
    apex = med + rng.uniform(0.1, 0.16)
    t = np.linspace(0, 1, 20)
    lat_q = apex + (lat - apex) * np.sin(np.minimum(t / 0.6, 1) * np.pi / 2) ** 0.6 + 0.02 * np.sin(np.pi * t)
    lat_y = top + (cp - top) * t
    s = np.linspace(0, 1, 16)[1:]
    dome_q = lat + (med - lat) * s
    dome_y = cp + 0.04 * s - p["dome_h"] * np.sin(np.pi * s**0.8) ** 0.7
    m = np.linspace(0, 1, 8)[1:]
    med_q = med + 0.015 * (1 - m)
    med_y = cp + 0.04 + (top + 0.09 - cp - 0.04) * m
    a = np.linspace(0, np.pi / 2, 6)[1:-1]
    arc_q = med + (apex - med) * np.sin(a)
    arc_y = top + 0.09 - 0.09 * np.sin(a)
    q = np.concatenate([lat_q, dome_q, med_q, arc_q])
    y = np.concatenate([lat_y, dome_y, med_y, arc_y])
    return side * q, y


def _ribs(rng: np.random.Generator, n: int, p: dict[str, float]) -> np.ndarray:
    """Posterior ribs (droop laterally) and fainter anterior ribs (slope down medially)."""
    canvas = np.zeros((n, n), np.float32)
    count = int(rng.integers(9, 12))
    span = p["cp_y"] - p["lung_top"] + 0.12
    thick = max(1, round(n * rng.uniform(0.022, 0.03)))
    q = np.linspace(0.06, p["lung_lat"] + 0.08, 18)
    for side in (-1, 1):
        for k in range(count):
            y0 = p["lung_top"] - 0.06 + (k + rng.uniform(-0.15, 0.15)) * span / count
            bend = rng.uniform(0.45, 0.65)
            y = y0 - 0.16 * q + bend * q**2
            cv2.polylines(canvas, [_pts(side * q, y, n)], False, 1.0, thick, cv2.LINE_AA, 4)
        for k in range(int(rng.integers(5, 8))):
            y0 = p["lung_top"] + 0.05 + (k + rng.uniform(-0.1, 0.1)) * span / 7
            qa = np.linspace(p["lung_lat"] + 0.04, rng.uniform(0.2, 0.3), 10)
            y = y0 + rng.uniform(0.35, 0.5) * (p["lung_lat"] - qa)
            cv2.polylines(canvas, [_pts(side * qa, y, n)], False, 0.45, max(1, thick - 1), cv2.LINE_AA, 4)
    return _blur(canvas, thick * 0.35) * rng.uniform(0.05, 0.09)


def _clavicles(rng: np.random.Generator, n: int, p: dict[str, float]) -> np.ndarray:
    canvas = np.zeros((n, n), np.float32)
    y0 = p["lung_top"] + rng.uniform(0.0, 0.1)
    thick = max(2, round(n * 0.03))
    q = np.linspace(0.05, rng.uniform(0.5, 0.62), 12)
    for side in (-1, 1):
        y = y0 + 0.06 - 0.22 * q + 0.03 * np.sin(q / 0.6 * 2 * np.pi)
        cv2.polylines(canvas, [_pts(side * q, y, n)], False, 1.0, thick, cv2.LINE_AA, 4)
    return _blur(canvas, thick * 0.4) * rng.uniform(0.07, 0.11)


def _vessels(rng: np.random.Generator, n: int, p: dict[str, float]) -> np.ndarray:
    """Branching vessel markings radiating from the hila."""
    canvas = np.zeros((n, n), np.float32)
    for side in (-1, 1):
        hx, hy = side * (p["lung_med"] + 0.08), rng.uniform(-0.2, -0.05)
        cv2.circle(
            canvas, tuple(_pts(np.float32(hx), np.float32(hy), n).tolist()), n // 28, 0.8, -1, cv2.LINE_AA, 4
        )
        for _ in range(int(rng.integers(12, 18))):
            ang = rng.uniform(-0.45, 0.5) * np.pi  # outward, from up-lateral to down-lateral
            steps = rng.uniform(0.025, 0.04) * np.ones(9)
            turns = np.cumsum(rng.normal(0, 0.25, 9)) + ang
            x = hx + side * np.concatenate([[0], np.cumsum(steps * np.cos(turns))])
            y = hy + np.concatenate([[0], np.cumsum(steps * np.sin(turns))])
            pts = _pts(x, y, n)
            for j in range(9):
                width = max(1, round((1 - j / 9) * n / 90))
                cv2.line(
                    canvas,
                    tuple(pts[j].tolist()),
                    tuple(pts[j + 1].tolist()),
                    1.0 - j / 12,
                    width,
                    cv2.LINE_AA,
                    4,
                )
    return _blur(canvas, 0.7)


def _anatomy(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Attenuation-like image (bright = dense) and the lesion-eligible lung mask, at ``n`` pixels."""
    p = _anatomy_params(rng)
    xx, yy = _grid(n)
    # Body: a cylinder-like thickness profile, narrowing over the shoulders to the neck.
    t = np.clip((yy - p["shoulder_y"]) / 0.3, 0, 1)
    half = p["neck_w"] + (p["body_w"] - p["neck_w"]) * (t * t * (3 - 2 * t))
    body = np.sqrt(np.clip(1 - (xx / half) ** 2, 0, 1))
    img = 0.03 + p["soft_density"] * (0.55 + 0.45 * body) * (body > 0)
    img = _blur(img.astype(np.float32), n * 0.006)
    lungs = np.zeros((n, n), np.uint8)
    for side in (-1, 1):
        cv2.fillPoly(lungs, [_pts(*_lung_polygon(p, side, rng), n)], 1, cv2.LINE_AA, 4)
    depth = cv2.distanceTransform((lungs > 0).astype(np.uint8), cv2.DIST_L2, 3) / (n * 0.06)
    depth = _blur(np.sqrt(np.clip(depth, 0, 1)), n * 0.008)
    # Heart (with the aortic knob) on the image's right: the patient's left on a PA/AP view.
    heart = np.zeros((n, n), np.float32)
    hy = p["cp_y"] + p["left_drop"] - p["dome_h"] * 0.6 - p["heart_ry"] * 0.55
    c = _pts(np.float32(p["heart_x"]), np.float32(hy), n).tolist()
    axes = (int(p["heart_rx"] * n / 2 * 16), int(p["heart_ry"] * n / 2 * 16))
    cv2.ellipse(heart, c, axes, p["heart_angle"], 0, 360, 1.0, -1, cv2.LINE_AA, 4)
    knob = _pts(np.float32(0.1 + 0.05 * rng.random()), np.float32(hy - p["heart_ry"] - 0.1), n).tolist()
    cv2.circle(heart, knob, int(n * 0.045 * 16), 0.8, -1, cv2.LINE_AA, 4)
    heart = _blur(heart, n * 0.012)
    img = img - p["air"] * depth * (1 - 0.85 * heart) + 0.04 * heart
    lung_mask = (depth > 0.35) & (heart < 0.3)
    # Mediastinum: spine with vertebral bodies, the trachea's air column, denser liver under the right dome.
    verts = 0.75 + 0.25 * np.cos((yy - rng.uniform(0, 0.12)) / 0.12 * np.pi) ** 2
    img += np.exp(-((xx / 0.06) ** 4)) * 0.045 * verts * body
    carina = rng.uniform(-0.4, -0.25)
    img -= np.exp(-((xx + 0.01) ** 2) / 0.0008) * 0.07 * np.clip((carina - yy) * 8, 0, 1)
    img += (1 - depth) * np.clip((yy - p["cp_y"] + 0.1) * 5, 0, 1) * 0.04 * body
    if rng.random() < 0.45:  # gastric air bubble under the left dome
        bubble = np.zeros((n, n), np.float32)
        cb = _pts(
            np.float32(rng.uniform(0.25, 0.45)), np.float32(p["cp_y"] + p["left_drop"] + 0.05), n
        ).tolist()
        cv2.ellipse(bubble, cb, (int(n * 0.07 * 16), int(n * 0.04 * 16)), 0, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
        img -= _blur(bubble, n * 0.01) * rng.uniform(0.08, 0.15) * (1 - depth)
    img += _vessels(rng, n, p) * depth * rng.uniform(0.03, 0.05)
    img += depth * 0.035 * np.abs(_smooth_noise(rng, n, 40, 1.0))
    img += _ribs(rng, n, p) * (0.25 + 0.75 * depth) * (1 - 0.6 * heart)
    img += _clavicles(rng, n, p)
    return img.astype(np.float32), lung_mask, p


def _lesions(
    rng: np.random.Generator, n: int, lung_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """1-2 consolidations: irregular, textured soft opacities inside a lung field; (density, support)."""
    density = np.zeros((n, n), np.float32)
    support = np.zeros((n, n), np.uint8)
    info: list[dict[str, float]] = []
    inner = cv2.erode(lung_mask.astype(np.uint8), np.ones((max(3, n // 14),) * 2, np.uint8))
    ys, xs = np.nonzero(inner if inner.any() else lung_mask)
    if len(ys) == 0:
        return density, support, info
    xx, yy = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))
    for _ in range(1 if rng.random() < 0.7 else 2):
        j = int(rng.integers(len(ys)))
        cy, cx = float(ys[j]), float(xs[j])
        d = rng.uniform(0.15, 0.3) * n
        ax, ay = d / 2 * rng.uniform(0.75, 1.3), d / 2 * rng.uniform(0.75, 1.3)
        ang = rng.uniform(0, math.pi)
        u = ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / ax
        v = (-(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)) / ay
        field_ = 1.0 - (u**2 + v**2) + 0.5 * _smooth_noise(rng, n, 20, 1.0)
        blob = (field_ > 0).astype(np.uint8) & lung_mask.astype(np.uint8)
        blob = cv2.morphologyEx(blob, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if blob.sum() < math.pi / 4 * (0.14 * n) ** 2:  # cut to a sliver by the lung border: too small
            continue
        contrast = rng.uniform(0.13, 0.27)
        soft = _blur(blob.astype(np.float32), n * rng.uniform(0.012, 0.025))
        texture = np.clip(0.8 + 0.3 * _smooth_noise(rng, n, 48, 1.2), 0.35, 1.3)
        density += soft * contrast * texture
        support |= blob
        info.append({"cx": cx / n, "cy": cy / n, "diameter": d / n, "contrast": contrast})
    return density, support, info


def _distractors(rng: np.random.Generator, n: int, lung_mask: np.ndarray) -> np.ndarray:
    """Small findings that are not consolidations, in either class: calcified granulomas, ECG electrodes."""
    canvas = np.zeros((n, n), np.float32)
    ys, xs = np.nonzero(lung_mask)
    if len(ys) and rng.random() < 0.35:
        for _ in range(int(rng.integers(1, 4))):
            j = int(rng.integers(len(ys)))
            cv2.circle(
                canvas,
                (int(xs[j] * 16), int(ys[j] * 16)),
                int(n * rng.uniform(0.006, 0.014) * 16),
                rng.uniform(0.12, 0.25),
                -1,
                cv2.LINE_AA,
                4,
            )
    if rng.random() < 0.12:
        for _ in range(int(rng.integers(2, 5))):
            c = (int(rng.uniform(0.15, 0.85) * n), int(rng.uniform(0.2, 0.8) * n))
            cv2.circle(canvas, c, max(2, n // 45), 0.35, max(1, n // 128), cv2.LINE_AA)
            end = (int(c[0] + rng.uniform(-0.3, 0.3) * n), n - 1)
            cv2.line(canvas, c, end, 0.2, 1, cv2.LINE_AA)
    return _blur(canvas, 0.6)


def _boxes(mask: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return tuple((int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _area in stats[1:n].tolist())


def _expose(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure: gamma, gain and offset (at working resolution: cheaper, and smooth anyway)."""
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25) * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.05)
    return img.astype(np.float32)


def _detector(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    """Detector blur, quantum noise, collimation and a side marker, at full resolution."""
    img = _blur(img, rng.uniform(0.5, 1.1) * size / 512)
    sigma = rng.uniform(0.006, 0.02)
    img += rng.standard_normal((size, size), dtype=np.float32) * (sigma * (0.6 + 0.8 * img))
    if rng.random() < 0.3:  # collimation: bright unexposed bands at one or more borders
        edge = int(size * rng.uniform(0.02, 0.06))
        img[:, :edge] = img[:, :edge] * 0.2 + 0.8
        if rng.random() < 0.5:
            img[:, size - edge :] = img[:, size - edge :] * 0.2 + 0.8
        if rng.random() < 0.3:
            img[:edge, :] = img[:edge, :] * 0.2 + 0.8
    if rng.random() < 0.5:  # side marker
        marker = np.zeros((size, size), np.uint8)
        org = (int(size * rng.uniform(0.04, 0.1)), int(size * rng.uniform(0.08, 0.14)))
        text = "R" if rng.random() < 0.8 else "L"
        cv2.putText(
            marker, text, org, cv2.FONT_HERSHEY_SIMPLEX, size / 400, 255, max(1, size // 200), cv2.LINE_AA
        )
        img = np.maximum(img, marker.astype(np.float32) / 255.0)
    return np.clip(img, 0, 1).astype(np.float32)


def make_phantom(seed: int, index: int, positive: bool, size: int = 512) -> Phantom:
    """One deterministic phantom; ``positive`` adds consolidations to the same anatomy."""
    if size < 64:
        raise ValueError(f"size: at least 64 pixels, got {size}")
    n = min(size, _WORK)
    rng = np.random.default_rng([seed, index, 0])
    img, lung_mask, params = _anatomy(rng, n)
    img += _distractors(np.random.default_rng([seed, index, 4]), n, lung_mask)
    support = np.zeros((n, n), np.float32)
    lesions: list[dict[str, float]] = []
    if positive:
        for attempt in range(4):  # a draw that leaves no lesion inside the lungs is redrawn
            density, blob, lesions = _lesions(np.random.default_rng([seed, index, 2, attempt]), n, lung_mask)
            if blob.any():
                img, support = img + density, blob.astype(np.float32)
                break
    # Geometry: small rotation, zoom and shift; the mask follows (resampled, then thresholded).
    angle, zoom, shift = rng.uniform(-7, 7), rng.uniform(0.94, 1.06), rng.uniform(-0.04, 0.04, 2) * n
    m = cv2.getRotationMatrix2D((n / 2, n / 2), angle, zoom)
    m[:, 2] += shift
    img = cv2.warpAffine(img, m, (n, n), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    support = cv2.warpAffine(support, m, (n, n), flags=cv2.INTER_LINEAR, borderValue=0)
    img = _expose(rng, img)
    if n != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
        support = cv2.resize(support, (size, size), interpolation=cv2.INTER_LINEAR)
    mask = np.where(support > 0.5, 255, 0).astype(np.uint8)
    image = _detector(rng, img, size)
    params = {**params, "angle": angle, "zoom": zoom, "lesions": lesions}
    return Phantom(
        image=image,
        mask=mask,
        boxes=_boxes(mask) if mask.any() else (),
        positive=bool(positive and mask.any()),
        params=params,
    )


def _write_png16(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.round(image * 65535).astype(np.uint16)):
        raise OSError(f"cannot write {path}")


def generate_dataset(
    out: Path, count: int, seed: int, positive_fraction: float = 0.5, fmt: str = "png", size: int = 512
) -> Path:
    """Write ``count`` phantoms, their masks and ``labels.csv`` (file,label,mask,boxes); return the CSV path.

    ``boxes`` are ``x0:y0:x1:y1`` joined by ``;``. With ``fmt="both"`` the CSV names the PNG and the DICOM
    file sits beside it with the same stem.
    """
    from gradcam.phantom_dicom import header_variant, phantom_dataset, write_dicom

    if count < 1:
        raise ValueError(f"--count: at least 1, got {count}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"--positive-fraction: between 0 and 1, got {positive_fraction}")
    if fmt not in FORMATS:
        raise ValueError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        positive = phantom_label(seed, i, positive_fraction)
        ph = make_phantom(seed, i, positive, size)
        stem = f"phantom_{seed}_{i:05d}"
        files = []
        if fmt in ("png", "both"):
            files.append(f"images/{stem}.png")
            _write_png16(out / files[-1], ph.image)
        if fmt in ("dicom", "both"):
            files.append(f"images/{stem}.dcm")
            write_dicom(phantom_dataset(ph, seed, i, **header_variant(seed, i)), out / files[-1])  # type: ignore[arg-type]
        mask_rel = ""
        if ph.positive:
            mask_rel = f"masks/{stem}.png"
            (out / "masks").mkdir(exist_ok=True)
            cv2.imwrite(str(out / mask_rel), ph.mask)
        boxes = ";".join(":".join(str(v) for v in b) for b in ph.boxes)
        rows.append([files[0], int(ph.positive), mask_rel, boxes])
    labels = out / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "mask", "boxes"])
        writer.writerows(rows)
    return labels


def __getattr__(name: str) -> Any:
    # The DICOM helpers live in gradcam.phantom_dicom, which imports this module: re-exported lazily.
    if name in _DICOM_HELPERS:
        from gradcam import phantom_dicom

        return getattr(phantom_dicom, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
