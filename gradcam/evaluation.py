"""``gradcam-node evaluate``: AUC, operating points, ROC-optimal thresholds and the pointing game."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from gradcam.analysis import Analyzer
from gradcam.config import CoreConfig
from gradcam.datasets import Sample, load_samples
from gradcam.metrics import RocPoint, choose_threshold, pointing_game, roc_auc, roc_curve, sens_spec
from gradcam.preprocess import load_image

__all__ = ["ModelEvaluation", "evaluate", "evaluate_command", "write_thresholds", "draw_roc"]


@dataclass(frozen=True)
class ModelEvaluation:
    model: str
    n: int
    positives: int
    auc: float
    threshold: float
    sensitivity: float
    specificity: float
    optimal_threshold: float
    optimal_sensitivity: float
    optimal_specificity: float
    criterion: str
    pointing_game: float | None
    pointing_n: int


def _eval_samples(data: Path) -> list[Sample]:
    if (data / "labels.csv").is_file():
        return load_samples(data)
    for split in ("test", "val"):
        try:
            return load_samples(data, split)
        except ValueError:
            continue
    raise ValueError(f"{data}: expected labels.csv or an ImageFolder layout with test/ or val/")


def evaluate(
    core: CoreConfig,
    data: Path,
    model_names: list[str] | None = None,
    min_sensitivity: float | None = None,
    batch: int = 16,
) -> tuple[list[ModelEvaluation], dict[str, list[RocPoint]]]:
    """Evaluate the models on a labelled folder; returns per-model figures and ROC curves."""
    samples = _eval_samples(data)
    labels = np.array([s.label for s in samples])
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"{data}: evaluation needs both labels")
    analyzer = Analyzer(core, model_names)
    probs: dict[str, list[float]] = {n: [] for n in analyzer.models}
    peaks: dict[str, list[tuple[int, int]]] = {n: [] for n in analyzer.models}
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        images = [load_image(s.path, core.preprocess.max_pixels) for s in chunk]
        for result in analyzer.analyze(images):
            for name, r in result.models.items():
                probs[name].append(r.probability)
                peaks[name].append(r.cam_peak)
    evaluations, curves = [], {}
    boxed = [i for i, s in enumerate(samples) if s.label == 1 and s.boxes]
    for name, lm in analyzer.models.items():
        p = np.array(probs[name])
        sens, spec = sens_spec(labels, p, lm.cfg.threshold)
        best = choose_threshold(labels, p, min_sensitivity)
        pg = (
            pointing_game([peaks[name][i] for i in boxed], [samples[i].boxes for i in boxed])
            if boxed
            else None
        )
        evaluations.append(
            ModelEvaluation(
                model=name,
                n=len(samples),
                positives=int(labels.sum()),
                auc=roc_auc(labels, p),
                threshold=lm.cfg.threshold,
                sensitivity=sens,
                specificity=spec,
                optimal_threshold=round(best.threshold, 4),
                optimal_sensitivity=best.sensitivity,
                optimal_specificity=best.specificity,
                criterion=f"min sensitivity {min_sensitivity}"
                if min_sensitivity is not None
                else "Youden's J",
                pointing_game=pg,
                pointing_n=len(boxed),
            )
        )
        curves[name] = roc_curve(labels, p)
    return evaluations, curves


def draw_roc(ev: ModelEvaluation, curve: list[RocPoint], path: Path, size: int = 480) -> None:
    """A plain ROC plot (OpenCV, no GUI libraries): curve, chance line, configured and optimal points."""
    pad = 50
    img = np.full((size + 2 * pad, size + 2 * pad, 3), 255, np.uint8)

    def xy(fpr: float, tpr: float) -> tuple[int, int]:
        return int(pad + fpr * size), int(pad + (1 - tpr) * size)

    cv2.rectangle(img, xy(0, 1), xy(1, 0), (0, 0, 0), 1)
    cv2.line(img, xy(0, 0), xy(1, 1), (180, 180, 180), 1, cv2.LINE_AA)
    pts = [xy(1 - p.specificity, p.sensitivity) for p in curve] + [xy(1, 1)]
    cv2.polylines(img, [np.array(pts, np.int32)], False, (200, 80, 0), 2, cv2.LINE_AA)
    cv2.circle(img, xy(1 - ev.specificity, ev.sensitivity), 6, (0, 0, 220), 2)
    cv2.circle(img, xy(1 - ev.optimal_specificity, ev.optimal_sensitivity), 6, (0, 160, 0), -1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(
        img, f"{ev.model}  AUC {ev.auc:.4f}  (n={ev.n})", (pad, 20), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA
    )
    cv2.putText(img, "1 - specificity", (pad + size // 2 - 60, size + pad + 35), font, 0.5, (0, 0, 0), 1)
    cv2.putText(
        img,
        f"red: configured {ev.threshold:g}  green: optimal {ev.optimal_threshold:g}",
        (pad, size + pad + 20),
        font,
        0.45,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    cv2.putText(img, "sensitivity", (5, pad - 6), font, 0.5, (0, 0, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def _toml_key(part: str) -> str:
    """Regex for one TOML key part written bare, "basic"-quoted or 'literal'-quoted."""
    e = re.escape(part)
    return rf"(?:{e}|\"{e}\"|'{e}')"


def write_thresholds(config_path: Path, thresholds: dict[str, float]) -> None:
    """Replace ``threshold = ...`` inside each ``[models.NAME]`` table, keeping comments and layout."""
    text = config_path.read_text()
    key = re.compile(rf"^([ \t]*{_toml_key('threshold')}[ \t]*=[ \t]*)[^\s#]+", re.M)
    for name, value in thresholds.items():
        header = re.compile(
            rf"^[ \t]*\[[ \t]*{_toml_key('models')}[ \t]*\.[ \t]*{_toml_key(name)}[ \t]*\][ \t]*(?:#.*)?$",
            re.M,
        )
        m = header.search(text)
        if not m:
            raise ValueError(f"{config_path}: no [models.{name}] table to update")
        end = re.compile(r"^[ \t]*\[", re.M).search(text, m.end())
        stop = end.start() if end else len(text)
        body = text[m.end() : stop]
        new_body, n = key.subn(rf"\g<1>{value:.4f}", body, count=1)
        if n == 0:
            new_body = body.rstrip("\n") + f"\nthreshold = {value:.4f}\n" + ("\n" if end else "")
        text = text[: m.end()] + new_body + text[stop:]
    config_path.write_text(text)


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def evaluate_command(core: CoreConfig, args: argparse.Namespace, config_path: Path) -> int:
    data = Path(args.data)
    evaluations, curves = evaluate(core, data, args.model, args.min_sensitivity)
    out = Path(args.out) if args.out else data / "evaluation"
    for ev in evaluations:
        draw_roc(ev, curves[ev.model], out / f"roc_{ev.model}.png")
    if args.json:
        print(json.dumps({"data": str(data), "models": [asdict(e) for e in evaluations]}, indent=2))
    else:
        print(
            f"{'model':<18}{'n':>6}{'AUC':>8}{'thr':>8}{'sens':>8}{'spec':>8}{'opt thr':>9}{'sens':>8}"
            f"{'spec':>8}{'pointing':>10}"
        )
        for e in evaluations:
            print(
                f"{e.model:<18}{e.n:>6}{_fmt(e.auc):>8}{e.threshold:>8.3f}{_fmt(e.sensitivity):>8}"
                f"{_fmt(e.specificity):>8}{e.optimal_threshold:>9.4f}{_fmt(e.optimal_sensitivity):>8}"
                f"{_fmt(e.optimal_specificity):>8}{_fmt(e.pointing_game):>10}"
            )
        print(f"ROC curves: {out}/roc_<model>.png ({evaluations[0].criterion})", file=sys.stderr)
    if args.write_thresholds:
        write_thresholds(config_path, {e.model: e.optimal_threshold for e in evaluations})
        print(f"thresholds written to {config_path}", file=sys.stderr)
    return 0
