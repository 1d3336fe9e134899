"""Configuration: the default file, choosing the file, refusing bad files (API and CLI), adding a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from gradcam.config import DEFAULT_CONFIG, REPO_ROOT, load_core_config
from gradcam.errors import ConfigError
from gradcam.models import file_sha256, save_checkpoint
from node.config import load_settings, resolve_config_path

CLI = Path(sys.executable).parent / "gradcam-node"


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``gradcam-node ARGS`` as a real subprocess from the repository root."""
    environ = {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}
    environ.update(env or {})
    return subprocess.run(
        [str(CLI), *map(str, args)],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_png(path: Path, size: int = 80) -> Path:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = 0.6 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.6) ** 2) / 0.03) + 0.3 * yy
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.clip(img * 255, 0, 255).astype(np.uint8))
    return path


# --- the default configuration -------------------------------------------------------------------


def test_default_config_has_the_three_models() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    models = {m.name: (m.builder, m.target_layer, m.input_size) for m in settings.core.models}
    # input sizes are those the demo checkpoints were trained at (checkpoints/README.md)
    assert models == {
        "ResNet18": ("resnet18", "layer4", 224),
        "EfficientNet-B0": ("efficientnet_b0", "features", 160),
        "DenseNet121": ("densenet121", "features", 160),
    }
    for m in settings.core.models:
        assert m.enabled and 0.0 < m.threshold < 1.0 and m.window is None
        assert m.checkpoint.parent == REPO_ROOT / "checkpoints"
    assert load_core_config() == settings.core  # the core alone reads the same file by default
    assert settings.destination("orthanc").port == 4242


# --- which file ----------------------------------------------------------------------------------


def test_resolve_config_path_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GRADCAM_NODE_CONFIG", raising=False)
    assert resolve_config_path() == DEFAULT_CONFIG
    monkeypatch.setenv("GRADCAM_NODE_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_config_path() == tmp_path / "env.toml"
    assert resolve_config_path(tmp_path / "flag.toml") == tmp_path / "flag.toml"


def test_cli_config_flag_and_environment_choose_the_file(tmp_path: Path) -> None:
    # Two distinct broken files: the error names whichever file was really read.
    by_env = tmp_path / "by-env.toml"
    by_flag = tmp_path / "by-flag.toml"
    by_env.write_text("[node\n")
    by_flag.write_text("[node\n")
    args = ("analyze", tmp_path / "x.png", "--out", tmp_path / "out")
    env = {"GRADCAM_NODE_CONFIG": str(by_env)}
    from_env = run_cli(*args, env=env)
    assert from_env.returncode != 0 and str(by_env) in from_env.stderr
    from_flag = run_cli("--config", by_flag, *args, env=env)
    assert from_flag.returncode != 0 and str(by_flag) in from_flag.stderr
    assert str(by_env) not in from_flag.stderr


# --- bad files -----------------------------------------------------------------------------------

Edit = Callable[[str], str]


# The ResNet18 threshold line as the default file has it (the first threshold line; values change with
# recalibration).
_RESNET_THRESHOLD = next(
    line for line in DEFAULT_CONFIG.read_text().splitlines() if line.startswith("threshold = ")
)


def _replace(old: str, new: str) -> Edit:
    def edit(text: str) -> str:
        assert old in text, f"test setup: {old!r} not in the default config"
        return text.replace(old, new, 1)

    return edit


BAD_FILES: dict[str, tuple[Edit, str, str]] = {
    # case: (edit of the default file, key named, words of the expectation)
    "missing key": (
        _replace('builder = "resnet18"\n', ""),
        "models.ResNet18.builder",
        "required key is missing",
    ),
    "wrong type": (_replace("port = 11112", 'port = "11112"'), "node.port", "expected an integer"),
    "wrong type bool": (
        _replace("enabled = true", 'enabled = "yes"'),
        "models.ResNet18.enabled",
        "true or false",
    ),
    "out of range": (
        _replace(_RESNET_THRESHOLD, "threshold = 1.25"),
        "models.ResNet18.threshold",
        "between 0.0 and 1.0",
    ),
    "out of range int": (
        _replace("max_side = 1024", "max_side = 10"),
        "render.max_side",
        "between 64 and 8192",
    ),
    "misspelt key": (_replace("max_side = 1024", "max_sise = 1024"), "render.max_sise", "unknown key"),
    "misspelt table": (_replace("[render]", "[rendr]"), "rendr", "unknown key"),
    "bad choice": (
        _replace('colormap = "jet"', 'colormap = "rainbow"'),
        "render.colormap",
        "expected one of",
    ),
    "unknown builder": (
        _replace('builder = "resnet18"', 'builder = "resnet19"'),
        "models.ResNet18.builder",
        "resnet19",
    ),
    "bad TOML": (_replace("port = 11112", "port = "), "", "not valid TOML"),
}


@pytest.mark.parametrize("case", [c for c in BAD_FILES if c != "unknown builder"])
def test_bad_file_names_file_key_and_expectation(case: str, tmp_path: Path) -> None:
    edit, key, words = BAD_FILES[case]
    path = tmp_path / "bad.toml"
    path.write_text(edit(DEFAULT_CONFIG.read_text()))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == key
    assert words in str(err) and str(path) in str(err) and key in str(err)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_settings(path)
    assert info.value.file == str(path)


def test_window_table_is_parsed_and_checked(tmp_path: Path) -> None:
    text = DEFAULT_CONFIG.read_text().replace(
        'target_layer = "layer4"', 'target_layer = "layer4"\nwindow = { center = 40, width = 800 }', 1
    )
    (tmp_path / "ok.toml").write_text(text)
    cfg = load_core_config(tmp_path / "ok.toml").model("ResNet18")
    assert cfg.window is not None and (cfg.window.center, cfg.window.width) == (40.0, 800.0)
    (tmp_path / "bad.toml").write_text(text.replace("width = 800", "width = 0"))
    with pytest.raises(ConfigError) as info:
        load_core_config(tmp_path / "bad.toml")
    assert info.value.key == "models.ResNet18.window.width"


@pytest.mark.parametrize("case", list(BAD_FILES) + ["missing file"])
def test_cli_refuses_bad_file_with_one_line(case: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    if case == "missing file":
        key, words = "", "not found"
    else:
        edit, key, words = BAD_FILES[case]
        path.write_text(edit(DEFAULT_CONFIG.read_text()))
    png = write_png(tmp_path / "x.png")
    result = run_cli("--config", path, "analyze", png, "--out", tmp_path / "out")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and key in lines[0] and words in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()

    debug = run_cli("--config", path, "--debug", "analyze", png, "--out", tmp_path / "out")
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and words in debug.stderr


# --- adding a model is a table and a checkpoint --------------------------------------------------


@pytest.mark.parametrize(("builder", "layer"), [("mobilenet_v3_small", "features"), ("resnet34", "layer4")])
def test_fourth_architecture_from_config_only(
    builder: str, layer: str, tmp_path: Path, tiny_config_path: Path, model_factory: Callable
) -> None:
    ckpt = tmp_path / f"{builder}.pt"
    save_checkpoint(model_factory(builder, layer, seed=7), ckpt, {"architecture": builder})
    config = tmp_path / "four.toml"
    config.write_text(
        tiny_config_path.read_text()
        + f'\n[models.Extra]\nbuilder = "{builder}"\ncheckpoint = "{ckpt}"\ntarget_layer = "{layer}"\n'
        "input_size = 64\nthreshold = 0.5\n"
    )
    assert [m.name for m in load_core_config(config).enabled_models][-1] == "Extra"
    png = write_png(tmp_path / "in" / "chest.png")
    out = tmp_path / "out"
    result = run_cli(
        "--config", config, "analyze", png, "--out", out, "--model", "Extra", "--model", "ResNet18"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "chest" / "result.json").read_text())
    assert list(doc["models"]) == ["Extra", "ResNet18"]
    extra = doc["models"]["Extra"]
    assert extra["checkpoint_sha256"] == file_sha256(ckpt)
    assert 0.0 <= extra["probability"] <= 1.0
    cam = np.load(out / "chest" / "Extra_cam.npy")
    assert cam.shape == (80, 80) and cam.dtype == np.float32 and cam.max() == pytest.approx(1.0)
    assert (out / "chest" / "Extra.png").is_file()
