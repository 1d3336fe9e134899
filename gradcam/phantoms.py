"""Synthetic chest radiograph phantoms with labelled "consolidations", deterministic for a seed.

Synthetic data only: the names, IDs and UIDs are made up; no patient data is involved anywhere.

Image ``i`` of seed ``s`` is drawn from its own generators (anatomy ``[s, i, 0]``, label ``[s, i, 1]``,
lesions ``[s, i, 2]``), so it is the same whatever ``count`` is, and the positive and negative versions of
one index share the anatomy. Pixel values are attenuation-like: bright = dense, as on a light box.
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

__all__ = ["Phantom", "make_phantom", "phantom_label", "generate_dataset", "phantom_uid"]

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


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(ax, ax)  # xx (columns), yy (rows), both in [-1, 1]


def _smooth_noise(rng: np.random.Generator, size: int, scale: int, sigma: float) -> np.ndarray:
    small = rng.standard_normal((scale, scale)).astype(np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigma)
    small /= small.std() + 1e-6
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _lungs(xx: np.ndarray, yy: np.ndarray, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Soft lung fields (0..1) and a hard lung mask, left and right with their own shapes."""
    soft = np.zeros_like(xx)
    for side in (-1.0, 1.0):
        cx = side * p["lung_dx"]
        w = p["lung_w"] * (1.0 + 0.08 * side * p["asym"])
        top, base = p["lung_top"], p["dome_y"] + (0.04 if side > 0 else 0.0)
        u = (xx - cx) / w
        # Apex rounded, lateral wall convex, base cut by the diaphragm dome.
        h = (base - top) / 2.0
        v = (yy - (top + h)) / h
        shape = 1.0 - (np.abs(u) ** p["lung_pow"] + np.abs(v) ** 2.2)
        dome = base - p["dome_h"] * np.clip(1 - u**2, 0, 1)
        shape = np.minimum(shape, (dome - yy) * 6.0)
        # Medial border straighter: the mediastinum.
        shape = np.minimum(shape, (side * xx - p["medi"]) * 8.0)
        soft = np.maximum(soft, np.clip(shape * 4.0, 0, 1))
    return soft, soft > 0.5


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    xx, yy = _grid(size)
    p = {
        "body_w": rng.uniform(0.78, 0.98),
        "lung_dx": rng.uniform(0.33, 0.40),
        "lung_w": rng.uniform(0.27, 0.34),
        "lung_top": rng.uniform(-0.82, -0.68),
        "dome_y": rng.uniform(0.38, 0.58),
        "dome_h": rng.uniform(0.06, 0.16),
        "lung_pow": rng.uniform(2.2, 3.2),
        "medi": rng.uniform(0.07, 0.12),
        "asym": rng.uniform(-1, 1),
        "heart_x": rng.uniform(0.10, 0.18),
        "heart_y": rng.uniform(0.26, 0.38),
        "heart_rx": rng.uniform(0.24, 0.32),
        "heart_ry": rng.uniform(0.19, 0.26),
        "lung_density": rng.uniform(0.12, 0.24),
        "soft_density": rng.uniform(0.50, 0.62),
    }
    shoulder = 1.0 - 0.25 * np.clip(-0.55 - yy, 0, 1) / 0.45
    body = np.clip((1.0 - (xx / (p["body_w"] * shoulder)) ** 2) * 4.0, 0, 1)
    img = 0.04 + body * p["soft_density"]
    soft, _ = _lungs(xx, yy, p)
    # Heart on the image's right side (the patient's left on a PA/AP view); it hides the lung behind it.
    heart = ((xx - p["heart_x"]) / p["heart_rx"]) ** 2 + ((yy - p["heart_y"]) / p["heart_ry"]) ** 2
    heart_soft = np.clip((1.0 - heart) * 2.5, 0, 1)
    soft = soft * (1.0 - 0.9 * heart_soft)
    lung_mask = soft > 0.5
    img = img - soft * (p["soft_density"] - p["lung_density"])
    img += heart_soft * 0.04
    # Lung markings: vessel-like texture, denser towards the hila.
    hilum = np.exp(-((np.abs(xx) - 0.14) ** 2 / 0.05 + (yy - 0.0) ** 2 / 0.12))
    img += soft * (0.03 + 0.06 * hilum) * np.abs(_smooth_noise(rng, size, 48, 1.2))
    # Spine and mediastinum.
    img += np.exp(-(xx**2) / 0.006) * 0.07 * body
    # Abdomen under the diaphragm.
    dome = (
        p["dome_y"]
        + 0.04 * (xx > 0)
        - p["dome_h"] * np.clip(1 - ((np.abs(xx) - p["lung_dx"]) / 0.3) ** 2, 0, 1)
    )
    img += np.clip((yy - dome) * 8.0, 0, 1) * body * 0.05
    img += _ribs(rng, size, p, soft)
    img += _clavicles(rng, size)
    return img.astype(np.float32), lung_mask, p


def _ribs(rng: np.random.Generator, size: int, p: dict[str, float], soft: np.ndarray) -> np.ndarray:
    canvas = np.zeros((size, size), np.float32)
    n = int(rng.integers(8, 11))
    top = (p["lung_top"] + 1) / 2 * size
    bottom = (p["dome_y"] + 1) / 2 * size
    step = (bottom - top) / n
    thick = max(2, int(size * rng.uniform(0.012, 0.02)))
    for side in (-1, 1):
        for k in range(n):
            y0 = top + k * step + rng.uniform(-0.1, 0.1) * step
            xs = np.linspace(0.04, 0.48, 24) * size
            xpix = size / 2 + side * xs
            # Posterior ribs rise medially and droop laterally.
            ypix = y0 + ((xs / size) / 0.48) ** 2 * size * 0.10 - 0.05 * size
            pts = np.stack([xpix, ypix], 1).astype(np.int32)
            cv2.polylines(canvas, [pts], False, 1.0, thick, cv2.LINE_AA)
    canvas = cv2.GaussianBlur(canvas, (0, 0), max(1.0, thick * 0.6))
    return canvas * rng.uniform(0.05, 0.09) * (0.3 + 0.7 * soft)


def _clavicles(rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.float32)
    y = size * rng.uniform(0.12, 0.18)
    thick = max(3, int(size * 0.022))
    for side in (-1, 1):
        pts = np.array(
            [
                [size / 2 + side * size * 0.05, y + size * 0.02],
                [size / 2 + side * size * 0.38, y - size * 0.03],
            ],
            np.int32,
        )
        cv2.polylines(canvas, [pts], False, 1.0, thick, cv2.LINE_AA)
    return cv2.GaussianBlur(canvas, (0, 0), 2.0) * 0.12


def _lesions(
    rng: np.random.Generator, size: int, lung_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """1-2 consolidations: irregular soft opacities inside a lung field."""
    density = np.zeros((size, size), np.float32)
    mask = np.zeros((size, size), np.uint8)
    info = []
    inner = cv2.erode(lung_mask.astype(np.uint8), np.ones((max(3, size // 16),) * 2, np.uint8))
    ys, xs = np.nonzero(inner if inner.any() else lung_mask)
    n = 1 if rng.random() < 0.7 else 2
    xx, yy = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    for _ in range(n):
        j = int(rng.integers(len(ys)))
        cy, cx = float(ys[j]), float(xs[j])
        d = rng.uniform(0.12, 0.28) * size
        ax, ay = d / 2 * rng.uniform(0.75, 1.3), d / 2 * rng.uniform(0.75, 1.3)
        ang = rng.uniform(0, math.pi)
        u = ((xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang)) / ax
        v = (-(xx - cx) * math.sin(ang) + (yy - cy) * math.cos(ang)) / ay
        field_ = 1.0 - (u**2 + v**2) + 0.45 * _smooth_noise(rng, size, 24, 1.0)
        blob = (field_ > 0).astype(np.uint8) & lung_mask.astype(np.uint8)
        blob = cv2.morphologyEx(blob, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        if blob.sum() < (0.03 * size) ** 2:
            continue
        contrast = rng.uniform(0.10, 0.24)
        soft = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), size * rng.uniform(0.01, 0.025))
        texture = 0.75 + 0.25 * _smooth_noise(rng, size, 64, 1.5)
        density += soft * contrast * np.clip(texture, 0.3, 1.3)
        mask |= blob
        info.append({"cx": cx, "cy": cy, "diameter": d, "contrast": contrast})
    return density, mask * 255, info


def _boxes(mask: np.ndarray) -> tuple[tuple[int, int, int, int], ...]:
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return tuple((int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _area in stats[1:n].tolist())


def make_phantom(seed: int, index: int, positive: bool, size: int = 512) -> Phantom:
    """One deterministic phantom; ``positive`` adds consolidations to the same anatomy."""
    if size < 64:
        raise ValueError(f"size: at least 64 pixels, got {size}")
    rng = np.random.default_rng([seed, index, 0])
    img, lung_mask, params = _anatomy(rng, size)
    mask = np.zeros((size, size), np.uint8)
    lesions: list[dict[str, float]] = []
    if positive:
        for attempt in range(4):  # a draw that leaves no lesion inside the lungs is redrawn
            density, mask, lesions = _lesions(
                np.random.default_rng([seed, index, 2, attempt]), size, lung_mask
            )
            if mask.any():
                img = img + density
                break
    # Geometry: small rotation and shift; the mask follows with nearest-neighbour sampling.
    angle, shift = rng.uniform(-7, 7), rng.uniform(-0.04, 0.04, 2) * size
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, rng.uniform(0.95, 1.05))
    m[:, 2] += shift
    img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.04)
    mask = cv2.warpAffine(mask, m, (size, size), flags=cv2.INTER_NEAREST, borderValue=0)
    # Exposure, detector blur and quantum noise.
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25) * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.05)
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.5, 1.2))
    img += rng.normal(0, rng.uniform(0.006, 0.02), img.shape).astype(np.float32)
    if rng.random() < 0.3:  # collimation: a bright (unexposed) band at one or two borders
        edge = int(size * rng.uniform(0.02, 0.06))
        img[:, :edge] = img[:, :edge] * 0.2 + 0.8
        if rng.random() < 0.5:
            img[:, size - edge :] = img[:, size - edge :] * 0.2 + 0.8
    if rng.random() < 0.5:  # side marker
        marker = np.zeros((size, size), np.uint8)
        cv2.putText(
            marker,
            "R" if rng.random() < 0.8 else "L",
            (int(size * 0.06), int(size * 0.12)),
            cv2.FONT_HERSHEY_SIMPLEX,
            size / 400,
            255,
            max(1, size // 200),
            cv2.LINE_AA,
        )
        img = np.maximum(img, marker.astype(np.float32) / 255.0)
    image = np.clip(img, 0, 1).astype(np.float32)
    params = {**params, "angle": angle, "lesions": lesions}
    return Phantom(
        image=image, mask=mask, boxes=_boxes(mask), positive=bool(positive and mask.any()), params=params
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
