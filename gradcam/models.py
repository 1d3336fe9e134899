"""Model registry: torchvision architectures with a single-logit head, and safe checkpoint loading."""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from gradcam.config import ModelConfig
from gradcam.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointMissingError,
    ConfigError,
    NotACheckpointError,
    UnsafeCheckpointError,
)

__all__ = [
    "LoadedModel",
    "build_model",
    "read_checkpoint",
    "check_keys",
    "load_model",
    "save_checkpoint",
    "file_sha256",
    "resolve_module",
    "INFERENCE_MEMORY_FORMAT",
    "place_model",
    "place_batch",
]

# Inference runs channels-last (NHWC): oneDNN's fastest layout for these convolutions on a CPU, and the one
# tensor cores want on a GPU. Measured on this project's CI machine, batch 4, one thread, ms an image:
# ResNet18 24.9 -> 17.5, EfficientNet-B0 8.5 -> 7.0, DenseNet121 28.5 -> 23.9 (the same weights and
# arithmetic, in another order: results agree to float rounding).
INFERENCE_MEMORY_FORMAT = torch.channels_last


def place_model(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module`` on ``device`` in the layout inference runs in (in place; returned for chaining)."""
    return module.to(device, memory_format=INFERENCE_MEMORY_FORMAT)


def place_batch(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """An input batch ``(N, C, H, W)`` on ``device`` in the layout of :func:`place_model`."""
    return x.to(device, memory_format=INFERENCE_MEMORY_FORMAT, non_blocking=True)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference: eval mode, parameters frozen."""

    name: str
    cfg: ModelConfig
    module: nn.Module = field(repr=False)
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def _replace_head(model: nn.Module, builder: str) -> nn.Module:
    """Swap the last ``nn.Linear`` of the classifier for a single-output one."""
    for attr in ("fc", "classifier", "head", "heads"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Linear(head.in_features, 1))
            return model
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    head[i] = nn.Linear(head[i].in_features, 1)
                    return model
    raise CheckpointError(f"builder {builder!r}: no final nn.Linear found to replace with a single logit")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build ``cfg.builder`` from torchvision with ``weights=None`` (never a download), single logit."""
    try:
        builder = torchvision.models.get_model_builder(cfg.builder)
    except ValueError:
        raise ConfigError(
            cfg.config_file,
            f"models.{cfg.name}.builder",
            f"{cfg.builder!r} is not a torchvision builder (e.g. resnet18, efficientnet_b0, densenet121)",
        ) from None
    model = builder(weights=None)
    model = _replace_head(model, cfg.builder)
    resolve_module(model, cfg.target_layer, cfg.name, cfg.config_file)
    return model


def resolve_module(model: nn.Module, dotted: str, name: str = "", file: str = "") -> nn.Module:
    """The submodule at a dotted path such as ``layer4`` or ``features.denseblock4``."""
    try:
        return model.get_submodule(dotted)
    except AttributeError:
        raise ConfigError(
            file, f"models.{name}.target_layer", f"{dotted!r} is not a module of this architecture"
        ) from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
_PICKLE_PROTO = b"\x80"  # the legacy format: a pickle (protocol 2 and later start with PROTO)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_checkpoint(
    path: Path, model: str = "NAME", source: str = "the model's `checkpoint` key"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint safely: ``(state_dict as fp32, meta)``.

    Accepts a bare state dict, ``{"model_state_dict": ...}`` or ``{"state_dict": ...}``, keys prefixed
    ``module.`` (DataParallel), fp16 or fp32 tensors. Always ``weights_only=True``. ``model`` and ``source``
    only word the error messages (the model to train, where the path came from).
    """
    if not path.is_file():
        raise CheckpointMissingError(
            f"checkpoint {path} not found: train one with `gradcam-node train --model {model} --out {path}` "
            f"or point {source} at an existing file"
        )
    with open(path, "rb") as fh:
        head = fh.read(len(_ZIP_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        what = "an empty file" if not head else f"neither torch.save's zip format nor a pickle: {head!r}..."
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint file ({what}): point {source} at a checkpoint saved by "
            "`gradcam-node train` or torch.save(model.state_dict(), path)"
        )
    try:
        with warnings.catch_warnings():
            # a pickle of protocol 3+ that is not torch's: the failure below says it, not this warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = _UNSUPPORTED_GLOBAL.search(str(exc))
        if needed is None:  # a pickle, but not one torch.save wrote (or a damaged one)
            raise NotACheckpointError(
                f"{path} is not a PyTorch checkpoint file (a pickle torch cannot read: "
                f"{_last_line(exc)}): point {source} at a checkpoint saved by `gradcam-node train` or "
                "torch.save(model.state_dict(), path)"
            ) from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} needs arbitrary unpickling (it holds {needed.group(1)}), which is refused "
            "(weights_only=True): re-save it as a plain state dict, torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # a damaged file fails in many ways (zip, storage, EOF, key errors)
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({type(exc).__name__}: {_first_line(exc)}): "
            "copy it again or re-save it"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    meta: dict[str, Any] = {}
    state: Any = obj
    for key in ("model_state_dict", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            state = obj[key]
            meta = obj.get("meta", {}) if isinstance(obj.get("meta", {}), dict) else {}
            break
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry {k!r} is not a tensor")
        k = k[len("module.") :] if k.startswith("module.") else k
        tensors[k] = v.float() if v.is_floating_point() else v
    return tensors, meta


def _first_line(exc: BaseException) -> str:
    """The first sentence: torch adds paragraphs of advice that do not fit in one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else "no details"


def _last_line(exc: BaseException) -> str:
    """torch's weights-only unpickler puts the reason on the last of many lines (after a link)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "://" not in line]
    return lines[-1] if lines else "no details"


def check_keys(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit the architecture: {'; '.join(problems)}"
        )


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the architecture, load its checkpoint, switch to eval mode and freeze the parameters."""
    model = build_model(cfg)
    table = f"[models.{cfg.name}]" + (f" in {cfg.config_file}" if cfg.config_file else "")
    try:
        state, meta = read_checkpoint(cfg.checkpoint, cfg.name, f"`checkpoint` of {table}")
        check_keys(cfg.checkpoint, model, state)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"model {cfg.name}: {exc}: point `checkpoint` of {table} at a {cfg.builder} checkpoint "
            "or set `builder` to the checkpoint's architecture"
        ) from None
    except CheckpointError as exc:  # every message already says what to do; add which model
        raise type(exc)(f"model {cfg.name}: {exc}") from None
    model.load_state_dict(state, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=cfg.name, cfg=cfg, module=model, sha256=file_sha256(cfg.checkpoint), meta=meta)


def save_checkpoint(module: nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Save ``{"model_state_dict": fp16 tensors, "meta": meta}``; returns the file's sha256."""
    state = {
        k: (v.detach().to("cpu").half() if v.is_floating_point() else v.detach().to("cpu"))
        for k, v in module.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model_state_dict": state, "meta": meta}, tmp)
    tmp.replace(path)
    return file_sha256(path)
