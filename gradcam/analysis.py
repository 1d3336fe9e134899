"""Run every enabled model with Grad-CAM on a batch of images."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from gradcam.cam import CamEngine
from gradcam.config import CoreConfig, ModelConfig
from gradcam.models import LoadedModel, load_model, place_batch, place_model
from gradcam.preprocess import SourceImage, to_model_input
from gradcam.results import AnalysisResult, ModelResult

__all__ = ["Analyzer", "LoadedModelInfo", "RawOutput", "assemble", "cam_to_source", "model_inputs"]


def _refine(values: np.ndarray, i: int) -> float:
    """Sub-cell offset of a maximum at ``i`` from a parabola through it and its neighbours."""
    if i == 0 or i == len(values) - 1:
        return 0.0
    left, mid, right = float(values[i - 1]), float(values[i]), float(values[i + 1])
    curvature = left - 2.0 * mid + right
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0


def cam_to_source(cam: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Upsample a raw CAM to source resolution, scale to [0, 1] by its maximum; return it and its peak.

    The peak is found on the low-resolution map and refined between cells by a parabola through the
    maximum and its neighbours (row and column apart), then mapped to source pixels; an all-equal map
    points at the centre of its first cell rather than at an interpolation artefact.
    """
    cam = np.asarray(cam, np.float32)
    top = float(cam.max())
    scaled = cam / top if top > 0 else np.zeros_like(cam)
    full = cv2.resize(scaled, (width, height), interpolation=cv2.INTER_LINEAR)
    r, c = np.unravel_index(int(np.argmax(scaled)), scaled.shape)
    dr, dc = _refine(scaled[:, c], int(r)), _refine(scaled[r, :], int(c))
    h, w = scaled.shape
    peak = (
        int(np.clip((r + 0.5 + dr) * height / h, 0, height - 1)),
        int(np.clip((c + 0.5 + dc) * width / w, 0, width - 1)),
    )
    return np.clip(full, 0.0, 1.0).astype(np.float32), peak


@dataclass(frozen=True)
class RawOutput:
    """One model on one image, before its CAM is mapped to the source: small enough to pass between
    processes (the CAM is the model's own low-resolution map)."""

    probability: float
    cam: np.ndarray  # (h, w) float32, ReLU'd, not normalised
    ms: float  # this model's time per image in its batch


def model_inputs(images: Sequence[SourceImage], cfgs: Sequence[ModelConfig]) -> dict[str, torch.Tensor]:
    """Each model's normalised input batch, by model name."""
    return {cfg.name: to_model_input(list(images), cfg) for cfg in cfgs}


def assemble(
    images: Sequence[SourceImage], models: Sequence[LoadedModelInfo], raw: dict[str, list[RawOutput]]
) -> list[AnalysisResult]:
    """Map every raw CAM to its source image and build one :class:`AnalysisResult` per image, in order."""
    per_image: list[dict[str, ModelResult]] = [{} for _ in images]
    for info in models:
        cfg = info.cfg
        for i, (img, out) in enumerate(zip(images, raw[cfg.name], strict=True)):
            cam, peak = cam_to_source(out.cam, img.height, img.width)
            per_image[i][cfg.name] = ModelResult(
                model=cfg.name,
                builder=cfg.builder,
                probability=out.probability,
                threshold=cfg.threshold,
                positive=out.probability >= cfg.threshold,
                cam=cam,
                cam_peak=peak,
                checkpoint_sha256=info.sha256,
                ms=out.ms,
            )
    return [
        AnalysisResult(source=img.source, height=img.height, width=img.width, models=per_image[i])
        for i, img in enumerate(images)
    ]


@dataclass(frozen=True)
class LoadedModelInfo:
    """What a result needs to know about a loaded model (no weights): picklable."""

    cfg: ModelConfig
    sha256: str


class Analyzer:
    """Loads the configured models once; analyses batches of images with all of them.

    :meth:`analyze` is :meth:`run` (the models, on tensors) followed by :func:`assemble` (the CAMs mapped
    to the sources); the node runs the first in a separate process and the second in its own.
    """

    def __init__(
        self, cfg: CoreConfig, model_names: Sequence[str] | None = None, device: str | torch.device = "cpu"
    ) -> None:
        chosen = [cfg.model(n) for n in model_names] if model_names else list(cfg.enabled_models)
        self.cfg = cfg
        self.device = torch.device(device)
        self.models: dict[str, LoadedModel] = {m.name: load_model(m) for m in chosen}
        for lm in self.models.values():
            place_model(lm.module, self.device)  # before the CAM engines trace them
        self.engines = {name: CamEngine(lm.module, lm.cfg.target_layer) for name, lm in self.models.items()}

    @property
    def infos(self) -> list[LoadedModelInfo]:
        return [LoadedModelInfo(lm.cfg, lm.sha256) for lm in self.models.values()]

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, list[RawOutput]]:
        """Every model on its input batch (from :func:`model_inputs`): probabilities and raw CAMs.

        The batch, the forward pass and the closed-form CAM run on :attr:`device`; only the small
        low-resolution CAMs and the probabilities come back to the CPU.
        """
        out: dict[str, list[RawOutput]] = {}
        for name, lm in self.models.items():
            x = place_batch(inputs[name], self.device)
            t0 = time.perf_counter()
            logits, cams = self.engines[name].run(x, lm.cfg.threshold)
            cams = cams.float().cpu()
            probs = torch.sigmoid(logits.float()).tolist()
            ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(probs))
            out[name] = [RawOutput(float(p), cams[i].float().numpy(), ms) for i, p in enumerate(probs)]
        return out

    def warm_up(self) -> None:
        """One pass on a blank image, so that the first real batch does not pay for lazy initialisation."""
        blank = SourceImage(np.zeros((64, 64), np.float32), source="warm-up")
        self.run(model_inputs([blank], [lm.cfg for lm in self.models.values()]))

    def analyze(self, images: Sequence[SourceImage]) -> list[AnalysisResult]:
        """One :class:`AnalysisResult` per image, in order."""
        cfgs = [lm.cfg for lm in self.models.values()]
        return assemble(images, self.infos, self.run(model_inputs(images, cfgs)))
