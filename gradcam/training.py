"""``gradcam-node train``: train one registry model (single logit, BCE with logits) on a labelled folder."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from gradcam.cam import CamEngine
from gradcam.config import CoreConfig, ModelConfig
from gradcam.datasets import Sample, load_samples, split_samples
from gradcam.metrics import roc_auc
from gradcam.models import build_model, check_keys, file_sha256, read_checkpoint, save_checkpoint
from gradcam.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image

__all__ = ["TrainOptions", "train", "train_command", "load_split", "pick_device"]


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    epochs: int
    seed: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    val_fraction: float = 0.2
    cam_guidance: float = 0.0
    augment: bool = True
    init: Path | None = None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here")
    return device


def load_split(data: Path, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Phantom folders (labels.csv) are split; ImageFolder sets use their own train/val folders."""
    if (data / "labels.csv").is_file():
        return split_samples(load_samples(data), val_fraction, seed)
    train_set = load_samples(data, "train")
    try:
        val_set = load_samples(data, "val")
    except ValueError:
        val_set = []
    if len({s.label for s in val_set}) < 2:  # the public set's val/ has 16 images; split train instead
        return split_samples(train_set + val_set, val_fraction, seed)
    return train_set, val_set


def _preload(samples: Sequence[Sample], size: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image once, display-ready grey at the model's input size (float16 to save memory), and
    its lesion boxes painted as a mask at the same size (zeros where there are none)."""
    out = np.empty((len(samples), size, size), np.float16)
    boxes = np.zeros((len(samples), size, size), np.float16)
    for i, s in enumerate(samples):
        img = load_image(s.path, max_pixels)
        out[i] = cv2.resize(img.pixels, (size, size), interpolation=cv2.INTER_AREA)
        for x0, y0, x1, y1 in s.boxes:
            sx, sy = size / img.width, size / img.height
            boxes[i, round(y0 * sy) : round(y1 * sy), round(x0 * sx) : round(x1 * sx)] = 1.0
    return out, boxes


def _augment(
    img: np.ndarray, box_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Small affine (rotation, scale, shift), exposure and noise jitter; the box mask follows the
    geometry. No flips: anatomy is sided."""
    size = img.shape[0]
    angle = rng.uniform(-7, 7)
    scale = rng.uniform(0.9, 1.1)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * size
    out = cv2.warpAffine(img.astype(np.float32), m, (size, size), borderMode=cv2.BORDER_REFLECT)
    mask = (
        cv2.warpAffine(box_mask.astype(np.float32), m, (size, size), borderValue=0.0)
        if box_mask.any()
        else (box_mask.astype(np.float32))
    )
    gamma = math.exp(rng.uniform(-0.25, 0.25))
    out = np.clip(out, 0, 1) ** gamma
    out = out * rng.uniform(0.85, 1.15) + rng.uniform(-0.08, 0.08)
    out += rng.normal(0, rng.uniform(0, 0.03), out.shape).astype(np.float32)
    return np.clip(out, 0, 1).astype(np.float32), mask


def _guidance_loss(
    engine: CamEngine, x: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits, and for images with lesion boxes the share of the (positive-target) CAM outside them.

    Only phantom folders have boxes: this teaches the model to look where the lesion is, so that its
    Grad-CAM can be checked against ground truth. Real data sets without boxes train without it.
    """
    act, logits = engine.traced_forward(x)
    cams = engine.closed_form_cam(act, torch.ones_like(logits.reshape(-1)))
    has_box = masks.flatten(1).amax(dim=1) > 0
    if not bool(has_box.any()):
        return logits.reshape(-1), None
    cover = torch.nn.functional.adaptive_avg_pool2d(masks.unsqueeze(1), cams.shape[-2:]).squeeze(1)
    inside = (cams * cover).sum(dim=(1, 2)) / (cams.sum(dim=(1, 2)) + 1e-6)
    return logits.reshape(-1), (1.0 - inside[has_box]).mean()


def _to_tensor(batch: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(batch.astype(np.float32)).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _predict(model: nn.Module, images: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    model.eval()
    probs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = _to_tensor(images[i : i + batch]).to(device)
            probs.append(torch.sigmoid(model(x).reshape(-1).float()).cpu().numpy())
    return np.concatenate(probs) if probs else np.empty(0)


def _progress(epoch: int, epochs: int, done: int, total: int, loss: float, t0: float) -> None:
    width = 24
    fill = int(width * done / max(1, total))
    rate = done / max(1e-9, time.perf_counter() - t0)
    print(
        f"\repoch {epoch}/{epochs} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
        f"loss {loss:.4f} ({rate:.1f} img/s)",
        end="",
        file=sys.stderr,
        flush=True,
    )


def train(cfg: ModelConfig, data: Path, out: Path, opts: TrainOptions, max_pixels: int) -> dict:
    """Train and save the best epoch (by validation AUC). Returns the checkpoint's metadata."""
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    device = pick_device(opts.device)
    train_set, val_set = load_split(data, opts.val_fraction, opts.seed)
    if len({s.label for s in train_set}) < 2:
        raise ValueError(f"{data}: training data needs both labels")
    size = cfg.input_size
    print(
        f"{cfg.name}: {len(train_set)} training and {len(val_set)} validation images at {size} px "
        f"on {device}",
        file=sys.stderr,
    )
    x_train, box_train = _preload(train_set, size, max_pixels)
    y_train = np.array([s.label for s in train_set], np.float32)
    x_val, _ = _preload(val_set, size, max_pixels)
    y_val = np.array([s.label for s in val_set], np.int64)

    model = build_model(cfg)
    if opts.init is not None:  # fine-tune: start from a checkpoint of the same architecture
        state, _ = read_checkpoint(opts.init)
        check_keys(opts.init, model, state)
        model.load_state_dict(state)
    model = model.to(device)
    engine = CamEngine(model, cfg.target_layer) if opts.cam_guidance > 0 else None
    if engine is not None and not engine.is_fast:
        raise ValueError(
            f"--cam-guidance needs a pooled linear head after {cfg.target_layer} ({cfg.builder})"
        )
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    steps = opts.epochs * math.ceil(len(train_set) / opts.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=opts.lr, total_steps=max(1, steps), pct_start=0.15
    )
    loss_fn = nn.BCEWithLogitsLoss()
    best: dict = {"val_auc": -1.0}
    best_state = None
    history = []
    for epoch in range(1, opts.epochs + 1):
        model.train()
        order = rng.permutation(len(train_set))
        t0, seen, running = time.perf_counter(), 0, 0.0
        for i in range(0, len(order), opts.batch_size):
            idx = order[i : i + opts.batch_size]
            if opts.augment:
                pairs = [_augment(x_train[j], box_train[j], rng) for j in idx]
            else:
                pairs = [(x_train[j].astype(np.float32), box_train[j].astype(np.float32)) for j in idx]
            batch = np.stack([p[0] for p in pairs])
            x, y = _to_tensor(batch).to(device), torch.from_numpy(y_train[idx]).to(device)
            if engine is not None:
                masks = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
                logits, outside = _guidance_loss(engine, x, masks)
                loss = loss_fn(logits, y)
                if outside is not None:
                    loss = loss + opts.cam_guidance * outside
            else:
                loss = loss_fn(model(x).reshape(-1), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            seen += len(idx)
            running = loss.item() if seen == len(idx) else 0.9 * running + 0.1 * loss.item()
            _progress(epoch, opts.epochs, seen, len(order), running, t0)
        probs = _predict(model, x_val, device, opts.batch_size) if len(x_val) else np.empty(0)
        auc = roc_auc(y_val, probs) if len(x_val) else float("nan")
        val_loss = (
            float(
                loss_fn(
                    torch.logit(torch.from_numpy(probs).clamp(1e-6, 1 - 1e-6)),
                    torch.from_numpy(y_val.astype(np.float32)),
                )
            )
            if len(x_val)
            else float("nan")
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(running, 5),
                "val_auc": round(auc, 5),
                "val_loss": round(val_loss, 5),
            }
        )
        print(
            f"\repoch {epoch}/{opts.epochs}: train loss {running:.4f}  val AUC {auc:.4f}  "
            f"val loss {val_loss:.4f}  ({time.perf_counter() - t0:.0f} s)" + " " * 20,
            file=sys.stderr,
        )
        score = auc if not math.isnan(auc) else -running
        if best_state is None or (score, -val_loss) > (best["val_auc"], -best.get("val_loss", math.inf)):
            best = {"val_auc": score, "val_loss": val_loss, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    meta = {
        "model": cfg.name,
        "architecture": cfg.builder,
        "input_size": size,
        "target_layer": cfg.target_layer,
        "data": str(data),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "epochs": opts.epochs,
        "best_epoch": best["epoch"],
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "cam_guidance": opts.cam_guidance,
        "augment": opts.augment,
        "init": None if opts.init is None else {"file": opts.init.name, "sha256": file_sha256(opts.init)},
        "metrics": {"val_auc": best["val_auc"], "val_loss": best["val_loss"]},
        "history": history,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": str(torch.__version__),  # TorchVersion would need unpickling to load
    }
    digest = save_checkpoint(model.cpu(), out, meta)
    print(
        f"saved {out} (epoch {best['epoch']}, val AUC {best['val_auc']:.4f}, sha256 {digest})",
        file=sys.stderr,
    )
    return meta


def train_command(core: CoreConfig, args: argparse.Namespace) -> int:
    cfg = core.model(args.model)
    if args.input_size:
        cfg = dataclasses.replace(cfg, input_size=args.input_size)
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    opts = TrainOptions(
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        val_fraction=args.val_fraction,
        cam_guidance=args.cam_guidance,
        augment=args.augment,
        init=Path(args.init) if args.init else None,
    )
    train(cfg, Path(args.data), Path(args.out), opts, core.preprocess.max_pixels)
    return 0
