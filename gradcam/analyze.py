"""``gradcam-node analyze``: analyse files on disk and write results, overlays and CAMs.

Per input image, into its own folder:

``result.json``
    Every model's probability, threshold, decision, CAM peak and checkpoint, the consensus, the
    disclaimer, and ``files`` (which file holds what).
``<model>.png``
    That model's overlay (:func:`gradcam.render.render_overlay`) for *every* model, this being a local
    research tool: a positive decision's CAM in the configured colour map (evidence for pneumonia), a
    negative decision's CAM in the fixed azure ramp (evidence for normal); the caption and colour bar say
    which, and state the consensus.
``<model>_cam.npy``
    That model's raw CAM, float32 in [0, 1] at source resolution.
``summary.png``
    All models side by side (:func:`gradcam.render.render_summary`) as a radiologist would see them: maps
    for positive decisions only.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from gradcam.analysis import Analyzer
from gradcam.config import CoreConfig
from gradcam.errors import InputError
from gradcam.preprocess import SourceImage, load_image
from gradcam.render import render_overlay, render_summary
from gradcam.results import DISCLAIMER, AnalysisResult

__all__ = ["analyze_paths", "write_result"]

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def write_result(
    cfg: CoreConfig, image_path: Path, image: SourceImage, result: AnalysisResult, out_dir: Path
) -> Path:
    """Write ``result.json``, ``<model>.png``, ``<model>_cam.npy`` and ``summary.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {name: _safe(name) for name in result.models}
    doc = {
        "input": str(image_path),
        "image_size": {"rows": result.height, "columns": result.width},
        "models": {name: r.summary() for name, r in result.models.items()},
        "consensus": result.consensus,
        "note": DISCLAIMER,
        "files": {
            "summary": "summary.png",
            "overlays": {name: f"{safe}.png" for name, safe in names.items()},
            "cams": {name: f"{safe}_cam.npy" for name, safe in names.items()},
        },
    }
    for name, r in result.models.items():
        _write_png(out_dir / f"{names[name]}.png", render_overlay(image, r, cfg.render, result))
        np.save(out_dir / f"{names[name]}_cam.npy", r.cam.astype(np.float32))
    _write_png(out_dir / "summary.png", render_summary(image, result, cfg.render))
    path = out_dir / "result.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def analyze_paths(
    cfg: CoreConfig, paths: Sequence[Path], out: Path, model_names: Sequence[str] | None = None
) -> int:
    """Analyse each file; a bad one gets one line on stderr and the rest go on. Exit code 1 if any failed."""
    analyzer = Analyzer(cfg, model_names)
    failed = 0
    used: set[str] = set()
    for path in paths:
        try:
            image = load_image(path, cfg.preprocess.max_pixels)
        except InputError as exc:
            print(f"gradcam-node analyze: {exc}", file=sys.stderr)
            failed += 1
            continue
        (result,) = analyzer.analyze([image])
        stem = _safe(path.stem) or "image"
        while stem in used:
            stem += "_"
        used.add(stem)
        written = write_result(cfg, path, image, result, out / stem)
        verdict = "POSITIVE" if result.consensus else "negative"
        probs = ", ".join(f"{n} {r.probability:.3f}" for n, r in result.models.items())
        print(f"{path}: consensus {verdict} ({probs}) -> {written.parent}")
    return 1 if failed else 0
