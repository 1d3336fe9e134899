"""``gradcam-node analyze``: analyse files on disk and write results, overlays and CAMs."""

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
from gradcam.preprocess import load_image
from gradcam.render import render_overlay
from gradcam.results import DISCLAIMER, AnalysisResult

__all__ = ["analyze_paths", "write_result"]

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_result(cfg: CoreConfig, image_path: Path, image, result: AnalysisResult, out_dir: Path) -> Path:
    """Write ``result.json``, ``<model>.png`` and ``<model>_cam.npy`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "input": str(image_path),
        "image_size": {"rows": result.height, "columns": result.width},
        "models": {name: r.summary() for name, r in result.models.items()},
        "consensus": result.consensus,
        "note": DISCLAIMER,
    }
    for name, r in result.models.items():
        rgb = render_overlay(image, r, cfg.render)
        cv2.imwrite(str(out_dir / f"{_safe(name)}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        np.save(out_dir / f"{_safe(name)}_cam.npy", r.cam.astype(np.float32))
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
