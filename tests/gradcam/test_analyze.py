"""``gradcam-node analyze`` as a real subprocess, and the command line's help."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import time
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


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300
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
        cv2.imwrite(str(path), (radiograph(70 + 10 * i, 70, i) * 255).astype(np.uint8))
    third = helpers.write_dataset(helpers.image_dataset(size=64), tmp_path / "chest.dcm")
    out = tmp_path / "out"
    result = run_cli(
        "--config", tiny_config_path, "analyze", first, second, third, "--out", out, "--model", "ResNet18"
    )
    assert result.returncode == 0, result.stderr
    folders = {d.name: json.loads((d / "result.json").read_text())["input"] for d in out.iterdir()}
    assert folders == {"chest": str(first), "chest_2": str(second), "chest_3": str(third)}


# --- the node's rules (gradcam.eligibility), --force, folders, progress ----------------------------------

TOO_SMALL = (
    "image of 16 x 16 pixels is too small to be a radiograph (at least 64 a side: [preprocess] min_side)"
)


def _skip_line(path: Path, reason: str) -> str:
    return f"gradcam-node analyze: SKIP {path}: {reason} (use --force to analyse anyway)"


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the node would skip (CT, CT saying DX, 16 x 16 DICOM and PNG) and ones nothing may analyse."""
    d = tmp_path_factory.mktemp("refused")
    files = {
        "ct": helpers.write_dataset(helpers.image_dataset(modality="CT", size=96, seed=5), d / "ct.dcm"),
        "ct_as_dx": helpers.write_dataset(
            helpers.image_dataset(modality="DX", sop_class_uid=helpers.CT_SOP_CLASS, size=96, seed=6),
            d / "ct-as-dx.dcm",
        ),
        "small_dicom": helpers.write_dataset(helpers.image_dataset(size=16, seed=7), d / "small.dcm"),
        "small_png": d / "small.png",
        "blank": d / "blank.png",
    }
    cv2.imwrite(str(files["small_png"]), (radiograph(16, 16, 8) * 255).astype(np.uint8))
    cv2.imwrite(str(files["blank"]), np.full((96, 96), 128, np.uint8))
    floats = helpers.image_dataset(size=96, seed=9)
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    floats.BitsAllocated = 32
    floats.FloatPixelData = radiograph(96, 96, 9).astype(np.float32).tobytes()
    files["float"] = helpers.write_dataset(floats, d / "float.dcm")
    return files


def test_files_the_node_would_skip_are_skipped_with_their_reason(
    tiny_config_path: Path, inputs: dict[str, Path], refused: dict[str, Path], tmp_path: Path
) -> None:
    names = ["ct", "ct_as_dx", "small_dicom", "small_png"]
    result = run_cli(
        "--config", tiny_config_path, "analyze", *[refused[n] for n in names], inputs["png"],
        "--out", tmp_path, "--model", "ResNet18",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr  # skipped by a rule is not a failure
    ct_class = f"CT Image Storage ({helpers.CT_SOP_CLASS})"
    assert result.stderr.splitlines() == [
        _skip_line(refused["ct"], "modality CT is not CR/DX"),
        _skip_line(
            refused["ct_as_dx"],
            f"SOP class {ct_class} is not a CR or DX image although Modality says DX: the SOP class decides",
        ),
        _skip_line(refused["small_dicom"], TOO_SMALL),
        _skip_line(refused["small_png"], TOO_SMALL),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest-png"]  # nothing written for the others
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith(f"{inputs['png']}: consensus")


def test_force_analyses_what_the_rules_skip_but_never_an_unusable_image(
    tiny_config_path: Path, refused: dict[str, Path], tmp_path: Path
) -> None:
    names = ["ct", "blank", "small_dicom", "float", "small_png"]
    result = run_cli(
        "--config", tiny_config_path, "analyze", *[refused[n] for n in names],
        "--out", tmp_path, "--model", "ResNet18", "--force",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr  # the blank and the float image could not be analysed
    assert result.stderr.splitlines() == [
        f"gradcam-node analyze: {refused['blank']}: blank image: every pixel has the same value after the "
        "display pipeline; nothing to analyse",
        f"gradcam-node analyze: {refused['float']}: Float Pixel Data (7FE0,0008) is not analysed: "
        "radiographs store integers in Pixel Data (7FE0,0010)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "small", "small_2"]
    for folder, size in (("ct", 96), ("small", 16), ("small_2", 16)):
        doc = json.loads((tmp_path / folder / "result.json").read_text())
        assert doc["image_size"] == {"rows": size, "columns": size}
        assert 0.0 <= doc["models"]["ResNet18"]["probability"] <= 1.0
    assert json.loads((tmp_path / "ct" / "result.json").read_text())["input"] == str(refused["ct"])


def test_folders_are_analysed_recursively_and_an_empty_one_is_an_error(
    tiny_config_path: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    study = tmp_path / "study"
    (study / "sub").mkdir(parents=True)
    cv2.imwrite(str(study / "a.png"), (radiograph(80, 80, 11) * 255).astype(np.uint8))
    cv2.imwrite(str(study / ".hidden.png"), (radiograph(80, 80, 12) * 255).astype(np.uint8))
    (study / "notes.txt").write_text("not an image: passed over quietly in a folder\n")
    helpers.write_dataset(helpers.image_dataset(size=64, seed=13), study / "sub" / "b.dcm")
    # no suffix, as in a DICOMDIR export: found by its DICM preamble
    helpers.write_dataset(helpers.image_dataset(size=64, seed=14), study / "sub" / "IM0001")
    out = tmp_path / "out"
    result = run_cli("--config", tiny_config_path, "analyze", study, "--out", out, "--model", "ResNet18")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    done = [line.split(": consensus")[0] for line in result.stdout.splitlines()]
    assert done == [str(study / "a.png"), str(study / "sub" / "IM0001"), str(study / "sub" / "b.dcm")]
    assert sorted(p.name for p in out.iterdir()) == ["IM0001", "a", "b"]

    empty = tmp_path / "empty"
    (empty / "deeper").mkdir(parents=True)
    (empty / "deeper" / "readme.txt").write_text("no images here\n")
    out = tmp_path / "out-empty"
    result = run_cli(
        "--config", tiny_config_path, "analyze", empty, inputs["png"], "--out", out, "--model", "ResNet18"
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"gradcam-node analyze: {empty}: no DICOM, PNG or JPEG file in this folder"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["chest-png"]  # the other paths are still done


def _run_on_terminal(args: list[str | Path], timeout: float = 300) -> tuple[int, str, str]:
    """Run the command with stderr on a pseudo-terminal; ``(exit code, stdout, what the terminal got)``."""
    master, slave = pty.openpty()
    env = {**_env(), "COLUMNS": "100"}
    proc = subprocess.Popen(
        [str(CLI), *map(str, args)], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    data = os.read(master, 4096)
                except OSError:  # EIO: the command has exited and the terminal is closed
                    break
                if not data:
                    break
                got += data
        stdout, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout.decode(), got.decode()


def test_progress_line_only_on_a_terminal(
    tiny_config_path: Path, inputs: dict[str, Path], refused: dict[str, Path], tmp_path: Path
) -> None:
    files = [inputs["png"], refused["small_png"], inputs["jpeg"]]
    args = ["--config", tiny_config_path, "analyze", *files, "--model", "ResNet18", "--out"]
    skip = _skip_line(refused["small_png"], TOO_SMALL)

    code, stdout, terminal = _run_on_terminal([*args, tmp_path / "tty"])
    assert code == 0, terminal
    assert len(stdout.splitlines()) == 2
    # each progress state is written over the last (carriage returns), cleared before any other line
    shown = [part.strip() for part in terminal.split("\r") if part.strip()]
    assert shown == [
        f"gradcam-node analyze: 1/3 {files[0].name}",
        f"gradcam-node analyze: 2/3 {files[1].name}",
        skip,
        f"gradcam-node analyze: 3/3 {files[2].name}",
    ], terminal
    assert terminal.rstrip(" ").endswith("\r"), "the progress line must be cleared at the end"

    piped = run_cli(*args, tmp_path / "pipe")  # stderr is a pipe: the result lines only
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr.splitlines() == [skip]
    assert len(piped.stdout.splitlines()) == 2
