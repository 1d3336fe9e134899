"""Labelled folders: phantom labels.csv, ImageFolder splits, refusal of other folders, stratified split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gradcam.datasets import Sample, load_samples, split_samples
from gradcam.phantoms import generate_dataset


def touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # load_samples lists files; it does not decode them


def test_phantom_folder_is_read_from_labels_csv(tmp_path: Path) -> None:
    labels = generate_dataset(tmp_path, 8, seed=2, size=64)
    samples = load_samples(tmp_path)
    rows = labels.read_text().splitlines()[1:]
    assert len(samples) == 8
    for sample, row in zip(samples, rows, strict=True):
        file, label, mask, boxes = row.split(",")
        assert sample.path == tmp_path / file and sample.path.is_file()
        assert sample.label == int(label)
        assert sample.boxes == tuple(tuple(int(v) for v in b.split(":")) for b in boxes.split(";") if b)
        assert bool(sample.boxes) == bool(mask) == (sample.label == 1)
    assert load_samples(tmp_path, "train") == samples  # a phantom folder has no splits


def test_labels_csv_errors_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,label,mask,boxes\na.png,0,,\nb.png,2,,\n")
    with pytest.raises(ValueError, match=r"labels.csv:3"):
        load_samples(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label,mask,boxes\na.png,1,m.png,1:2:3\n")
    with pytest.raises(ValueError, match="x0:y0:x1:y1"):
        load_samples(tmp_path)
    (tmp_path / "labels.csv").write_text("name,class\na.png,1\n")
    with pytest.raises(ValueError, match="missing column"):
        load_samples(tmp_path)


def test_image_folder_splits(tmp_path: Path) -> None:
    for rel in (
        "train/NORMAL/a.png",
        "train/NORMAL/b.JPG",
        "train/PNEUMONIA/c.jpeg",
        "train/PNEUMONIA/d.DCM",
    ):
        touch_image(tmp_path / rel)
    touch_image(tmp_path / "train/NORMAL/notes.txt")
    touch_image(tmp_path / "train/OTHER/e.png")
    touch_image(tmp_path / "val/normal/f.png")
    touch_image(tmp_path / "val/pneumonia/g.png")
    train = load_samples(tmp_path, "train")
    assert [(s.path.name, s.label) for s in train] == [
        ("a.png", 0),
        ("b.JPG", 0),
        ("c.jpeg", 1),
        ("d.DCM", 1),
    ]
    assert all(s.boxes == () for s in train)
    assert [(s.path.name, s.label) for s in load_samples(tmp_path, "val")] == [("f.png", 0), ("g.png", 1)]
    with pytest.raises(ValueError, match="test/"):
        load_samples(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_samples(tmp_path)


def test_real_images_in_an_image_folder_are_listed(tmp_path: Path) -> None:
    img = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "test" / cls).mkdir(parents=True)
        cv2.imwrite(str(tmp_path / "test" / cls / "x.png"), img)
    samples = load_samples(tmp_path, "test")
    assert [s.label for s in samples] == [0, 1]
    assert all(cv2.imread(str(s.path)) is not None for s in samples)


@pytest.mark.parametrize("layout", ["empty", "loose files", "missing"])
def test_other_folders_are_refused(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "loose files":
        touch_image(root / "a.png")
        touch_image(root / "train" / "cats" / "b.png")
    with pytest.raises(ValueError, match="data") as info:
        load_samples(root, "train")
    assert "labels.csv" in str(info.value) or "NORMAL" in str(info.value)


def make_samples(n_neg: int, n_pos: int) -> list[Sample]:
    return [Sample(Path(f"{i}.png"), int(i >= n_neg)) for i in range(n_neg + n_pos)]


def test_split_is_stratified_disjoint_and_deterministic() -> None:
    samples = make_samples(70, 30)
    train, val = split_samples(samples, 0.2, seed=3)
    assert sum(s.label for s in val) == 6 and len(val) == 20
    assert sum(s.label for s in train) == 24 and len(train) == 80
    assert {s.path for s in train}.isdisjoint({s.path for s in val})
    assert {s.path for s in train} | {s.path for s in val} == {s.path for s in samples}
    assert split_samples(samples, 0.2, seed=3) == (train, val)
    assert {s.path for s in split_samples(samples, 0.2, seed=4)[1]} != {s.path for s in val}


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_refuses_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_samples(make_samples(5, 5), fraction, seed=0)
