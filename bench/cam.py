"""Grad-CAM benchmark: forward only, the closed-form fast CAM, the reference CAM and pytorch-grad-cam.

For each model of the configuration (default: the three of ``config/node.toml``), builds the architecture
with seeded random weights (``weights=None``; batch norms calibrated on synthetic radiographs so the
activations have realistic scales, no denormals), then times, interleaved within every repetition so a
background load hits all alike, after warm-up runs:

* forward only: ``CamEngine.forward`` (logits, inference mode): the floor;
* fast CAM: ``CamEngine.run`` (logits and maps from one forward pass, closed-form gradient);
* reference CAM: ``reference_cam`` (hooks and autograd w.r.t. the input; parameters frozen);
* pytorch-grad-cam: ``GradCAM`` with ``BinaryClassifierOutputTarget`` per image, used as documented
  (parameters require grad; its output includes its own normalisation and resize to the input size).

Prints milliseconds per image (median of the repetitions, divided by the batch size), the ratios
fast/forward and pytorch-grad-cam/fast, and a total over the models. Targets (reported, not asserted):
fast CAM <= 1.15x forward only, >= 2.5x faster than pytorch-grad-cam.

Usage::

    .venv/bin/python bench/cam.py [--batch 8] [--size 224] [--repeats 7] [--warmup 2] [--threads N]
                                  [--device cpu|cuda] [--config FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gradcam.cam import CamEngine, reference_cam  # noqa: E402
from gradcam.config import ModelConfig, load_core_config  # noqa: E402
from gradcam.models import build_model  # noqa: E402
from gradcam.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

__all__ = ["main", "Row"]

FAST_OVER_FORWARD_TARGET = 1.15
PGC_OVER_FAST_TARGET = 2.5
METHODS = ("forward", "fast", "reference", "pytorch_grad_cam")


@dataclass(frozen=True)
class Row:
    """Milliseconds per image for one model."""

    model: str
    is_fast: bool
    forward: float
    fast: float
    reference: float
    pytorch_grad_cam: float

    @property
    def fast_over_forward(self) -> float:
        return self.fast / self.forward

    @property
    def pgc_over_fast(self) -> float:
        return self.pytorch_grad_cam / self.fast


def radiographs(n: int, size: int, seed: int) -> torch.Tensor:
    """Synthetic chest-like images (two dark lungs, a bright blob, noise) as normalised model input."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        cy, cx, shade = torch.rand(3, generator=g).tolist()
        lungs = sum(torch.exp(-((xx - lx) ** 2 + (yy - 0.5) ** 2) / 0.04) for lx in (0.3, 0.7))
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
        img = 0.6 + 0.3 * shade - 0.5 * lungs + 0.4 * blob + 0.03 * torch.randn(size, size, generator=g)
        images.append(img.clamp(0, 1))
    x = torch.stack(images)[:, None].expand(-1, 3, -1, -1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def seeded_model(cfg: ModelConfig, size: int, seed: int) -> nn.Module:
    """Random weights with calibrated batch norms and a final Linear giving logits of spread ~2."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(head.weight)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(radiographs(8, size, seed + 1))
        model.eval()
        z = model(radiographs(8, size, seed + 2)).reshape(-1) - head.bias
        k = 2.0 / float(z.std().clamp_min(1e-6))
        head.weight *= k
        head.bias.fill_(-k * float(z.median()))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, seed: int) -> Row:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    model = seeded_model(cfg, args.size, seed).to(device)
    pgc_model = copy.deepcopy(model)  # parameters require grad, as pytorch-grad-cam expects
    for p in model.parameters():
        p.requires_grad_(False)  # as gradcam.models.load_model leaves them
    x = radiographs(args.batch, args.size, seed + 3).to(device)
    engine = CamEngine(model, cfg.target_layer)
    threshold = cfg.threshold
    with torch.inference_mode():
        positive = (torch.sigmoid(model(x).reshape(-1)) >= threshold).tolist()
    targets = [BinaryClassifierOutputTarget(int(p)) for p in positive]
    pgc = GradCAM(model=pgc_model, target_layers=[pgc_model.get_submodule(cfg.target_layer)])
    runs: dict[str, Callable[[], object]] = {
        "forward": lambda: engine.forward(x),
        "fast": lambda: engine.run(x, threshold),
        "reference": lambda: reference_cam(model, cfg.target_layer, x, threshold),
        "pytorch_grad_cam": lambda: pgc(input_tensor=x, targets=targets),
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    try:
        for rep in range(args.warmup + args.repeats):
            for method in METHODS:
                _sync(device)
                t0 = time.perf_counter()
                runs[method]()
                _sync(device)
                if rep >= args.warmup:
                    times[method].append(time.perf_counter() - t0)
    finally:
        pgc.activations_and_grads.release()
    per_image = {m: statistics.median(t) * 1000.0 / args.batch for m, t in times.items()}
    return Row(model=cfg.name, is_fast=engine.is_fast, **per_image)


def print_table(rows: list[Row], args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"Grad-CAM benchmark: batch {args.batch}, input {args.size} px, device {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up runs"
    )
    print("milliseconds per image")
    header = (
        f"{'model':<18}{'forward':>10}{'fast CAM':>10}{'reference':>11}{'pgc':>10}"
        f"{'fast/fwd':>10}{'pgc/fast':>10}"
    )
    print(header)
    print("-" * len(header))
    total = Row("total", all(r.is_fast for r in rows), *(sum(getattr(r, m) for r in rows) for m in METHODS))
    for r in [*rows, total]:
        name = r.model + ("" if r.is_fast else " *")
        print(
            f"{name:<18}{r.forward:>10.2f}{r.fast:>10.2f}{r.reference:>11.2f}{r.pytorch_grad_cam:>10.2f}"
            f"{r.fast_over_forward:>10.3f}{r.pgc_over_fast:>10.2f}"
        )
    if not total.is_fast:
        print("* no closed form for this head: the fast path falls back to the reference")
    ok_fwd = total.fast_over_forward <= FAST_OVER_FORWARD_TARGET
    ok_pgc = total.pgc_over_fast >= PGC_OVER_FAST_TARGET
    print(
        f"targets (total): fast/forward <= {FAST_OVER_FORWARD_TARGET}: {total.fast_over_forward:.3f} "
        f"{'met' if ok_fwd else 'MISSED'}; pytorch-grad-cam/fast >= {PGC_OVER_FAST_TARGET}: "
        f"{total.pgc_over_fast:.2f} {'met' if ok_pgc else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--size", type=int, default=224, help="input size in pixels (default 224)")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--config", type=Path, help="configuration whose models to time (default config/node.toml)"
    )
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    core = load_core_config(args.config)
    models = [core.model(n) for n in args.model] if args.model else list(core.enabled_models)
    rows = [bench_model(cfg, args, device, seed=i) for i, cfg in enumerate(models)]
    print_table(rows, args, device)
    if args.json:
        doc = {
            "batch": args.batch,
            "size": args.size,
            "device": str(device),
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
