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

A path may be a folder: the images under it are analysed, recursively in name order. There, files that
look like neither DICOM (a .dcm/.dicom/.ima name or the DICM preamble) nor PNG/JPEG (by name) are passed
over quietly, as are hidden ones; a file named on the command line is always tried.

The rules of :mod:`gradcam.eligibility` apply as in the node: a file that breaks one gets one line on
stderr, ``SKIP path: reason``, and no results. ``force`` overrides them (SOP class, modality, body part,
view, colour, frames, size), never what makes the image unusable: pixels that cannot be decoded, pixel
data no radiograph has (Float Pixel Data, Bits Allocated other than 8/16), or a blank image.
Exit code 0 when every file was analysed or skipped by a rule, 1 when any could not be loaded or a folder
named holds no image at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np

from gradcam.analysis import Analyzer
from gradcam.config import CoreConfig
from gradcam.eligibility import ACCEPTED, check_dataset, check_pixel_encoding, check_size
from gradcam.errors import InputError, NotAnImageError, UnsupportedImageError
from gradcam.preprocess import SourceImage, load_dataset_image, load_raster, raster_size, read_dicom
from gradcam.render import render_overlay, render_summary
from gradcam.results import DISCLAIMER, AnalysisResult

__all__ = ["analyze_paths", "find_inputs", "write_result"]

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {".dcm", ".dicom", ".ima", ".png", ".jpg", ".jpeg"}
_PREFIX = "gradcam-node analyze"


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


def _looks_like_image(path: Path) -> bool:
    """By name (DICOM, PNG, JPEG) or by the DICOM preamble."""
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):  # symbolic links to folders are not followed: no cycles
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if not name.startswith(".") and _looks_like_image(path):
                yield path


def find_inputs(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """``(files to analyse, folders without any image)``: each path that is no folder as it is, and the
    images under each folder."""
    found: list[Path] = []
    empty: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        images = list(_walk(path))
        found.extend(images)
        if not images:
            empty.append(path)
    return found, empty


def _open(cfg: CoreConfig, path: Path, force: bool) -> SourceImage | str:
    """The display-ready image, or the eligibility rule it breaks (unless ``force``); InputError if it
    cannot be loaded."""
    pre = cfg.preprocess
    min_side = 1 if force else pre.min_side
    if not path.is_file():
        raise NotAnImageError(f"{path}: no such file")
    ds = read_dicom(path)
    if ds is not None:
        # an encoding no model can read is a load failure with or without --force, never a skip
        encoding = check_pixel_encoding(ds)
        if not encoding.ok:
            raise UnsupportedImageError(f"{path}: {encoding.reason}")
        verdict = ACCEPTED if force else check_dataset(ds, pre.min_side)
        if not verdict.ok:
            return str(verdict.reason)
        return load_dataset_image(ds, pre.max_pixels, str(path), min_side=min_side)
    verdict = ACCEPTED if force else check_size(*raster_size(path), pre.min_side)
    if not verdict.ok:
        return str(verdict.reason)
    return load_raster(path, pre.max_pixels, min_side)


class _Progress:
    """``gradcam-node analyze: 3/10 name`` on one line of a terminal, rewritten in place; nothing when the
    stream is not a terminal (a pipe or a file gets the result lines only)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.active = self.stream.isatty()
        self.width = max(shutil.get_terminal_size().columns - 1, 20)
        self.shown = False

    def show(self, number: int, path: Path) -> None:
        if self.active:
            text = f"{_PREFIX}: {number}/{self.total} {path.name}"[: self.width]
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        """Before any other line, and at the end."""
        if self.shown:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.shown = False


def _folder_name(path: Path, used: set[str]) -> str:
    """The file's stem, made unique in this run (``chest``, ``chest_2``...)."""
    base = _safe(path.stem) or "image"
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def analyze_paths(
    cfg: CoreConfig,
    paths: Sequence[Path],
    out: Path,
    model_names: Sequence[str] | None = None,
    force: bool = False,
) -> int:
    """Analyse each file (and the images under each folder); one line on stderr for each file skipped by a
    rule or that cannot be loaded, and the rest go on. Exit code 1 if any could not be loaded (or a folder
    held no image)."""
    analyzer = Analyzer(cfg, model_names)
    files, empty = find_inputs(paths)
    for folder in empty:  # most likely a wrong path: say so, and fail
        print(f"{_PREFIX}: {folder}: no DICOM, PNG or JPEG file in this folder", file=sys.stderr)
    progress = _Progress(len(files))
    failed = len(empty)
    used: set[str] = set()
    for number, path in enumerate(files, start=1):
        progress.show(number, path)
        try:
            image = _open(cfg, path, force)
        except InputError as exc:
            progress.clear()
            print(f"{_PREFIX}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if isinstance(image, str):
            progress.clear()
            print(f"{_PREFIX}: SKIP {path}: {image} (use --force to analyse anyway)", file=sys.stderr)
            continue
        (result,) = analyzer.analyze([image])
        written = write_result(cfg, path, image, result, out / _folder_name(path, used))
        verdict = "POSITIVE" if result.consensus else "negative"
        probs = ", ".join(f"{n} {r.probability:.3f}" for n, r in result.models.items())
        progress.clear()
        print(f"{path}: consensus {verdict} ({probs}) -> {written.parent}", flush=True)
    progress.clear()
    return 1 if failed else 0
