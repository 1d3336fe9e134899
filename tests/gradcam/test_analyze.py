"""``gradcam-node analyze`` as a real subprocess, and the command line's help."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from gradcam.analysis import Analyzer
from gradcam.config import REPO_ROOT, CoreConfig
from gradcam.preprocess import load_image
from gradcam.results import DISCLAIMER
from node.cli import build_parser
from tests import helpers

CLI = Path(sys.executable).parent / "gradcam-node"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def radiograph(height: int, width: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height - 1, width - 1]).reshape(2, 1, 1)
    lungs = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.04) + np.exp(
        -((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.04
    )
    img = 0.85 - 0.5 * lungs + np.random.default_rng(seed).normal(0, 0.03, (height, width))
    return np.clip(img, 0, 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    dicom = helpers.write_dataset(helpers.image_dataset(size=96, seed=1), d / "chest-dx.dcm")
    png = d / "chest-png.png"
    cv2.imwrite(str(png), (radiograph(80, 100, 2) * 65535).astype(np.uint16))
    jpeg = d / "chest-jpeg.jpg"
    cv2.imwrite(str(jpeg), (radiograph(90, 70, 3) * 255).astype(np.uint8))
    bad = d / "report.txt"
    bad.write_text("not an image\n")
    truncated = d / "broken.dcm"
    ds = helpers.image_dataset(size=64, seed=4)
    ds.PixelData = ds.PixelData[:100]
    helpers.write_dataset(ds, truncated)
    return {"dicom": dicom, "png": png, "jpeg": jpeg, "bad": bad, "truncated": truncated}


@pytest.fixture(scope="module")
def analysed(
    tiny_config_path: Path, inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("analysed")
    order = ["dicom", "bad", "png", "truncated", "jpeg"]  # bad files between good ones
    result = run_cli("--config", tiny_config_path, "analyze", *[inputs[k] for k in order], "--out", out)
    return result, out


def test_good_files_are_analysed_and_bad_ones_reported(
    analysed: tuple[subprocess.CompletedProcess[str], Path],
    inputs: dict[str, Path],
    core_config: CoreConfig,
    tiny_checkpoints: dict[str, Path],
) -> None:
    result, out = analysed
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert str(inputs["bad"]) in lines[0] and "not DICOM, PNG or JPEG" in lines[0]
    assert str(inputs["truncated"]) in lines[1] and "cannot be decoded" in lines[1]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chest-dx", "chest-jpeg", "chest-png"]

    thresholds = {m.name: m.threshold for m in core_config.models}
    hashes = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in tiny_checkpoints.items()}
    for key, size in (("dicom", (96, 96)), ("png", (80, 100)), ("jpeg", (90, 70))):
        folder = out / inputs[key].stem
        doc = json.loads((folder / "result.json").read_text())
        assert doc["input"] == str(inputs[key])
        assert doc["image_size"] == {"rows": size[0], "columns": size[1]}
        assert doc["note"] == DISCLAIMER
        assert list(doc["models"]) == list(thresholds)
        votes = []
        for name, r in doc["models"].items():
            assert 0.0 <= r["probability"] <= 1.0
            assert r["threshold"] == thresholds[name]
            assert r["positive"] == (r["probability"] >= r["threshold"])
            assert 0 <= r["cam_peak"][0] < size[0] and 0 <= r["cam_peak"][1] < size[1]
            assert r["checkpoint_sha256"] == hashes[name]
            assert r["ms"] > 0
            votes.append(r["positive"])

            cam = np.load(folder / f"{name}_cam.npy")
            assert cam.dtype == np.float32 and cam.shape == size
            assert cam.min() >= 0.0 and cam.max() <= 1.0
            if cam.max() > 0:
                assert cam.max() == pytest.approx(1.0, abs=1e-6)
                assert cam[tuple(r["cam_peak"])] > 0.8 * cam.max()  # the peak is where the map is hot
            overlay = cv2.imread(str(folder / f"{name}.png"))
            # Small sources are enlarged to min(512, max_side) on the long side (legible caption).
            scale = min(512, core_config.render.max_side) / max(size)
            assert overlay is not None and overlay.shape[1] == round(size[1] * scale)
            assert overlay.shape[0] > round(size[0] * scale)  # image plus the caption band
            if not r["positive"]:  # a negative decision's map is evidence for normal: blue, never red
                b, g, red = (overlay[: round(size[0] * scale)][..., c].astype(int) for c in range(3))
                assert not ((red > g + 30) & (red > b + 30)).any()
        assert doc["consensus"] == (2 * sum(votes) >= len(votes))
        assert doc["files"] == {
            "summary": "summary.png",
            "overlays": {name: f"{name}.png" for name in thresholds},
            "cams": {name: f"{name}_cam.npy" for name in thresholds},
        }
        summary = cv2.imread(str(folder / "summary.png"))
        assert summary is not None and summary.shape[1] <= 1600
        panel_width = round(size[1] * 512 / max(size))  # panels are 512 px on the long side
        assert summary.shape[1] >= len(thresholds) * panel_width  # one panel per model


def test_cli_results_match_the_analyzer(
    analysed: tuple[subprocess.CompletedProcess[str], Path], inputs: dict[str, Path], core_config: CoreConfig
) -> None:
    _, out = analysed
    analyzer = Analyzer(core_config)
    images = [load_image(inputs[k], core_config.preprocess.max_pixels) for k in ("dicom", "png", "jpeg")]
    # One image at a time, as the command does: convolutions may round differently for other batch sizes.
    results = [analyzer.analyze([image])[0] for image in images]
    for key, expected in zip(("dicom", "png", "jpeg"), results, strict=True):
        doc = json.loads((out / inputs[key].stem / "result.json").read_text())
        for name, r in expected.models.items():
            assert doc["models"][name]["probability"] == pytest.approx(r.probability, abs=1e-5)
            assert doc["models"][name]["cam_peak"] == list(r.cam_peak)
            np.testing.assert_allclose(np.load(out / inputs[key].stem / f"{name}_cam.npy"), r.cam, atol=1e-5)
    # Probabilities are not all saturated, so this comparison means something.
    probs = [m.probability for res in results for m in res.models.values()]
    assert any(0.001 < p < 0.999 for p in probs)


def test_model_option_restricts(tiny_config_path: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli(
        "--config", tiny_config_path, "analyze", inputs["png"], "--out", tmp_path, "--model", "DenseNet121"
    )
    assert result.returncode == 0, result.stderr
    folder = tmp_path / inputs["png"].stem
    assert list(json.loads((folder / "result.json").read_text())["models"]) == ["DenseNet121"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "DenseNet121.png",
        "DenseNet121_cam.npy",
        "result.json",
        "summary.png",
    ]
    unknown = run_cli(
        "--config", tiny_config_path, "analyze", inputs["png"], "--out", tmp_path, "--model", "VGG"
    )
    assert unknown.returncode != 0 and "models.VGG" in unknown.stderr and "Traceback" not in unknown.stderr


def test_missing_checkpoint_is_one_line_saying_how_to_train(tmp_path: Path, inputs: dict[str, Path]) -> None:
    config = helpers.write_test_config(
        tmp_path / "node.toml",
        checkpoints={"ResNet18": tmp_path / "absent.pt"},
        port=11112,
        storage_dir=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
    )
    result = run_cli("--config", config, "analyze", inputs["png"], "--out", tmp_path / "out")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent.pt" in lines[0] and "gradcam-node train" in lines[0]


def _subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_help_exits_zero_and_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "not for diagnostic use" in result.stdout.lower() and "--config" in result.stdout
    for command in _subcommands():
        assert command in result.stdout


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_explains_itself(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: gradcam-node {command}")
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    description = action.choices[command].description
    assert description and len(description) > 20, f"`gradcam-node {command} --help` has no description"
    assert description.split()[0] in result.stdout


def test_same_stem_inputs_get_separate_folders(tiny_config_path: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "chest.png", tmp_path / "b" / "chest.png"
    for i, path in enumerate((first, second)):
        path.parent.mkdir()
        cv2.imwrite(str(path), (radiograph(60 + 10 * i, 60, i) * 255).astype(np.uint8))
    third = helpers.write_dataset(helpers.image_dataset(size=64), tmp_path / "chest.dcm")
    out = tmp_path / "out"
    result = run_cli(
        "--config", tiny_config_path, "analyze", first, second, third, "--out", out, "--model", "ResNet18"
    )
    assert result.returncode == 0, result.stderr
    inputs = {json.loads((d / "result.json").read_text())["input"] for d in out.iterdir()}
    assert inputs == {str(first), str(second), str(third)}
