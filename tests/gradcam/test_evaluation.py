"""``gradcam-node evaluate``: figures checked against independent arithmetic, ROC PNGs, threshold rewrite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from gradcam.analysis import Analyzer
from gradcam.config import DEFAULT_CONFIG, REPO_ROOT, CoreConfig, load_core_config
from gradcam.datasets import load_samples
from gradcam.evaluation import evaluate, write_thresholds
from gradcam.phantoms import generate_dataset
from gradcam.preprocess import load_image
from node.config import load_settings

CLI = Path(sys.executable).parent / "gradcam-node"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_NODE_CONFIG"}
    return subprocess.run(
        [str(CLI), *map(str, args)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-phantoms")
    generate_dataset(out, count=12, seed=1, size=64)
    return out


@pytest.fixture(scope="module")
def independent(phantoms: Path, core_config: CoreConfig) -> dict[str, dict[str, object]]:
    """Per model, from the Analyzer's per-image results and the labels: AUC, sens/spec, pointing game."""
    samples = load_samples(phantoms)
    labels = np.array([s.label for s in samples])
    assert 0 < labels.sum() < len(labels), "test setup: the phantoms need both labels"
    images = [load_image(s.path, core_config.preprocess.max_pixels) for s in samples]
    results = Analyzer(core_config).analyze(images)  # one batch, as evaluate() runs 12 images
    out: dict[str, dict[str, object]] = {}
    for m in core_config.enabled_models:
        probs = np.array([r.models[m.name].probability for r in results])
        pred = probs >= m.threshold
        hits, boxed = 0, 0
        for s, r in zip(samples, results, strict=True):
            if s.label == 1 and s.boxes:
                boxed += 1
                row, col = r.models[m.name].cam_peak
                hits += any(x0 <= col < x1 and y0 <= row < y1 for x0, y0, x1, y1 in s.boxes)
        out[m.name] = {
            "n": len(samples),
            "positives": int(labels.sum()),
            "auc": roc_auc_score(labels, probs),
            "sensitivity": float(pred[labels == 1].mean()),
            "specificity": float((~pred[labels == 0]).mean()),
            "pointing_game": hits / boxed if boxed else None,
            "pointing_n": boxed,
        }
    return out


def test_evaluate_matches_independent_arithmetic(
    phantoms: Path, core_config: CoreConfig, independent: dict[str, dict[str, object]]
) -> None:
    evaluations, curves = evaluate(core_config, phantoms)
    assert [e.model for e in evaluations] == [m.name for m in core_config.enabled_models]
    for e in evaluations:
        expected = independent[e.model]
        assert (e.n, e.positives, e.pointing_n) == (
            expected["n"],
            expected["positives"],
            expected["pointing_n"],
        )
        assert e.auc == pytest.approx(expected["auc"], abs=1e-9)
        assert (e.sensitivity, e.specificity) == pytest.approx(
            (expected["sensitivity"], expected["specificity"])
        )
        if expected["pointing_game"] is None:
            assert e.pointing_game is None
        else:
            assert e.pointing_game == pytest.approx(expected["pointing_game"])
        assert e.pointing_n > 0, "phantom positives carry lesion boxes"
        assert e.criterion == "Youden's J" and 0.0 <= e.optimal_threshold <= 1.0
        assert curves[e.model][0].sensitivity == 0.0 and curves[e.model][-1].sensitivity == 1.0


def test_min_sensitivity_criterion(phantoms: Path, core_config: CoreConfig) -> None:
    evaluations, _ = evaluate(core_config, phantoms, ["ResNet18"], min_sensitivity=1.0)
    (e,) = evaluations
    assert e.optimal_sensitivity == 1.0 and "min sensitivity" in e.criterion


def test_cli_writes_roc_pngs_json_and_only_threshold_lines(
    phantoms: Path, tiny_config_path: Path, tmp_path: Path, independent: dict[str, dict[str, object]]
) -> None:
    config = tmp_path / "node.toml"
    # The test config quotes its table names ([models."ResNet18"]); add a comment to keep.
    config.write_text("# my site's configuration, keep this comment\n" + tiny_config_path.read_text())
    before = config.read_text().splitlines()
    out = tmp_path / "roc"
    result = run_cli(
        "--config", config, "evaluate", "--data", phantoms, "--json", "--write-thresholds", "--out", out
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    optimal = {m["model"]: m["optimal_threshold"] for m in doc["models"]}
    assert set(optimal) == set(independent)
    for m in doc["models"]:
        assert m["auc"] == pytest.approx(independent[m["model"]]["auc"], abs=1e-6)
        png = cv2.imread(str(out / f"roc_{m['model']}.png"))
        assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
        assert (png < 128).any() and (png == 255).any()  # drawn on white

    after = config.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert all("threshold" in a and "threshold" in b for a, b in changed)
    assert after[0] == "# my site's configuration, keep this comment"
    settings = load_settings(config)  # still a valid configuration
    for m in settings.core.models:
        assert m.threshold == pytest.approx(optimal[m.name], abs=1e-4)


def test_write_thresholds_keeps_comments_and_other_tables(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    # the default file with the seed's thresholds (its own change with every calibration)
    seed = iter(["threshold = 0.25   # from ROC, 2024", "threshold = 0.15", "threshold = 0.18"])
    text = re.sub(r"^threshold = [0-9.]+$", lambda _: next(seed), DEFAULT_CONFIG.read_text(), flags=re.M)
    config.write_text(text)
    write_thresholds(config, {"ResNet18": 0.3312, "DenseNet121": 0.07})
    new = config.read_text()
    old_lines, new_lines = text.splitlines(), new.splitlines()
    diff = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert diff == [
        ("threshold = 0.25   # from ROC, 2024", "threshold = 0.3312   # from ROC, 2024"),
        ("threshold = 0.18", "threshold = 0.0700"),
    ]
    core = load_core_config(config)
    assert core.model("EfficientNet-B0").threshold == 0.15
    assert core.model("DenseNet121").threshold == 0.07
    with pytest.raises(ValueError, match="VGG"):
        write_thresholds(config, {"VGG": 0.5})


def test_evaluate_needs_both_labels(tmp_path: Path, core_config: CoreConfig) -> None:
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "test" / cls).mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(tmp_path / "test" / "NORMAL" / f"n{i}.png"), np.full((32, 32), 100 + i, np.uint8))
    with pytest.raises(ValueError, match="both labels"):
        evaluate(core_config, tmp_path)


def test_write_thresholds_handles_quoted_and_spaced_toml(tmp_path: Path) -> None:
    text = (
        DEFAULT_CONFIG.read_text()
        .replace("[models.ResNet18]", '[models."ResNet 18"]   # the primary model')
        .replace("[models.EfficientNet-B0]", "[ models . 'EfficientNet-B0' ]")
        .replace("threshold = 0.18", '"threshold" = 0.18')
    )
    config = tmp_path / "node.toml"
    config.write_text(text)
    write_thresholds(config, {"ResNet 18": 0.1, "EfficientNet-B0": 0.2, "DenseNet121": 0.3})
    assert len(config.read_text().splitlines()) == len(text.splitlines())
    core = load_core_config(config)
    assert [(m.name, m.threshold) for m in core.models] == [
        ("ResNet 18", 0.1),
        ("EfficientNet-B0", 0.2),
        ("DenseNet121", 0.3),
    ]
