"""Grad-CAM: the closed-form fast path against the reference, the reference against pytorch-grad-cam."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from gradcam.cam import CamEngine, reference_cam, target_signs
from gradcam.models import resolve_module

SIZE = 80
N = 6
DEFAULT_MODELS = [("resnet18", "layer4"), ("efficientnet_b0", "features"), ("densenet121", "features")]
ALL_NEGATIVE = 1.01  # sigmoid never reaches it
ALL_POSITIVE = 0.0


@pytest.fixture(scope="module")
def x(batch_factory: Callable[[int, int, int], torch.Tensor]) -> torch.Tensor:
    return batch_factory(N, SIZE, 11)


def mixed_threshold(model: nn.Module, x: torch.Tensor) -> float:
    """A threshold between the batch's probabilities, so some decisions are positive and some negative."""
    with torch.inference_mode():
        probs = torch.sigmoid(model(x).reshape(-1)).sort().values
    threshold = float((probs[N // 2 - 1] + probs[N // 2]) / 2)
    assert probs[0] < threshold <= probs[-1], f"test setup: probabilities too alike {probs.tolist()}"
    return threshold


def manual_gradcam(model: nn.Module, layer: str, x: torch.Tensor, sign: float) -> torch.Tensor:
    """Textbook Grad-CAM of ``sign * logit``, independent of gradcam.cam (gradient taken w.r.t. A)."""
    acts: list[torch.Tensor] = []
    handle = resolve_module(model, layer).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True)).reshape(-1)
            (grad,) = torch.autograd.grad((sign * logits).sum(), acts[0])
    finally:
        handle.remove()
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * acts[0].detach()).sum(dim=1))


def assert_maps_close(got: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Per map: max |difference| <= rel * max(expected); an all-zero expected map needs a ~zero result."""
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    for g, e in zip(got, expected, strict=True):
        top = float(e.max())
        bound = rel * top if top > 0 else rel * scale
        assert float((g - e).abs().max()) <= bound, (float((g - e).abs().max()), top)


def assert_not_degenerate(cams: torch.Tensor) -> None:
    tops = cams.amax(dim=(1, 2))
    assert int((tops > 0).sum()) >= 2, f"too many all-zero maps: {tops.tolist()}"
    nonzero = cams[tops > 0] / tops[tops > 0].view(-1, 1, 1)
    assert float((nonzero - nonzero[0]).abs().amax()) > 0.05, "all maps alike: the test would prove little"


def pgc_normalise(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exactly what pytorch-grad-cam does to one target layer's raw map (scale_cam_image twice)."""
    img = cam - np.min(cam)
    img = img / (1e-7 + np.max(img))
    img = cv2.resize(np.float32(img), (width, height))
    img = np.maximum(img, 0)  # aggregate_multi_layers: mean over one layer, ReLU, scale again
    img = img - np.min(img)
    return img / (1e-7 + np.max(img))


# --- the fast path ------------------------------------------------------------------------------


@pytest.mark.parametrize(("builder", "layer"), DEFAULT_MODELS)
def test_fast_path_equals_reference(
    builder: str, layer: str, model_factory: Callable, x: torch.Tensor
) -> None:
    model = model_factory(builder, layer, size=SIZE)
    engine = CamEngine(model, layer)
    assert engine.is_fast
    mixed = mixed_threshold(model, x)
    for threshold in (ALL_POSITIVE, ALL_NEGATIVE, mixed):
        logits, cams = engine.run(x, threshold)
        ref_logits, ref_cams = reference_cam(model, layer, x, threshold)
        assert torch.allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * float(ref_logits.abs().max()))
        assert_maps_close(cams, ref_cams, 1e-5)
        assert_not_degenerate(ref_cams)
        assert cams.min() >= 0 and cams.dtype == torch.float32 and cams.shape[0] == N
    signs = target_signs(engine.forward(x), mixed)
    assert (signs > 0).any() and (signs < 0).any()


def test_fast_path_can_be_switched_off(model_factory: Callable, x: torch.Tensor) -> None:
    model = model_factory("resnet18", "layer4", size=SIZE)
    assert not CamEngine(model, "layer4", fast=False).is_fast


def test_target_is_logit_for_positive_and_its_negative_otherwise(
    model_factory: Callable, x: torch.Tensor
) -> None:
    model = model_factory("resnet18", "layer4", size=SIZE)
    assert target_signs(torch.tensor([-2.0, 0.0, 2.0]), 0.5).tolist() == [-1.0, 1.0, 1.0]
    engine = CamEngine(model, "layer4")
    positive, negative = manual_gradcam(model, "layer4", x, 1.0), manual_gradcam(model, "layer4", x, -1.0)
    for run in (engine.run, lambda x, t: reference_cam(model, "layer4", x, t)):
        assert_maps_close(run(x, ALL_POSITIVE)[1], positive, 1e-5)
        assert_maps_close(run(x, ALL_NEGATIVE)[1], negative, 1e-5)
        # A mixed batch: each image follows its own decision.
        threshold = mixed_threshold(model, x)
        logits, cams = run(x, threshold)
        decided = torch.where(torch.sigmoid(logits).view(-1, 1, 1) >= threshold, positive, negative)
        assert_maps_close(cams, decided, 1e-5)
    assert not torch.allclose(positive, negative)


# --- the reference against pytorch-grad-cam ------------------------------------------------------


@pytest.mark.parametrize(("builder", "layer"), DEFAULT_MODELS + [("mobilenet_v3_small", "features")])
def test_reference_agrees_with_pytorch_grad_cam(
    builder: str, layer: str, model_factory: Callable, x: torch.Tensor
) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

    model = model_factory(builder, layer, size=SIZE)
    threshold = mixed_threshold(model, x)
    logits, ours = reference_cam(model, layer, x, threshold)
    _, fast = CamEngine(model, layer).run(x, threshold)
    positive = (torch.sigmoid(logits) >= threshold).tolist()
    theirs_model = copy.deepcopy(model)  # pytorch-grad-cam calls eval() and keeps hooks until released
    with GradCAM(model=theirs_model, target_layers=[resolve_module(theirs_model, layer)]) as cam:
        theirs = cam(input_tensor=x, targets=[BinaryClassifierOutputTarget(int(p)) for p in positive])
    assert theirs.shape == (N, SIZE, SIZE)
    for i in range(N):
        np.testing.assert_allclose(pgc_normalise(ours[i].numpy(), SIZE, SIZE), theirs[i], atol=1e-4)
        np.testing.assert_allclose(pgc_normalise(fast[i].numpy(), SIZE, SIZE), theirs[i], atol=1e-4)
    assert sum(float(t.max()) > 0.5 for t in theirs) >= 2


# --- fallback for other heads --------------------------------------------------------------------


class TwoLayerHead(nn.Module):
    """Conv features, global pooling, then an MLP (not a single Linear): no closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("builder", "layer"),
    [("mobilenet_v3_small", "features"), ("resnet18", "layer3"), ("custom", "features")],
    ids=["mobilenet_v3_small (Linear-Hardswish-Dropout-Linear)", "resnet18 layer3 (not last)", "MLP head"],
)
def test_other_heads_fall_back_to_reference(
    builder: str, layer: str, model_factory: Callable, x: torch.Tensor
) -> None:
    if builder == "custom":
        torch.manual_seed(0)
        model = TwoLayerHead().eval()
    else:
        model = model_factory(builder, "features" if builder == "mobilenet_v3_small" else "layer4", size=SIZE)
    engine = CamEngine(model, layer)
    assert not engine.is_fast
    for threshold in (ALL_POSITIVE, ALL_NEGATIVE):
        logits, cams = engine.run(x, threshold)
        sign = 1.0 if threshold == ALL_POSITIVE else -1.0
        assert_maps_close(cams, manual_gradcam(model, layer, x, sign), 1e-5)
        assert torch.allclose(logits, engine.forward(x), atol=1e-5)


# --- hooks, modes, threads -----------------------------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_hooks_are_released_also_when_forward_raises(model_factory: Callable, x: torch.Tensor) -> None:
    model = model_factory("resnet18", "layer4", size=SIZE)
    assert _hooks(model) == 0
    reference_cam(model, "layer4", x, 0.5)
    CamEngine(model, "layer4", fast=False).run(x, 0.5)
    assert _hooks(model) == 0
    with pytest.raises(RuntimeError):
        reference_cam(model, "layer4", x[:, :1], 0.5)  # one channel: the first conv raises
    assert _hooks(model) == 0
    reference_cam(model, "layer4", x, 0.5)  # and the model still works afterwards
    assert _hooks(model) == 0


@pytest.mark.parametrize("training", [False, True])
def test_train_eval_mode_is_unchanged(training: bool, model_factory: Callable, x: torch.Tensor) -> None:
    model = model_factory("resnet18", "layer4", size=SIZE)
    model.train(training)
    modes = [m.training for m in model.modules()]
    reference_cam(model, "layer4", x, 0.5)
    CamEngine(model, "layer4").run(x, 0.5)
    assert [m.training for m in model.modules()] == modes
    assert all(not p.grad_fn and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fast", [True, False])
def test_threads_share_one_engine(fast: bool, model_factory: Callable, batch_factory: Callable) -> None:
    model = model_factory("resnet18", "layer4", size=SIZE)
    engine = CamEngine(model, "layer4", fast=fast)
    inputs = [batch_factory(2, SIZE, 100 + i) for i in range(4)]  # each thread its own images
    expected = [engine.run(b, 0.5) for b in inputs]
    start = threading.Barrier(len(inputs))

    def work(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        start.wait()
        return [engine.run(inputs[i], 0.5) for _ in range(3)]

    with ThreadPoolExecutor(len(inputs)) as pool:
        results = list(pool.map(work, range(len(inputs))))
    for i, runs in enumerate(results):
        for logits, cams in runs:
            assert torch.allclose(logits, expected[i][0], atol=1e-5)
            assert torch.allclose(cams, expected[i][1], atol=1e-5 * float(expected[i][1].max()))
    assert _hooks(model) == 0
