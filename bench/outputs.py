"""Output building benchmark: milliseconds per image to build and encode the node's outputs, this tree
against an earlier release of it (default: 0871801, the last release before IHE AI Results outputs), in
the same run.

Each side runs in its own subprocess on its own source tree (the baseline is checked out with
``git worktree`` into a temporary folder) and builds, for the same synthetic phantoms (DX, ``--size`` px)
and the same three model results per image (seeded CAMs with a peak; probabilities chosen so that the
images alternate between 3 positive, 2 of 3 positive and all negative models), what that tree's worker
builds for one image: the baseline one overlay SC per model and the SR; this tree the plan of
``node.outputs.build`` (summary, per-model SCs and heatmap Segmentations for the models with a map, the
SR). Everything is encoded to bytes as the worker does before writing; nothing touches the disk or a
database. The two sides alternate ``--rounds`` times so a background load hits both alike; the median
round is reported, with the ratio this/baseline and the objects made per image.

Usage::

    .venv/bin/python bench/outputs.py [--images 12] [--size 512] [--rounds 3] [--baseline REV]
                                      [--negative-maps] [--json FILE]

``--baseline HEAD`` measures an uncommitted change against the last commit.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "0871801"
MODELS = (
    ("ResNet18", "resnet18", 0.3833),
    ("EfficientNet-B0", "efficientnet_b0", 0.0647),
    ("DenseNet121", "densenet121", 0.1768),
)
# per image, cycling: which models are positive
PATTERNS = ((True, True, True), (True, False, True), (False, False, False))


def _inputs(n: int, size: int) -> list[tuple[object, object, object]]:
    """(source dataset, source image, analysis) per image; imports from whichever tree is on sys.path."""
    import numpy as np

    from gradcam.phantom_dicom import phantom_dataset
    from gradcam.phantoms import make_phantom
    from gradcam.preprocess import load_dataset_image
    from gradcam.results import AnalysisResult, ModelResult

    out = []
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(n):
        pattern = PATTERNS[i % len(PATTERNS)]
        ds = phantom_dataset(make_phantom(5, i, pattern[0], size), 5, i)
        image = load_dataset_image(ds, 10**9, f"bench-{i}")
        models = {}
        for (name, builder, threshold), positive in zip(MODELS, pattern, strict=True):
            row, col = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            cam = np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * (size / 10) ** 2)).astype(np.float32)
            p = threshold + 0.2 if positive else threshold / 2
            models[name] = ModelResult(name, builder, p, threshold, positive, cam, (row, col), "ab" * 32, 1.0)
        out.append((ds, image, AnalysisResult(f"bench-{i}", size, size, models)))
    return out


def _builder(negative_maps: bool):  # noqa: ANN202 - a closure over whichever tree is imported
    """A function (source, image, analysis) -> list of datasets, as this tree's worker builds them."""
    import node.outputs as outputs

    if hasattr(outputs, "build_outputs"):  # this release: the plan of node.outputs.build
        from gradcam.config import ModelConfig, RenderConfig
        from node.config import OutputsConfig

        cfgs = [(ModelConfig(n, b, Path(n), "features", 224, t), "ab" * 32) for n, b, t in MODELS]
        ctx = outputs.OutputContext.of(
            cfgs, RenderConfig(), OutputsConfig(negative_maps=negative_maps), "2.25.1"
        )

        def build(source, image, analysis):  # noqa: ANN001, ANN202
            plan = outputs.plan_outputs(source, analysis, ctx)
            numbers = {p.sop_uid: n for n, p in enumerate(plan, start=1)}
            return [b.dataset for b in outputs.build_outputs(source, image, analysis, ctx, numbers)]

        return build

    # the baseline: one overlay SC per model and the SR (node/work/worker.py's _build_outputs of that release)
    from gradcam.config import RenderConfig
    from gradcam.render import render_overlay
    from node.config import OutputsConfig
    from node.outputs.common import reference_header

    cfg, render = OutputsConfig(), RenderConfig()

    def build_old(source, image, analysis):  # noqa: ANN001, ANN202
        ref = reference_header(source)
        results = list(analysis.models.values())
        made = [
            outputs.build_secondary_capture(source, render_overlay(image, r, render), r, cfg, n, ref=ref)
            for n, r in enumerate(results, start=1)
        ]
        return [*made, outputs.build_sr(source, results, analysis.consensus, cfg, ref=ref)]

    return build_old


def _measure(images: int, size: int, negative_maps: bool) -> dict[str, float]:
    """One round on the tree on sys.path: ms per image and objects per image (after one warm-up image)."""
    inputs = _inputs(images, size)
    build = _builder(negative_maps)
    for ds in build(*inputs[0]):
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    n_objects = 0
    t0 = time.perf_counter()
    for source, image, analysis in inputs:
        for ds in build(source, image, analysis):
            ds.save_as(io.BytesIO(), enforce_file_format=True)
            n_objects += 1
    elapsed = time.perf_counter() - t0
    return {"ms_per_image": elapsed * 1000 / images, "objects_per_image": n_objects / images}


def _round(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, str(ROOT / "bench" / "outputs.py"), "--child", str(tree)]
    cmd += ["--images", str(args.images), "--size", str(args.size)]
    if args.negative_maps:
        cmd.append("--negative-maps")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench/outputs.py: the round on {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with")
    parser.add_argument("--negative-maps", action="store_true", help="this tree with [outputs] negative_maps")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        sys.path.insert(0, str(args.child))
        print(json.dumps(_measure(args.images, args.size, args.negative_maps)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-outputs-") as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline],
                       check=True, capture_output=True)  # fmt: skip
        try:
            rounds: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
            for _ in range(args.rounds):
                rounds["baseline"].append(_round(old, args))
                rounds["this"].append(_round(ROOT, args))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    med = {k: statistics.median(r["ms_per_image"] for r in v) for k, v in rounds.items()}
    objs = {k: v[0]["objects_per_image"] for k, v in rounds.items()}
    print(f"output building, {args.images} images of {args.size} px, median of {args.rounds} rounds:")
    print(
        f"  baseline {args.baseline}: {med['baseline']:7.1f} ms/image, {objs['baseline']:.2f} objects/image"
    )
    print(f"  this tree:        {med['this']:7.1f} ms/image, {objs['this']:.2f} objects/image")
    print(f"  ratio this/baseline: {med['this'] / med['baseline']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "median_ms": med, "objects": objs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
