"""Model registry and safe checkpoint loading."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from gradcam.analysis import Analyzer
from gradcam.config import CoreConfig, ModelConfig
from gradcam.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointMissingError,
    ConfigError,
    NotACheckpointError,
    UnsafeCheckpointError,
)
from gradcam.models import build_model, file_sha256, load_model, read_checkpoint, save_checkpoint
from gradcam.preprocess import SourceImage

SIZE = 64


def cfg_for(
    path: Path, builder: str = "resnet18", layer: str = "layer4", config_file: str = ""
) -> ModelConfig:
    return ModelConfig("Net", builder, path, layer, input_size=SIZE, threshold=0.5, config_file=config_file)


def _one_line(message: str) -> str:
    """What a user reads: a single line (no torch advice paragraphs, no traceback)."""
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def original(model_factory: Callable) -> nn.Module:
    return model_factory("resnet18", "layer4", seed=3)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).reshape(-1)


def _state(model: nn.Module, prefix: str = "", half: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        out[prefix + k] = v.half() if half and v.is_floating_point() else v.clone()
    return out


LAYOUTS: dict[str, Callable[[nn.Module], object]] = {
    "bare": lambda m: _state(m),
    "model_state_dict": lambda m: {"model_state_dict": _state(m), "meta": {"epochs": 3}},
    "state_dict": lambda m: {"state_dict": _state(m), "epoch": 3},
    "module. prefix": lambda m: _state(m, prefix="module."),
    "module. prefix wrapped": lambda m: {"model_state_dict": _state(m, prefix="module.")},
    "fp16": lambda m: {"model_state_dict": _state(m, half=True)},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpoint_layouts_give_the_original_outputs(
    layout: str, original: nn.Module, batch: torch.Tensor, tmp_path: Path
) -> None:
    path = tmp_path / "net.pt"
    torch.save(LAYOUTS[layout](original), path)
    loaded = load_model(cfg_for(path))
    expected, got = _logits(original, batch), _logits(loaded.module, batch)
    scale = float(expected.abs().max())
    tolerance = 2e-2 * scale if layout == "fp16" else 1e-5 * scale
    assert torch.allclose(got, expected, atol=tolerance, rtol=0), (got, expected)
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    if layout == "model_state_dict":
        assert loaded.meta == {"epochs": 3}


def test_save_checkpoint_writes_fp16_with_meta_and_returns_hash(original: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "net.pt"
    digest = save_checkpoint(original, path, {"architecture": "resnet18", "seed": 3})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    obj = torch.load(path, weights_only=True)
    assert obj["meta"] == {"architecture": "resnet18", "seed": 3}
    floats = [v for v in obj["model_state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    state, meta = read_checkpoint(path)
    assert meta["seed"] == 3 and all(
        v.dtype == torch.float32 for v in state.values() if v.is_floating_point()
    )
    assert not list(tmp_path.glob("sub/*.tmp"))


class Sneaky:
    """Any class: unpickling it would run arbitrary code paths."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_checkpoint_needing_unpickling_is_refused(original: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model_state_dict": _state(original), "extra": Sneaky()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(cfg_for(path))
    message = _one_line(str(info.value))
    assert message.startswith(f"model Net: checkpoint {path} needs arbitrary unpickling (it holds ")
    assert f"{Sneaky.__module__}.Sneaky)" in message and "refused (weights_only=True)" in message
    assert message.endswith("re-save it as a plain state dict, torch.save(model.state_dict(), path)")

    whole = tmp_path / "module.pt"
    torch.save(original, whole)  # a whole pickled nn.Module
    with pytest.raises(UnsafeCheckpointError, match="arbitrary unpickling"):
        load_model(cfg_for(whole))


def test_whole_torchvision_model_is_unsafe_and_names_its_class(tmp_path: Path) -> None:
    """torch.save(model) instead of torch.save(model.state_dict()): a real pickle that needs globals, so
    the unsafe message, naming what it holds (not "not a checkpoint")."""
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(cfg_for(path))
    message = _one_line(str(info.value))
    assert not isinstance(info.value, NotACheckpointError)
    assert "(it holds torchvision.models.resnet.ResNet)" in message, message
    assert str(path) in message and "torch.save(model.state_dict(), path)" in message


NOT_A_CHECKPOINT: dict[str, tuple[bytes, str]] = {
    "text file renamed .pt": (
        b"these are not weights\n",
        "neither torch.save's zip format nor a pickle: b'thes'...",
    ),
    "random bytes": (
        bytes([0x13, 0x37]) + bytes(range(254)),
        "neither torch.save's zip format nor a pickle: b'\\x137",
    ),
    "empty file": (b"", "an empty file"),
}


@pytest.mark.parametrize("kind", list(NOT_A_CHECKPOINT))
def test_file_that_is_no_checkpoint_at_all(kind: str, tmp_path: Path) -> None:
    content, what = NOT_A_CHECKPOINT[kind]
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    config = tmp_path / "node.toml"
    with pytest.raises(NotACheckpointError) as info:
        load_model(cfg_for(path, config_file=str(config)))
    message = _one_line(str(info.value))
    assert message.startswith(f"model Net: {path} is not a PyTorch checkpoint file ({what}"), message
    assert message.endswith(
        f"point `checkpoint` of [models.Net] in {config} at a checkpoint saved by `gradcam-node train` or "
        "torch.save(model.state_dict(), path)"
    ), message
    assert "unpickling" not in message  # not mistaken for an unsafe checkpoint
    with pytest.raises(NotACheckpointError):
        read_checkpoint(path)  # the reader itself, without a model around it


def test_damaged_zip_says_copy_it_again(original: nn.Module, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(original.state_dict(), good)
    data = good.read_bytes()
    path = tmp_path / "damaged.pt"
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy: the zip's central directory is gone
    with pytest.raises(CheckpointError) as info:
        load_model(cfg_for(path))
    assert type(info.value) is CheckpointError
    message = _one_line(str(info.value))
    assert message.startswith(f"model Net: checkpoint {path} is not a readable PyTorch file (")
    assert message.endswith("): copy it again or re-save it"), message


def test_mismatch_lists_missing_and_unexpected_keys(original: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pt"
    state = _state(original)
    state["bogus.weight"] = torch.zeros(2)
    torch.save(state, path)
    config = tmp_path / "node.toml"
    with pytest.raises(CheckpointMismatchError) as info:  # resnet34 has more blocks than resnet18
        load_model(cfg_for(path, "resnet34", config_file=str(config)))
    message = _one_line(str(info.value))
    assert message.startswith(f"model Net: checkpoint {path} does not fit the architecture: ")
    assert "missing keys" in message and "layer1.2.conv1.weight" in message
    assert "1 unexpected keys" in message and "bogus.weight" in message
    assert message.endswith(
        f"point `checkpoint` of [models.Net] in {config} at a resnet34 checkpoint or set `builder` to the "
        "checkpoint's architecture"
    ), message


def test_mismatch_lists_shape_differences(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(cfg_for(tmp_path / "unused.pt"))
    model.fc = nn.Linear(512, 2)  # a two-class head where one logit is expected
    torch.save(model.state_dict(), tmp_path / "two.pt")
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatches.*fc\.weight \(2, 512\) != \(1, 512\)"
    ) as info:
        load_model(cfg_for(tmp_path / "two.pt"))
    message = _one_line(str(info.value))
    assert message.startswith(f"model Net: checkpoint {tmp_path / 'two.pt'} does not fit the architecture: ")
    assert message.endswith(
        "point `checkpoint` of [models.Net] at a resnet18 checkpoint or set `builder` to the checkpoint's "
        "architecture"
    ), message


def test_missing_checkpoint_says_how_to_get_one(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    config = tmp_path / "node.toml"
    with pytest.raises(CheckpointMissingError) as info:
        load_model(cfg_for(path, config_file=str(config)))
    assert _one_line(str(info.value)) == (
        f"model Net: checkpoint {path} not found: train one with "
        f"`gradcam-node train --model Net --out {path}` "
        f"or point `checkpoint` of [models.Net] in {config} at an existing file"
    )
    with pytest.raises(CheckpointMissingError, match=r"--model NAME .* the model's `checkpoint` key"):
        read_checkpoint(path)  # the reader alone: generic wording


def test_unknown_builder_and_target_layer_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resnet19"):
        build_model(cfg_for(tmp_path / "x.pt", "resnet19"))
    with pytest.raises(ConfigError) as info:
        build_model(cfg_for(tmp_path / "x.pt", "resnet18", "layer9"))
    assert info.value.key == "models.Net.target_layer" and "layer9" in str(info.value)


def test_sha256_is_reported_in_results(core_config: CoreConfig, tiny_checkpoints: dict[str, Path]) -> None:
    analyzer = Analyzer(core_config)
    image = SourceImage(pixels=np.random.default_rng(0).random((40, 50), dtype=np.float32), source="r")
    (result,) = analyzer.analyze([image])
    assert set(result.models) == set(tiny_checkpoints)
    for name, path in tiny_checkpoints.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert analyzer.models[name].sha256 == digest
        assert result.models[name].checkpoint_sha256 == digest
        assert result.models[name].summary()["checkpoint_sha256"] == digest


def test_models_are_built_without_any_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub / "hub"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for builder, layer in (
        ("resnet18", "layer4"),
        ("efficientnet_b0", "features"),
        ("densenet121", "features"),
    ):
        path = tmp_path / f"{builder}.pt"
        model = build_model(cfg_for(path, builder, layer))
        assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 1
        save_checkpoint(model, path, {})
        load_model(cfg_for(path, builder, layer))
    assert not hub.exists() or not any(p.is_file() for p in hub.rglob("*"))
