"""Grad-CAM for single-logit classifiers: a reference implementation and an exact fast path.

Target: the logit for a positive decision (probability >= threshold) and its negative otherwise, as in
the seed, so the map shows what speaks *for* the decision taken.

Reference (:func:`reference_cam`): a forward hook on the target layer captures its output and puts a
tensor hook on it that captures the gradient; autograd then runs from the target score. Hooks are always
released, the model's train/eval mode is left alone, and nothing per call is stored on a shared object;
the forward hook ignores forward passes of other threads, so one model can serve several threads.

Fast path (:class:`CamEngine`): when the target layer is followed only by an optional ReLU, global
average pooling, an optional Dropout and the final Linear (true for ResNet18, EfficientNet-B0 and
DenseNet121), the gradient is known in closed form: for logit ``y = w . mean(relu?(A)) + b``,
``dy/dA[c,i,j] = w[c] / (h*w) * [A > 0 if ReLU]``. The CAM then comes from one forward pass, without
autograd, of a traced copy of the model that also returns ``A``. Any other architecture falls back to
the reference by itself.

Where the head's ReLU works in place (DenseNet), the captured activations are the rectified ones, as
in pytorch-grad-cam; both paths here use the same convention, so they agree.
"""

from __future__ import annotations

import logging
import operator
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradcam.models import resolve_module

__all__ = ["CamEngine", "reference_cam", "target_signs", "HeadInfo", "analyse_head"]

log = logging.getLogger(__name__)


def target_signs(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """+1 where the decision is positive (sigmoid(logit) >= threshold), else -1."""
    positive = torch.sigmoid(logits.detach().float()) >= threshold
    return positive.float() * 2.0 - 1.0


def reference_cam(
    model: nn.Module, target_layer: str, x: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM with hooks and autograd. Returns ``(logits (N,), cams (N, h, w))``, CAMs not normalised."""
    layer = resolve_module(model, target_layer)
    owner = threading.get_ident()
    captured: dict[str, torch.Tensor] = {}

    def keep_grad(grad: torch.Tensor) -> None:
        captured["grad"] = grad.detach()

    def on_forward(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if threading.get_ident() != owner:
            return  # another thread's forward pass through the same model
        captured["act"] = output
        output.register_hook(keep_grad)

    handle = layer.register_forward_hook(on_forward)
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            logits = model(inp).reshape(-1)
            score = (logits * target_signs(logits, threshold)).sum()
            torch.autograd.grad(score, inp)
    finally:
        handle.remove()
    act, grad = captured["act"].detach(), captured["grad"]
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * act).sum(dim=1))
    return logits.detach(), cams


@dataclass(frozen=True)
class HeadInfo:
    """What follows the target layer, when it is a pooled linear head."""

    linear: nn.Linear
    relu: bool


_RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_POOL_FUNCS = {F.adaptive_avg_pool2d}
_FLATTEN_FUNCS = {torch.flatten}
_DROPOUT_FUNCS = {F.dropout}
_SHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}


class _TargetTracer(fx.Tracer):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.target or super().is_leaf_module(m, qualname)


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module" and isinstance(modules[str(node.target)], nn.AdaptiveAvgPool2d):
        return modules[str(node.target)].output_size in (1, (1, 1))
    if node.op == "call_function" and node.target in _POOL_FUNCS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1))
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    ):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims or ()) in ((2, 3), (-2, -1))
    return False


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.Dropout):
            return "dropout"
        if isinstance(m, nn.Flatten):
            return "flatten"
        if isinstance(m, nn.Linear):
            return "linear"
    if node.op == "call_function":
        if node.target in _RELU_FUNCS:
            return "relu"
        if node.target in _DROPOUT_FUNCS:
            return "dropout"
        if node.target in _FLATTEN_FUNCS:
            return "flatten"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return "flatten"
    if _is_global_pool(node, modules):
        return "pool"
    return "other"


def analyse_head(graph: fx.GraphModule, target: str) -> tuple[fx.Node, HeadInfo] | None:
    """Find the target node and check the head is ``[ReLU] -> GAP -> [flatten] -> [Dropout] -> Linear``."""
    modules = dict(graph.named_modules())
    nodes = [n for n in graph.graph.nodes if n.op == "call_module" and n.target == target]
    if len(nodes) != 1:
        return None
    start = node = nodes[0]
    seen: list[str] = []
    linear: nn.Linear | None = None
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if node.op == "output":
            break
        kind = _kind(node, modules)
        order_ok = {
            "relu": not seen,
            "pool": "pool" not in seen,
            "flatten": "pool" in seen and "linear" not in seen,
            "dropout": "pool" in seen and "linear" not in seen,
            "linear": "pool" in seen and "linear" not in seen,
        }
        if not order_ok.get(kind, False):
            return None
        if kind == "linear":
            linear = modules[str(node.target)]  # type: ignore[assignment]
        seen.append(kind)
    if linear is None or linear.out_features != 1:
        return None
    return start, HeadInfo(linear=linear, relu="relu" in seen)


def _traced_with_activations(model: nn.Module, target: str) -> tuple[fx.GraphModule, HeadInfo] | None:
    """A traced copy of ``model`` returning ``(activations, logits)``, or None if the head is not simple."""
    try:
        tracer = _TargetTracer(target)
        graph = tracer.trace(model)
        gm = fx.GraphModule(model, graph)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code; fall back
        log.debug("cannot trace %s: %s", type(model).__name__, exc)
        return None
    found = analyse_head(gm, target)
    if found is None:
        return None
    target_node, head = found
    out = next(n for n in gm.graph.nodes if n.op == "output")
    logits = out.args[0]
    with gm.graph.inserting_before(out):
        pair = gm.graph.call_function(operator.getitem, ((target_node, logits), slice(None)))
    out.args = (pair,)
    gm.graph.lint()
    gm.recompile()
    return gm, head


class CamEngine:
    """Grad-CAM for one model: the closed-form fast path when the head allows it, else the reference.

    Safe to share between threads: it holds no per-call state.
    """

    def __init__(self, model: nn.Module, target_layer: str, *, fast: bool = True) -> None:
        self.model = model
        self.target_layer = target_layer
        resolve_module(model, target_layer)
        traced = _traced_with_activations(model, target_layer) if fast else None
        self._fast = traced[0] if traced else None
        self._head = traced[1] if traced else None

    @property
    def is_fast(self) -> bool:
        return self._fast is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only (the forward-pass floor the benchmarks compare against)."""
        with torch.inference_mode():
            return self.model(x).reshape(-1)

    def traced_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target-layer activations, logits)`` from the traced model (fast path only)."""
        if self._fast is None:
            raise RuntimeError("no closed-form path for this architecture")
        return self._fast(x)

    def closed_form_cam(self, act: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Grad-CAM from activations alone: ``relu(sum_c sign * dy/dA_c-mean * A_c)``."""
        assert self._head is not None
        h, w = act.shape[-2:]
        weights = self._head.linear.weight.reshape(1, -1, 1, 1) / (h * w)
        if self._head.relu:
            share = (act > 0).sum(dim=(2, 3), keepdim=True).to(act.dtype) / (h * w)
            weights = weights * share
        return F.relu((weights * signs.reshape(-1, 1, 1, 1) * act).sum(dim=1))

    def run(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits (N,), cams (N, h, w))``; CAMs are ReLU'd, not normalised."""
        if self._fast is None or self._head is None:
            return reference_cam(self.model, self.target_layer, x, threshold)
        with torch.inference_mode():
            act, logits = self._fast(x)
            logits = logits.reshape(-1)
            cams = self.closed_form_cam(act, target_signs(logits, threshold))
        return logits, cams
