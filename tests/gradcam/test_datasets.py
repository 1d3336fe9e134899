"""Labelled folders: phantom labels.csv and ImageFolder layouts."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gradcam.datasets import Sample, load_samples, parse_boxes, split_samples


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((8, 8), np.uint8))


def test_labels_csv(tmp_path: Path) -> None:
    _png(tmp_path / "images/a.png")
    _png(tmp_path / "images/b.png")
    (tmp_path / "labels.csv").write_text(
        "file,label,mask,boxes\nimages/a.png,0,,\nimages/b.png,1,masks/b.png,1:2:5:6;7:8:9:10\n"
    )
    a, b = load_samples(tmp_path)
    assert a == Sample(tmp_path / "images/a.png", 0, ())
    assert b.label == 1 and b.boxes == ((1, 2, 5, 6), (7, 8, 9, 10))


def test_bad_labels_are_named(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,label\nx.png,2\n")
    with pytest.raises(ValueError, match="labels.csv:2: label must be 0 or 1"):
        load_samples(tmp_path)
    with pytest.raises(ValueError, match="x0:y0:x1:y1"):
        parse_boxes("1:2:3")


def test_image_folder(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _png(tmp_path / split / "NORMAL" / "n1.png")
        _png(tmp_path / split / "PNEUMONIA" / "p1.jpeg")
        _png(tmp_path / split / "PNEUMONIA" / "p2.PNG")
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    train = load_samples(tmp_path, "train")
    assert sorted((s.path.name, s.label) for s in train) == [("n1.png", 0), ("p1.jpeg", 1), ("p2.PNG", 1)]
    assert len(load_samples(tmp_path, "val")) == 3
    with pytest.raises(ValueError, match="test/"):
        load_samples(tmp_path, "test")


def test_neither_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_samples(tmp_path, "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="NORMAL"):
        load_samples(tmp_path, "train")


def test_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    samples = [Sample(tmp_path / f"{i}.png", int(i < 30)) for i in range(100)]
    train, val = split_samples(samples, 0.2, seed=3)
    assert len(val) == 20 and sum(s.label for s in val) == 6
    assert set(train).isdisjoint(val) and len(train) + len(val) == 100
    assert split_samples(samples, 0.2, seed=3) == (train, val)
    assert split_samples(samples, 0.2, seed=4)[1] != val
