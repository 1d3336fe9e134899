"""``gradcam-node train``: one short epoch on tiny phantoms and on an ImageFolder set; the checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gradcam.config import REPO_ROOT, CoreConfig
from gradcam.models import load_model
from gradcam.phantoms import generate_dataset
from gradcam.training import TrainOptions, train

CLI = Path(sys.executable).parent / "gradcam-node"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic 64-pixel phantoms (labels.csv, images, lesion boxes)."""
    out = tmp_path_factory.mktemp("phantoms")
    generate_dataset(out, count=12, seed=0, size=64)
    assert (out / "labels.csv").is_file()
    return out


def _chest(label: int, seed: int, size: int = 64) -> np.ndarray:
    """A hand-made chest-like PNG: two dark lungs; positives get a bright patch in the right lung."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    lungs = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.03) + np.exp(
        -((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.03
    )
    img = 0.8 - 0.5 * lungs + rng.normal(0, 0.03, (size, size))
    if label:
        img += 0.4 * np.exp(-((xx - 0.3) ** 2 + (yy - 0.55) ** 2) / 0.005)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder-style set: train/{NORMAL,PNEUMONIA} 6 each, val/{NORMAL,PNEUMONIA} 2 each."""
    root = tmp_path_factory.mktemp("imagefolder")
    seed = 0
    for split, count in (("train", 6), ("val", 2)):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                seed += 1
                cv2.imwrite(str(root / split / cls / f"{cls.lower()}-{i}.png"), _chest(label, seed))
    return root


def _check_checkpoint(path: Path, builder: str, epochs: int, seed: int) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling needed
    floats = [v for v in obj["model_state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    meta = obj["meta"]
    assert meta["architecture"] == builder and meta["epochs"] == epochs and meta["seed"] == seed
    assert set(meta["metrics"]) >= {"val_auc", "val_loss"}
    assert len(meta["history"]) == epochs and meta["best_epoch"] in range(1, epochs + 1)
    return meta


def test_train_one_epoch_on_phantoms(
    phantoms: Path, tiny_config_path: Path, core_config: CoreConfig, tmp_path: Path
) -> None:
    out = tmp_path / "trained" / "resnet18.pt"
    result = run_cli(
        "--config",
        tiny_config_path,
        "train",
        "--data",
        phantoms,
        "--model",
        "ResNet18",
        "--epochs",
        1,
        "--out",
        out,
        "--batch-size",
        4,
        "--input-size",
        64,
        "--device",
        "cpu",
        "--seed",
        5,
        "--cam-guidance",
        0.5,
        "--no-augment",
    )
    assert result.returncode == 0, result.stderr
    meta = _check_checkpoint(out, "resnet18", epochs=1, seed=5)
    assert meta["cam_guidance"] == 0.5 and meta["augment"] is False  # the CLI options reach the loop
    assert meta["input_size"] == 64 and meta["target_layer"] == "layer4" and meta["model"] == "ResNet18"
    assert meta["train_images"] + meta["val_images"] == 12 and meta["val_images"] >= 1
    assert hashlib.sha256(out.read_bytes()).hexdigest() in result.stderr
    # The checkpoint fits the configured architecture and loads safely.
    cfg = dataclasses.replace(core_config.model("ResNet18"), checkpoint=out)
    loaded = load_model(cfg)
    assert loaded.meta["seed"] == 5 and loaded.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    # Fine-tuning starts from that checkpoint and says so in its meta.
    tuned = tmp_path / "trained" / "tuned.pt"
    again = run_cli(
        "--config", tiny_config_path, "train", "--data", phantoms, "--model", "ResNet18", "--epochs", 1,
        "--out", tuned, "--batch-size", 4, "--input-size", 64, "--device", "cpu", "--init", out,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert torch.load(tuned, weights_only=True)["meta"]["init"] == {"file": out.name, "sha256": loaded.sha256}


def test_training_is_reproducible_with_a_seed(
    phantoms: Path, core_config: CoreConfig, tmp_path: Path
) -> None:
    cfg = core_config.model("ResNet18")
    opts = TrainOptions(epochs=1, seed=9, batch_size=4, device="cpu")
    first = train(cfg, phantoms, tmp_path / "a.pt", opts, core_config.preprocess.max_pixels)
    second = train(cfg, phantoms, tmp_path / "b.pt", opts, core_config.preprocess.max_pixels)
    a = torch.load(tmp_path / "a.pt", weights_only=True)["model_state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["model_state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["history"] == second["history"]
    other = train(cfg, phantoms, tmp_path / "c.pt", dataclasses.replace(opts, seed=10), 10**8)
    c = torch.load(tmp_path / "c.pt", weights_only=True)["model_state_dict"]
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
    assert other["seed"] == 10


def test_train_on_image_folder_uses_its_val_split(
    image_folder: Path, core_config: CoreConfig, tmp_path: Path
) -> None:
    cfg = core_config.model("EfficientNet-B0")
    opts = TrainOptions(epochs=1, seed=1, batch_size=4, device="cpu")
    meta = train(cfg, image_folder, tmp_path / "effnet.pt", opts, core_config.preprocess.max_pixels)
    assert meta["train_images"] == 12 and meta["val_images"] == 4
    _check_checkpoint(tmp_path / "effnet.pt", "efficientnet_b0", epochs=1, seed=1)
    load_model(dataclasses.replace(cfg, checkpoint=tmp_path / "effnet.pt"))


def test_bad_training_requests_are_one_line_errors(
    phantoms: Path, tiny_config_path: Path, tmp_path: Path
) -> None:
    zero = run_cli(
        "--config",
        tiny_config_path,
        "train",
        "--data",
        phantoms,
        "--model",
        "ResNet18",
        "--epochs",
        0,
        "--out",
        tmp_path / "x.pt",
    )
    assert zero.returncode != 0 and "--epochs" in zero.stderr and len(zero.stderr.strip().splitlines()) == 1
    unknown = run_cli(
        "--config",
        tiny_config_path,
        "train",
        "--data",
        phantoms,
        "--model",
        "VGG",
        "--epochs",
        1,
        "--out",
        tmp_path / "x.pt",
    )
    assert unknown.returncode != 0 and "models.VGG" in unknown.stderr and "Traceback" not in unknown.stderr
    assert not (tmp_path / "x.pt").exists()
