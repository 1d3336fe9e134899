"""Labelled image folders for training and evaluation.

Two layouts: a phantom folder (``labels.csv`` with ``file,label,mask,boxes``) and an ImageFolder-style
data set as in the public paediatric pneumonia set (``train/NORMAL``, ``train/PNEUMONIA``, ``val/...``,
``test/...``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Sample", "load_samples", "split_samples", "parse_boxes"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}
_CLASSES = {"normal": 0, "pneumonia": 1}
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    boxes: tuple[tuple[int, int, int, int], ...] = ()


def parse_boxes(text: str) -> tuple[tuple[int, int, int, int], ...]:
    """``x0:y0:x1:y1;...`` to a tuple of boxes."""
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        values = [int(v) for v in part.split(":")]
        if len(values) != 4:
            raise ValueError(f"lesion box {part!r}: expected x0:y0:x1:y1")
        boxes.append((values[0], values[1], values[2], values[3]))
    return tuple(boxes)


def _from_csv(root: Path) -> list[Sample]:
    path = root / "labels.csv"
    samples = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                label = int(row["label"])
                boxes = parse_boxes(row.get("boxes") or "")
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc}") from None
            if label not in (0, 1):
                raise ValueError(f"{path}:{line}: label must be 0 or 1, got {label}")
            samples.append(Sample(root / row["file"], label, boxes))
    return samples


def _from_image_folder(root: Path, split: str) -> list[Sample]:
    folder = root / split
    if not folder.is_dir():
        raise ValueError(
            f"{root}: no labels.csv and no {split}/ folder (expected {split}/NORMAL, {split}/PNEUMONIA)"
        )
    samples = []
    for sub in sorted(folder.iterdir()):
        label = _CLASSES.get(sub.name.lower())
        if label is None or not sub.is_dir():
            continue
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        samples.extend(Sample(p, label) for p in files)
    if not samples:
        raise ValueError(f"{folder}: expected NORMAL/ and PNEUMONIA/ folders with images")
    return samples


def load_samples(root: Path, split: str | None = None) -> list[Sample]:
    """Samples of a phantom folder (``split`` ignored) or of one split of an ImageFolder data set."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder (expected labels.csv or train/NORMAL, train/PNEUMONIA, ...)")
    if (root / "labels.csv").is_file():
        return _from_csv(root)
    if split not in _SPLITS:
        layout = "an ImageFolder data set" if any((root / s).is_dir() for s in _SPLITS) else "neither layout"
        raise ValueError(
            f"{root}: no labels.csv ({layout}); expected labels.csv (file,label,mask,boxes) or "
            f"{{train,val,test}}/NORMAL and .../PNEUMONIA with a split named (got split={split!r})"
        )
    return _from_image_folder(root, split)


def split_samples(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, deterministic split into (train, validation)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in (0, 1):
        group = [s for s in samples if s.label == label]
        order = rng.permutation(len(group))
        n_val = int(round(len(group) * val_fraction))
        val.extend(group[i] for i in order[:n_val])
        train.extend(group[i] for i in order[n_val:])
    return train, val
