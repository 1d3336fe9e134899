"""The node's DICOM outputs (``node.outputs``): the summary and per-model Secondary Captures, the plan of
what an image gets, and the Comprehensive 3D SR, checked with dciodvfy, dsrdump and highdicom on phantom
sources. The heatmap Segmentations are in ``test_heatmap.py``, UIDs and identity in ``test_identity.py``;
both use the helpers at the top of this file.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, DS, DT, TM

from gradcam.config import ModelConfig, RenderConfig
from gradcam.phantom_dicom import phantom_dataset
from gradcam.phantoms import make_phantom
from gradcam.preprocess import load_dataset_image
from gradcam.render import render_overlay
from gradcam.results import DISCLAIMER, AnalysisResult, ModelResult
from node.config import OutputsConfig
from node.outputs import (
    MANUFACTURER,
    MODEL_NAME,
    SOFTWARE_VERSION,
    Built,
    Evidence,
    OutputContext,
    Placement,
    Planned,
    SRReadError,
    build_outputs,
    build_secondary_capture,
    build_sr,
    is_own_output,
    output_uid,
    plan_outputs,
    read_sr_findings,
    series_uid,
    sr_uid,
)
from node.outputs.common import lo, processing_algorithm, processing_equipment
from node.outputs.encoding import DEFAULT_ENCODINGS, element, encode, file_bytes, file_parts, timestamp
from node.outputs.region import hot_region
from node.outputs.sc import derivation_description
from node.outputs.sr_content import comment_text
from node.outputs.uids import tracking_uid
from tests import helpers

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SIZE = 128  # phantom rows and columns
DEVICE_UID = "2.25.123456789"
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
)

# name: (builder, target layer, probability, threshold, checkpoint sha256, CAM peak (row, col))
MODELS = {
    "ResNet18": ("resnet18", "layer4", 0.8731234567891234, 0.25, "a1" * 32, (45, 35)),
    "EfficientNet-B0": ("efficientnet_b0", "features.8", 0.0912345678901234, 0.15, "b2" * 32, (80, 90)),
    "DenseNet121": ("densenet121", "features.denseblock4", 0.1800000000000001, 0.18, "c3" * 32, (60, 70)),
}


# --- inputs ------------------------------------------------------------------------------------------


def make_source(
    modality: str = "DX", photometric: str = "MONOCHROME2", index: int = 0, columns: int = SIZE
) -> Dataset:
    """A phantom chest radiograph (with file meta, as read from a file), cut to ``columns`` if fewer."""
    ph = make_phantom(7, index, index % 2 == 0, SIZE)
    ds = phantom_dataset(ph, 7, index, modality=modality, photometric=photometric)
    if columns < SIZE:
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, :columns]).tobytes()
        ds.Columns = columns
    return ds


def blob(peak: tuple[int, int], shape: tuple[int, int] = (SIZE, SIZE), sigma: float = 10.0) -> np.ndarray:
    """A smooth map in [0, 1] whose maximum 1.0 is at ``peak`` (row, col)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    d2 = (rows - peak[0]) ** 2 + (cols - peak[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2)).astype(np.float32)


def make_result(
    model: str = "ResNet18", probability: float | None = None, columns: int = SIZE
) -> ModelResult:
    builder, _, p, threshold, sha, peak = MODELS[model]
    p = p if probability is None else probability
    cam = blob(peak, (SIZE, columns))
    return ModelResult(model, builder, p, threshold, p >= threshold, cam, peak, sha, 12.5)


def make_analysis(probabilities: dict[str, float] | None = None, columns: int = SIZE) -> AnalysisResult:
    """The three models on one image; by default ResNet18 and DenseNet121 positive, EfficientNet negative.
    The maps are of a source of ``columns`` columns."""
    probabilities = probabilities or {}
    models = {m: make_result(m, probabilities.get(m), columns) for m in MODELS}
    return AnalysisResult("test", SIZE, columns, models)


ALL_NEGATIVE = {"ResNet18": 0.01, "EfficientNet-B0": 0.02, "DenseNet121": 0.03}


def model_configs(sha: str | None = None, **changes: object) -> list[tuple[ModelConfig, str]]:
    """Fresh ``(config, checkpoint sha256)`` pairs of the three models; ``sha`` and ``changes`` (ModelConfig
    fields) apply to ResNet18."""
    pairs = []
    for name, (builder, layer, _, threshold, digest, _) in MODELS.items():
        cfg = ModelConfig(name, builder, Path(f"{builder}.pt"), layer, input_size=224, threshold=threshold)
        if name == "ResNet18":
            cfg, digest = dataclasses.replace(cfg, **changes), sha or digest  # type: ignore[arg-type]
        pairs.append((cfg, digest))
    return pairs


def make_context(
    render: RenderConfig | None = None, outputs: OutputsConfig | None = None, **model_changes: object
) -> OutputContext:
    """A context of the three models (``model_changes`` as for :func:`model_configs`)."""
    return OutputContext.of(
        model_configs(**model_changes), render or RenderConfig(), outputs or OutputsConfig(), DEVICE_UID
    )


def placed(source: Dataset, ctx: OutputContext, kind: str, model: str | None = None, n: int = 1) -> Placement:
    """Where :func:`plan_outputs` would put the ``kind`` output (no predecessor)."""
    uid = (
        sr_uid(source.SOPInstanceUID, ctx.content_key)
        if kind == "sr"
        else output_uid(source.SOPInstanceUID, kind, model, ctx.content_key)
    )
    return Placement(series_uid(source.StudyInstanceUID, kind, ctx.content_key), uid, n)


def make_overlay(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def make_sc(
    source: Dataset, model: str | None = "ResNet18", ctx: OutputContext | None = None, n: int = 1
) -> Dataset:
    """``model``'s Secondary Capture (the summary if None) of a random overlay, Instance Number ``n``."""
    ctx = ctx or make_context()
    where = placed(source, ctx, "sc" if model else "summary", model, n)
    return build_secondary_capture(source, make_overlay(n), make_analysis(), model, ctx, where)


def make_sr(
    source: Dataset, analysis: AnalysisResult | None = None, ctx: OutputContext | None = None
) -> Dataset:
    """The SR alone (no evidence, no predecessor)."""
    ctx = ctx or make_context()
    return build_sr(source, analysis or make_analysis(), ctx, placed(source, ctx, "sr"))


def build_all(
    source: Dataset,
    analysis: AnalysisResult | None = None,
    ctx: OutputContext | None = None,
    predecessor: Dataset | None = None,
) -> list[Built]:
    """Every output of ``source`` through :func:`build_outputs`, numbered from 1 in plan order."""
    analysis = analysis or make_analysis()
    ctx = ctx or make_context()
    before = None if predecessor is None else predecessor.SOPInstanceUID
    plan = plan_outputs(source, analysis, ctx, before)
    numbers = {p.sop_uid: i for i, p in enumerate(plan, start=1)}
    image = load_dataset_image(source, 10**8, "test")
    return build_outputs(source, image, analysis, ctx, numbers, predecessor)


def by_kind(built: Iterable[Built]) -> dict[tuple[str, str | None], Dataset]:
    return {(b.kind, b.model): b.dataset for b in built}


def kinds_of(plan: Iterable[Planned]) -> list[tuple[str, str | None]]:
    return [(p.kind, p.model) for p in plan]


def predecessor_header(source: Dataset) -> Dataset:
    """The header of an earlier SR of ``source`` (as the node keeps it)."""
    ds = Dataset()
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.SeriesInstanceUID = "2.25.1001"
    ds.SOPClassUID = SR_3D_CLASS
    ds.SOPInstanceUID = "2.25.1002"
    return ds


# --- tools -------------------------------------------------------------------------------------------


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dciodvfy on ``path``."""
    if not os.access(DCIODVFY, os.X_OK):
        pytest.skip(f"{DCIODVFY} is not installed (Debian package dicom3tools)")
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


def assert_valid(path: Path, allowed_warnings: tuple[str, ...] = ()) -> None:
    """No dciodvfy error and no warning, except warnings containing one of ``allowed_warnings``."""
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy errors in {path.name}: {errors}; warnings: {warnings}"
    unexpected = [w for w in warnings if not any(a in w for a in allowed_warnings)]
    assert unexpected == [], f"dciodvfy warnings in {path.name}: {unexpected}"


def assert_all_valid(built: Iterable[Built], folder: Path, allowed_warnings: tuple[str, ...] = ()) -> None:
    for b in built:
        assert_valid(write(b.dataset, folder / f"{b.kind}-{b.model}.dcm"), allowed_warnings)


def dsrdump(path: Path) -> str:
    if not os.access(DSRDUMP, os.X_OK):
        pytest.skip(f"{DSRDUMP} is not installed (Debian package dcmtk)")
    proc = subprocess.run([str(DSRDUMP), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("E:", "F:"))]
    return proc.stdout


def encoded(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def reread(ds: Dataset) -> Dataset:
    """``ds`` as a receiver reads it from the wire."""
    return pydicom.dcmread(io.BytesIO(encoded(ds)))


def assert_same_patient_and_study(out: Dataset, source: Dataset) -> None:
    for kw in PATIENT_STUDY:
        assert out.get(kw) == source.get(kw), (kw, out.get(kw), source.get(kw))


def walk(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(walk(item))
    return items


def concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def concept_meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def model_groups(ds: Dataset) -> dict[str, Dataset]:
    """The SR's measurement groups by model name, and the consensus group as "consensus"."""
    out = {}
    for group in walk(ds):
        if group.get("ValueType") == "CONTAINER" and concept(group) == "125007":  # Measurement Group
            tracking = next(str(i.TextValue) for i in group.ContentSequence if concept(i) == "112039")
            name = tracking.removeprefix("Pneumonia classification: ")
            out["consensus" if name.startswith("Pneumonia consensus") else name] = group
    return out


# --- Secondary Capture -------------------------------------------------------------------------------


def test_sc_and_summary_pass_dciodvfy(tmp_path: Path) -> None:
    source = make_source()
    assert_valid(write(make_sc(source), tmp_path / "sc.dcm"))
    assert_valid(write(make_sc(source, model=None), tmp_path / "summary.dcm"))


def test_sc_header(tmp_path: Path) -> None:
    source = make_source()
    source.PatientOrientation = ["P", "F"]
    ds = pydicom.dcmread(write(make_sc(source, n=2), tmp_path / "sc.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == SC_CLASS
    assert_same_patient_and_study(ds, source)
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesNumber == OutputsConfig().sc_series_number and ds.InstanceNumber == 2
    assert ds.SeriesDescription == OutputsConfig().sc_series_description
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "NO"
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert (ds.Manufacturer, ds.SoftwareVersions) == (MANUFACTURER, SOFTWARE_VERSION)
    assert ds.ManufacturerModelName
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in ds.SourceImageSequence] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]
    assert ds.DerivationCodeSequence[0].CodeValue == "130403"  # Gradient-weighted class activation
    assert ds.PatientOrientation == source.PatientOrientation


def test_sc_describes_its_model_the_consensus_and_the_checkpoint() -> None:
    ds = make_sc(make_source())
    parts = (
        "Grad-CAM",
        "ResNet18",
        "p=0.873123 ",  # six decimals
        "threshold 0.25",
        "positive",
        "consensus",
        "2 of 3 positive",
        "sha256:a1a1a1a1a1a1",
        DISCLAIMER,
    )
    for text in (ds.DerivationDescription, ds.ImageComments):
        for part in parts:
            assert part in text, (part, text)
    assert "DenseNet121 p=" not in ds.DerivationDescription  # one model's map: that model's numbers only


def test_summary_describes_every_model() -> None:
    ds = make_sc(make_source(), model=None)
    text = ds.DerivationDescription
    for name, (_, _, p, threshold, sha, _) in MODELS.items():
        assert f"{name} p={p:.6f}" in text and f"threshold {threshold:g}" in text, (name, text)
        assert f"sha256:{sha[:12]}" in text
    assert "consensus" in text and "positive (2 of 3 positive)" in text and DISCLAIMER in text


def test_sc_pixels_are_the_overlay(tmp_path: Path) -> None:
    source = make_source()
    back = pydicom.dcmread(write(make_sc(source, n=5), tmp_path / "sc.dcm"))
    assert (back.Rows, back.Columns) == make_overlay(5).shape[:2]
    np.testing.assert_array_equal(back.pixel_array, make_overlay(5))


def test_sc_refuses_a_bad_overlay() -> None:
    source, ctx, analysis = make_source(), make_context(), make_analysis()
    where = placed(source, ctx, "sc", "ResNet18")
    with pytest.raises(ValueError, match="overlay"):
        build_secondary_capture(source, np.zeros((8, 8), np.uint8), analysis, "ResNet18", ctx, where)
    with pytest.raises(TypeError, match="uint8"):
        build_secondary_capture(source, np.zeros((8, 8, 3), np.float32), analysis, "ResNet18", ctx, where)


def test_long_configured_descriptions_are_cut_to_64(tmp_path: Path) -> None:
    outputs = OutputsConfig(
        sc_series_description="H" * 80, sr_series_description="F" * 65, heatmap_series_description="M" * 70
    )
    built = build_all(make_source(), ctx=make_context(outputs=outputs))
    objects = by_kind(built)
    pictures = [objects[k].SeriesDescription for k in (("summary", None), ("sc", "ResNet18"))]
    assert pictures == ["H" * 64, "H" * 64]
    assert objects["heatmap", "ResNet18"].SeriesDescription == "M" * 64
    assert objects["sr", None].SeriesDescription == "F" * 64
    assert_all_valid(built, tmp_path)


def test_lossy_source_makes_lossy_pictures(tmp_path: Path) -> None:
    # a picture or map drawn on a lossy-compressed image says so, as the standard asks of derived images
    source = make_source()
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = "10"
    source.LossyImageCompressionMethod = "ISO_10918_1"
    built = [b for b in build_all(source) if b.kind != "sr"]
    for b in built:
        ds = b.dataset
        assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1"), b.kind
    assert_all_valid(built, tmp_path)
    assert make_sc(make_source()).get("LossyImageCompression") != "01"


# --- what an image gets ------------------------------------------------------------------------------


def test_plan_of_a_negative_image_is_summary_and_sr() -> None:
    analysis = make_analysis(ALL_NEGATIVE)
    assert analysis.consensus is False
    assert kinds_of(plan_outputs(make_source(), analysis, make_context())) == [
        ("summary", None),
        ("sr", None),
    ]


def test_plan_of_a_positive_image() -> None:
    assert kinds_of(plan_outputs(make_source(), make_analysis(), make_context())) == [
        ("summary", None),
        ("sc", "ResNet18"),
        ("sc", "DenseNet121"),
        ("heatmap", "ResNet18"),
        ("heatmap", "DenseNet121"),
        ("sr", None),
    ]


def test_plan_with_negative_maps_maps_every_model() -> None:
    ctx = make_context(outputs=OutputsConfig(negative_maps=True))
    plan = kinds_of(plan_outputs(make_source(), make_analysis(ALL_NEGATIVE), ctx))
    assert plan == [
        ("summary", None),
        *(("sc", m) for m in MODELS),
        *(("heatmap", m) for m in MODELS),
        ("sr", None),
    ]


@pytest.mark.parametrize(
    "kinds",
    [("sr",), ("summary",), ("heatmap", "sr"), ("sc",), ("summary", "sc", "heatmap", "sr")],
)
def test_plan_follows_the_configured_kinds(kinds: tuple[str, ...]) -> None:
    plan = plan_outputs(make_source(), make_analysis(), make_context(outputs=OutputsConfig(kinds=kinds)))
    assert {p.kind for p in plan} == set(kinds)
    assert all(p.model in ("ResNet18", "DenseNet121") for p in plan if p.kind in ("sc", "heatmap"))


def test_build_outputs_makes_the_plan(tmp_path: Path) -> None:
    source, analysis, ctx = make_source(), make_analysis(), make_context()
    plan = plan_outputs(source, analysis, ctx)
    built = build_all(source, analysis, ctx)
    assert [(b.kind, b.model) for b in built] == kinds_of(plan)
    for b, p in zip(built, plan, strict=True):
        assert (b.dataset.SOPInstanceUID, b.dataset.SeriesInstanceUID) == (p.sop_uid, p.series_uid)
        assert b.supersedes is None
        assert_same_patient_and_study(b.dataset, source)
    classes = {b.kind: b.dataset.SOPClassUID for b in built}
    assert classes == {"summary": SC_CLASS, "sc": SC_CLASS, "heatmap": SEG_CLASS, "sr": SR_3D_CLASS}
    assert_all_valid(built, tmp_path)


def test_build_outputs_of_a_negative_image(tmp_path: Path) -> None:
    built = build_all(make_source(), make_analysis(ALL_NEGATIVE))
    assert [(b.kind, b.model) for b in built] == [("summary", None), ("sr", None)]
    assert read_sr_findings(reread(built[1].dataset)).consensus is False
    assert_all_valid(built, tmp_path)


def test_sc_pixels_are_the_rendered_overlay() -> None:
    source, analysis = make_source(), make_analysis()
    ctx = make_context(render=RenderConfig(max_side=256, opacity=0.5))
    sc = by_kind(build_all(source, analysis, ctx))["sc", "DenseNet121"]
    image = load_dataset_image(source, 10**8, "test")
    expected = render_overlay(image, analysis.models["DenseNet121"], ctx.render, analysis)
    np.testing.assert_array_equal(reread(sc).pixel_array, expected)


# --- SR ----------------------------------------------------------------------------------------------


def test_sr_passes_dciodvfy_and_dsrdump(tmp_path: Path) -> None:
    analysis = make_analysis()
    path = write(by_kind(build_all(make_source(), analysis))["sr", None], tmp_path / "sr.dcm")
    assert_valid(path)
    dump = dsrdump(path)
    for r in analysis.models.values():
        assert f'"{DS(r.probability, auto_format=True)}"' in dump, (r.model, dump)
        assert r.model in dump
    assert "Comprehensive 3D SR" in dump and "Pneumonia" in dump and "SCOORD" in dump


@pytest.mark.parametrize("probabilities", [None, {"DenseNet121": 0.05}], ids=["positive", "negative"])
def test_sr_findings_read_back_equal_the_inputs(probabilities: dict[str, float] | None) -> None:
    analysis, ctx = make_analysis(probabilities), make_context()
    findings = read_sr_findings(reread(make_sr(make_source(), analysis, ctx)))
    assert findings.consensus is analysis.consensus is (probabilities is None)
    assert [f.model for f in findings.models] == sorted(MODELS)
    for f in findings.models:
        r = analysis.models[f.model]
        assert f.probability == pytest.approx(r.probability, abs=1e-12)
        assert (f.threshold, f.positive) == (r.threshold, r.positive)
        assert (f.builder, f.checkpoint_sha256, f.version) == (
            r.builder,
            r.checkpoint_sha256,
            ctx.model(f.model).version,
        )
    assert findings.as_dict()["DenseNet121"] == {
        "probability": analysis.models["DenseNet121"].probability,
        "threshold": 0.18,
        "positive": probabilities is None,
    }


def test_sr_probability_survives_without_the_float_copy() -> None:
    # a PACS may drop FloatingPointValue (optional); the DS string alone must still be precise enough
    ds = reread(make_sr(make_source()))
    removed = 0
    for item in walk(ds):
        for mv in item.get("MeasuredValueSequence", []):
            if "FloatingPointValue" in mv:
                del mv.FloatingPointValue
                removed += 1
    assert removed >= 6  # probability and threshold of three models (and any image library spacing)
    got = read_sr_findings(ds).by_model()
    for r in make_analysis().models.values():
        assert got[r.model].probability == pytest.approx(r.probability, abs=1e-9)


def test_sr_header_and_content() -> None:
    source, ctx = make_source(), make_context()
    ds = reread(make_sr(source, ctx=ctx))
    assert ds.SOPClassUID == SR_3D_CLASS and ds.Modality == "SR"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert_same_patient_and_study(ds, source)
    outputs = OutputsConfig()
    assert (ds.SeriesNumber, ds.SeriesDescription) == (
        outputs.sr_series_number,
        outputs.sr_series_description,
    )
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.Manufacturer, ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        MANUFACTURER,
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence[0].StudyInstanceUID == source.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence
    assert [
        (
            s.SeriesInstanceUID,
            [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence],
        )
        for s in series
    ] == [(source.SeriesInstanceUID, [(source.SOPClassUID, source.SOPInstanceUID)])]
    items = walk(ds)
    comments = [i.TextValue for i in items if i.ValueType == "TEXT" and concept(i) == "121106"]
    assert len(comments) == 1 and DISCLAIMER in comments[0]
    images = [i for i in items if i.ValueType == "IMAGE"]  # no evidence given: the source only
    assert images and all(
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID for i in images
    )
    codes = {
        (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
        for i in items
        if i.ValueType == "CODE"
    }
    assert {("233604007", "SCT"), ("52101004", "SCT"), ("272519000", "SCT"), ("399208008", "SCT")} <= codes
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(ds).content)
    assert len(report.get_planar_roi_measurement_groups()) == 2  # the positive models
    assert len(report.get_image_measurement_groups()) == 2  # the negative model and the consensus


def test_sr_device_observer_is_the_node() -> None:
    ds = reread(make_sr(make_source()))
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(ds).content)
    observers = report.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    device = observers[0].observer_identifying_attributes
    assert (device.uid, device.name, device.manufacturer_name) == (DEVICE_UID, MANUFACTURER, MANUFACTURER)


def test_sr_every_group_has_a_finding_category() -> None:
    groups = model_groups(reread(make_sr(make_source())))
    assert set(groups) == {*MODELS, "consensus"}
    for name, group in groups.items():
        categories = [i for i in group.ContentSequence if concept(i) == "276214006"]  # Finding category
        assert [c.ConceptCodeSequence[0].CodeValue for c in categories] == ["404684003"], name


def test_sr_algorithm_version_is_the_checkpoint() -> None:
    ctx = make_context()
    groups = model_groups(reread(make_sr(make_source(), ctx=ctx)))
    for name in MODELS:
        versions = [i.TextValue for i in walk(groups[name]) if concept(i) == "111003"]  # TID 4019 version
        assert versions == [ctx.model(name).version] == [f"sha256:{MODELS[name][4][:12]}"], name
        assert SOFTWARE_VERSION not in versions


@pytest.mark.parametrize("columns", [SIZE, 100], ids=["square", "narrow"])
def test_sr_positive_group_outlines_the_hot_region(columns: int) -> None:
    source = make_source(columns=columns)
    analysis = make_analysis(columns=columns)
    ds = reread(make_sr(source, analysis))
    groups = model_groups(ds)
    for name, r in analysis.models.items():
        scoords = [i for i in walk(groups[name]) if i.ValueType == "SCOORD"]
        if not r.positive:
            assert scoords == [], name
            continue
        assert groups[name].ContentTemplateSequence[0].TemplateIdentifier == "1410"  # planar ROI
        (scoord,) = scoords
        assert scoord.GraphicType == "POLYLINE"
        selected = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert selected.ReferencedSOPInstanceUID == source.SOPInstanceUID
        points = np.asarray(scoord.GraphicData, np.float32).reshape(-1, 2)  # (column, row)
        assert len(points) >= 4 and tuple(points[0]) == tuple(points[-1])  # closed
        assert (
            (points >= 0).all()
            and (points[:, 0] <= source.Columns).all()
            and (points[:, 1] <= source.Rows).all()
        )
        peak = (r.cam_peak[1] + 0.5, r.cam_peak[0] + 0.5)
        assert cv2.pointPolygonTest(points.reshape(-1, 1, 2), peak, False) > 0, (name, points, peak)


def test_sr_references_the_built_objects() -> None:
    built = build_all(make_source())
    objects = by_kind(built)
    sr = reread(objects["sr", None])
    groups = model_groups(sr)
    findings = read_sr_findings(sr).by_model()
    for name in ("ResNet18", "DenseNet121"):
        refs = {
            concept(i): i.ReferencedSOPSequence[0]
            for i in groups[name].ContentSequence
            if i.ValueType == "IMAGE"
        }
        segment, picture = refs["121191"], refs["121200"]
        heatmap, sc = objects["heatmap", name], objects["sc", name]
        assert (segment.ReferencedSOPClassUID, segment.ReferencedSOPInstanceUID) == (
            SEG_CLASS,
            heatmap.SOPInstanceUID,
        )
        assert segment.ReferencedSegmentNumber == 1
        assert (picture.ReferencedSOPClassUID, picture.ReferencedSOPInstanceUID) == (
            SC_CLASS,
            sc.SOPInstanceUID,
        )
        assert set(findings[name].references) == {heatmap.SOPInstanceUID, sc.SOPInstanceUID}
    assert findings["EfficientNet-B0"].references == ()


def test_sr_references_negative_maps_when_they_are_made(tmp_path: Path) -> None:
    ctx = make_context(outputs=OutputsConfig(negative_maps=True))
    built = build_all(make_source(), make_analysis(), ctx)
    objects = by_kind(built)
    findings = read_sr_findings(reread(objects["sr", None])).by_model()
    negative = findings["EfficientNet-B0"]
    assert negative.positive is False and negative.region == ()
    assert set(negative.references) == {
        objects["heatmap", "EfficientNet-B0"].SOPInstanceUID,
        objects["sc", "EfficientNet-B0"].SOPInstanceUID,
    }
    assert_all_valid(built, tmp_path)


def test_sr_evidence_lists_every_object() -> None:
    source = make_source()
    built = build_all(source)
    sr = reread(built[-1].dataset)
    listed = {
        (s.SeriesInstanceUID, i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    expected = {(source.SeriesInstanceUID, source.SOPClassUID, source.SOPInstanceUID)} | {
        (b.dataset.SeriesInstanceUID, b.dataset.SOPClassUID, b.dataset.SOPInstanceUID) for b in built[:-1]
    }
    assert listed == expected
    assert [s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence] == [
        source.StudyInstanceUID
    ]


def test_sr_supersedes_its_predecessor(tmp_path: Path) -> None:
    source = make_source()
    before = predecessor_header(source)
    first = by_kind(build_all(source))
    built = build_all(source, predecessor=before)
    second = by_kind(built)
    sr = second["sr", None]
    assert built[-1].supersedes == before.SOPInstanceUID
    assert sr.SOPInstanceUID != first["sr", None].SOPInstanceUID
    assert sr.SOPInstanceUID == sr_uid(
        source.SOPInstanceUID, make_context().content_key, before.SOPInstanceUID
    )
    assert {k: v.SOPInstanceUID for k, v in first.items() if k[0] != "sr"} == {
        k: v.SOPInstanceUID for k, v in second.items() if k[0] != "sr"
    }  # only the SR names its predecessor
    (study,) = reread(sr).PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (
        before.StudyInstanceUID,
        before.SeriesInstanceUID,
    )
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        SR_3D_CLASS,
        before.SOPInstanceUID,
    )
    path = write(sr, tmp_path / "sr.dcm")
    assert_valid(path)
    assert "Predecessor Docs" in dsrdump(path)
    assert "PredecessorDocumentsSequence" not in first["sr", None]


def test_sr_image_library_describes_the_radiograph(tmp_path: Path) -> None:
    source = make_source()
    names = {concept_meaning(i) for i in walk(reread(make_sr(source)))}
    assert {"Patient Orientation Row", "Horizontal Pixel Spacing"} <= names
    del source.ImagerPixelSpacing  # CR images often have none: the SR is still made, without those rows
    path = write(make_sr(source), tmp_path / "sr.dcm")
    assert_valid(path)
    names = {concept_meaning(i) for i in walk(pydicom.dcmread(path))}
    assert "Horizontal Pixel Spacing" not in names and "Pixel Data Rows" in names


def test_read_sr_findings_refuses_other_objects() -> None:
    with pytest.raises(SRReadError):
        read_sr_findings(make_source())
    with pytest.raises(SRReadError):
        read_sr_findings(helpers.sr_dataset())


def test_build_sr_needs_results() -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_sr(make_source(), AnalysisResult("test", SIZE, SIZE, {}))


# --- loop protection ---------------------------------------------------------------------------------


def test_is_own_output_on_every_kind() -> None:
    source = make_source()
    assert is_own_output(source) is False
    assert is_own_output(helpers.sr_dataset()) is False
    built = build_all(source)
    assert {b.kind for b in built} == {"summary", "sc", "heatmap", "sr"}
    for b in built:
        ds = reread(b.dataset)
        assert is_own_output(ds), b.kind
        # a PACS or viewer that rewrites the equipment of a derived object keeps the contributing equipment
        ds.Manufacturer = "OTHER"
        ds.ManufacturerModelName = "OTHER"
        assert is_own_output(ds), b.kind


# --- unusual sources ---------------------------------------------------------------------------------


def test_monochrome1_cr_source(tmp_path: Path) -> None:
    source = make_source(modality="CR", photometric="MONOCHROME1")
    analysis, ctx = make_analysis(), make_context(render=RenderConfig(max_side=256))
    built = build_all(source, analysis, ctx)
    image = load_dataset_image(source, 10**8, "test")
    for b in built:
        back = reread(b.dataset)
        assert_same_patient_and_study(back, source)
        if b.kind == "sc":
            assert back.PhotometricInterpretation == "RGB"
            expected = render_overlay(image, analysis.models[str(b.model)], ctx.render, analysis)
            np.testing.assert_array_equal(back.pixel_array, expected)
    assert_all_valid(built, tmp_path)


def test_cr_without_projection_geometry(tmp_path: Path) -> None:
    source = make_source(modality="CR")
    del source.ImagerPixelSpacing
    del source.PatientOrientation
    built = build_all(source)
    assert_all_valid(built, tmp_path)
    assert read_sr_findings(reread(built[-1].dataset)).consensus is True


def test_source_without_optional_attributes(tmp_path: Path) -> None:
    source = make_source()
    emptied = (
        "AccessionNumber",
        "PatientBirthDate",
        "ReferringPhysicianName",
        "PatientSex",
        "StudyID",
        "StudyTime",
    )
    for kw in (*emptied, "StudyDescription", "PatientOrientation", "ImagerPixelSpacing"):
        delattr(source, kw)
    built = build_all(source)
    # the source has no Study Time/ID to copy: only the DICOMDIR hints may be missing
    assert_all_valid(built, tmp_path, allowed_warnings=("needed to build DICOMDIR",))
    for b in built:
        for kw in emptied:
            assert kw in b.dataset and not b.dataset[kw].value, (b.kind, kw)  # type 2: present, empty
        assert "StudyDescription" not in b.dataset, b.kind
        assert (
            b.dataset.StudyInstanceUID == source.StudyInstanceUID and b.dataset.PatientID == source.PatientID
        )
    assert read_sr_findings(reread(built[-1].dataset)).consensus is True


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_odd_but_real_world_values_are_copied_verbatim() -> None:
    # highdicom itself refuses these; the outputs must still be made and match the source exactly
    source = make_source()
    source.PatientName = "ANONYMOUS"
    source.PatientSex = "X"
    source.PatientBirthDate = "1970"
    source.ReferringPhysicianName = "Dr Who"
    built = build_all(source)
    for b in built:
        ds = reread(b.dataset)
        assert (str(ds.PatientName), ds.PatientSex, ds.PatientBirthDate) == ("ANONYMOUS", "X", "1970"), b.kind
        assert str(ds.ReferringPhysicianName) == "Dr Who"
    assert read_sr_findings(reread(built[-1].dataset)).models[0].model == "DenseNet121"


def test_character_set_follows_the_source(tmp_path: Path) -> None:
    source = make_source()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "MÜLLER^JÖRG"
    built = build_all(source)
    for b in built:
        ds = reread(b.dataset)
        assert ds.SpecificCharacterSet == "ISO_IR 100" and str(ds.PatientName) == "MÜLLER^JÖRG", b.kind
    assert_all_valid(built, tmp_path)


@pytest.mark.parametrize("charset", [None, "ISO_IR 100"])
def test_file_bytes_are_what_pydicom_writes(charset: str | None) -> None:
    """The worker writes outputs with encoding.file_parts (file_bytes joins them): byte for byte pydicom's
    save_as, for every kind, also after an element was read or changed (no longer raw); the pixel data of
    the images (64 KiB or more) is written from its own buffer, not copied."""
    source = make_source()
    if charset:
        source.SpecificCharacterSet = charset
        source.PatientName = "MÜLLER^JÖRG"
    built = build_all(source, make_analysis(), make_context(outputs=OutputsConfig(negative_maps=True)))
    assert {b.kind for b in built} == {"summary", "sc", "heatmap", "sr"}
    uncopied = 0
    for b in built:
        fp = io.BytesIO()
        b.dataset.save_as(fp, enforce_file_format=True)
        assert file_bytes(b.dataset) == fp.getvalue(), b.kind
        pixels = b.dataset["PixelData"].value if "PixelData" in b.dataset else b""
        if len(pixels) >= 64 * 1024:
            assert any(part is pixels for part in file_parts(b.dataset)), b.kind
            uncopied += 1
    assert uncopied >= 1  # the summary, at least
    changed = built[0].dataset
    changed.SeriesDescription = "changed after assembly"
    fp = io.BytesIO()
    changed.save_as(fp, enforce_file_format=True)
    assert file_bytes(changed) == fp.getvalue() and b"changed after assembly" in fp.getvalue()


# --- identity with the previous release's highdicom builders -------------------------------------------
#
# The builders assemble their outputs from encoded parts (node.outputs.encoding). The highdicom builders
# they replace are kept here as the reference: every output must be the object they made, element for
# element and byte for byte, but for the creation times and highdicom's random Dimension Organization UID.

_REF_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
_REF_TYPE2 += ("AccessionNumber", "StudyID", "ReferringPhysicianName")
_REF_OPTIONAL = ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence")
_REF_OPTIONAL += (
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyDescription",
    "IssuerOfAccessionNumberSequence",
)
_REF_PATIENT_STUDY = ("StudyInstanceUID", *_REF_TYPE2, *_REF_OPTIONAL)


def _ref_text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    return "" if value is None else str(value).strip()


def _ref_valid_or_none(value: object, kind: type) -> object:
    if value is None or str(value).strip() == "":
        return None
    try:
        return kind(str(value).strip())
    except (ValueError, TypeError, OverflowError):
        return None


def reference_header(source: Dataset) -> Dataset:
    """The source without pixel data, with the values highdicom refuses made acceptable."""
    from pydicom.valuerep import DA, TM

    ref = Dataset()
    for elem in source:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ref.add(copy.deepcopy(elem))
    for keyword in _REF_TYPE2:
        if keyword not in ref or ref[keyword].value is None:
            setattr(ref, keyword, "")
    name = _ref_text(ref, "PatientName")
    if name and "^" not in name:
        ref.PatientName = name + "^"
    ref.ReferringPhysicianName = ""
    if _ref_text(ref, "PatientSex").upper() not in ("M", "F", "O", ""):
        ref.PatientSex = ""
    ref.PatientBirthDate = _ref_valid_or_none(ref.PatientBirthDate, DA) or ""
    ref.StudyDate = _ref_valid_or_none(ref.StudyDate, DA) or ""
    ref.StudyTime = _ref_valid_or_none(ref.StudyTime, TM) or ""
    if "SpecificCharacterSet" in source:
        ref.SpecificCharacterSet = source.SpecificCharacterSet
    return ref


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    for keyword in _REF_PATIENT_STUDY:
        if keyword in source:
            target.add(copy.deepcopy(source[keyword]))
        elif keyword in _REF_TYPE2:
            setattr(target, keyword, None)
        elif keyword in target:
            del target[keyword]
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def copy_patient_orientation(source: Dataset, target: Dataset) -> None:
    if "PatientOrientation" in source:
        target.add(copy.deepcopy(source["PatientOrientation"]))
    else:
        target.PatientOrientation = None


def _ref_instance(placement: Placement, series_number: int) -> dict:
    """The arguments that place a highdicom object: series, instance, number, manufacturer."""
    return {
        "series_instance_uid": placement.series_uid,
        "series_number": series_number,
        "sop_instance_uid": placement.sop_uid,
        "instance_number": placement.instance_number,
        "manufacturer": MANUFACTURER,
    }


def reference_sc(
    source: Dataset,
    pixels: np.ndarray,
    analysis: AnalysisResult,
    model: str | None,
    ctx: OutputContext,
    placement: Placement,
) -> Dataset:
    """The previous release's Secondary Capture (highdicom ``SCImage``)."""
    results = list(analysis.models.values()) if model is None else [analysis.models[model]]
    what = "Summary of the pneumonia classification" if model is None else f"Grad-CAM heatmap of {model}"
    equipment = [processing_algorithm(r.model, ctx.model(r.model).version, ctx.device_uid) for r in results]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference_header(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **_ref_instance(placement, ctx.outputs.sc_series_number),
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[*equipment, processing_equipment(what, ctx.device_uid, ctx.software_version)],
        series_description=lo(ctx.outputs.sc_series_description),
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
    )
    copy_patient_study(source, sc)
    copy_patient_orientation(source, sc)
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and source[keyword].value:
            sc.add(copy.deepcopy(source[keyword]))
    sc.DeviceSerialNumber = ctx.device_uid
    description = derivation_description(analysis, model, ctx)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = MODEL_NAME
    sc.SecondaryCaptureDeviceSoftwareVersions = ctx.software_version
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = description[:1024]
    derivation = [hd.sr.CodedConcept.from_code(codes.DCM.GradientWeightedClassActivation)]
    if (source.get("Rows"), source.get("Columns")) != pixels.shape[:2]:
        derivation.append(hd.sr.CodedConcept.from_code(codes.DCM.SpatialResampling))
    sc.DerivationCodeSequence = derivation
    sc.ImageComments = f"{DISCLAIMER}. {description}"[:10240]
    if str(source.get("LossyImageCompression", "")).strip() == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                sc.add(copy.deepcopy(source[keyword]))
    return sc


def reference_heatmap(
    source: Dataset, result: ModelResult, ctx: OutputContext, placement: Placement
) -> Dataset:
    """The previous release's heatmap (highdicom ``Segmentation``)."""
    cam = np.clip(np.asarray(result.cam, dtype=np.float32), 0.0, 1.0)
    version = ctx.model(result.model).version
    algorithm = hd.AlgorithmIdentificationSequence(
        name=lo(result.model),
        version=lo(version),
        family=codes.DCM.ArtificialIntelligence,
        source=MANUFACTURER,
        parameters={
            "probability": f"{result.probability:.6f}",
            "threshold": f"{result.threshold:g}",
            "decision": "positive" if result.positive else "negative",
        },
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=lo(
            f"{result.model} Grad-CAM: evidence for {'pneumonia' if result.positive else 'NORMAL'}"
        ),
        segmented_property_category=Code("404684003", "SCT", "Finding"),
        segmented_property_type=Code("233604007", "SCT", "Pneumonia")
        if result.positive
        else Code("17621005", "SCT", "Normal"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=[reference_header(source)],
        pixel_array=cam,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[segment],
        **_ref_instance(placement, ctx.outputs.heatmap_series_number),
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_uid,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255,
        content_label="GRADCAM",
        content_description=lo("Grad-CAM map, relative 0-1; AI research output, not diagnostic"),
        series_description=lo(ctx.outputs.heatmap_series_description),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[
            processing_algorithm(result.model, version, ctx.device_uid),
            processing_equipment(
                f"Grad-CAM map of {result.model} ({version})", ctx.device_uid, ctx.software_version
            ),
        ],
    )
    copy_patient_study(source, seg)
    copy_patient_orientation(source, seg)
    seg.ImageComments = (
        f"{DISCLAIMER}. Grad-CAM of {result.model} ({version}): relative saliency scaled to its maximum "
        f"(0-1), not a probability per pixel. {result.model} p={result.probability:.6f}, threshold "
        f"{result.threshold:g}, decision {'positive' if result.positive else 'negative'}."
    )
    return seg


def _ref_group(ref: Dataset, result: ModelResult, ctx: OutputContext, evidence: list[Evidence]) -> object:
    identity = ctx.model(result.model)
    common = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=tracking_uid(str(ref.SOPInstanceUID), result.model),
            identifier=f"Pneumonia classification: {result.model}",
        ),
        "finding_type": Code("233604007", "SCT", "Pneumonia"),
        "finding_category": Code("404684003", "SCT", "Finding"),
        "finding_sites": [hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        "algorithm_id": hd.sr.AlgorithmIdentification(
            name=result.model,
            version=identity.version,
            parameters=[
                f"builder={result.builder}",
                f"checkpoint_sha256={result.checkpoint_sha256}",
                f"input_size={identity.input_size}",
            ],
            family=codes.DCM.ArtificialIntelligence,
            manufacturer=MANUFACTURER,
        ),
        "measurements": [
            hd.sr.Measurement(
                name=codes.DCM.Probability, value=float(result.probability), unit=codes.UCUM.NoUnits
            ),
            hd.sr.Measurement(
                name=codes.DCM.ThresholdValue, value=float(result.threshold), unit=codes.UCUM.NoUnits
            ),
        ],
        "qualitative_evaluations": [_ref_presence(bool(result.positive))],
    }
    if result.positive:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=hot_region(result.cam, result.cam_peak),
            source_image=hd.sr.SourceImageForRegion.from_source_image(ref),
        )
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)], **common
        )
    kinds = {"heatmap": (codes.DCM.ReferencedSegment, [1]), "sc": (codes.DCM.IllustrationOfROI, None)}
    for e in evidence:
        if e.model == result.model and e.kind in kinds:
            concept, segments = kinds[e.kind]
            group[0].ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=concept,
                    referenced_sop_class_uid=e.dataset.SOPClassUID,
                    referenced_sop_instance_uid=e.dataset.SOPInstanceUID,
                    referenced_segment_numbers=segments,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
    return group


def _ref_presence(positive: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(
        name=Code("233604007", "SCT", "Pneumonia"), value=codes.SCT.Present if positive else codes.SCT.Absent
    )


def _ref_library_entry(ref: Dataset) -> Dataset:
    orientation, spacing = ref.get("PatientOrientation", None), ref.get("ImagerPixelSpacing", None)
    geometry = (
        not isinstance(orientation, str | None)
        and not isinstance(spacing, str | None)
        and len(orientation) == 2
        and all(str(v).strip() for v in orientation)
        and len(spacing) == 2
        and all(float(v) > 0 for v in spacing)
    )
    if geometry:
        return ref
    entry = Dataset()
    entry.update(ref)
    entry.Modality = "OT"
    return entry


def reference_sr(
    source: Dataset,
    analysis: AnalysisResult,
    ctx: OutputContext,
    placement: Placement,
    evidence: list[Evidence],
    predecessor: Dataset | None = None,
) -> Dataset:
    """The previous release's SR (highdicom ``MeasurementReport`` in a ``Comprehensive3DSR``)."""
    ref = reference_header(source)
    headers = []
    for e in evidence:
        header = Dataset()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            setattr(header, keyword, getattr(e.dataset, keyword))
        headers.append(Evidence(e.kind, e.model, header))
    results = list(analysis.models.values())
    groups = [_ref_group(ref, r, ctx, headers) for r in results]
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(str(ref.SOPInstanceUID), "consensus"),
                identifier="Pneumonia consensus (majority vote)",
            ),
            finding_type=Code("233604007", "SCT", "Pneumonia"),
            finding_category=Code("404684003", "SCT", "Finding"),
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=hd.sr.AlgorithmIdentification(
                name="gradcam-node majority vote",
                version=ctx.software_version,
                parameters=[
                    "models=" + ",".join(r.model for r in results),
                    "rule=majority of the model decisions; a tie counts as positive",
                ],
                manufacturer=MANUFACTURER,
            ),
            qualitative_evaluations=[_ref_presence(bool(analysis.consensus))],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ref)],
        )
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ctx.device_uid, name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.cid270.Device, observer_identifying_attributes=device
            )
        ),
        procedure_reported=Code("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=groups,
        referenced_images=[_ref_library_entry(ref)],
    )
    report[0].ContentSequence.append(
        hd.sr.TextContentItem(
            name=codes.DCM.Comment,
            value=comment_text(results, analysis.consensus),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    names = ", ".join(analysis.models)
    algorithms = [
        processing_algorithm(m.name, m.version, ctx.device_uid)
        for m in ctx.models
        if m.name in analysis.models
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[ref, *(h.dataset for h in headers)],
        content=report[0],
        **_ref_instance(placement, ctx.outputs.sr_series_number),
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[
            *algorithms,
            processing_equipment(
                f"pneumonia classification by {names}", ctx.device_uid, ctx.software_version
            ),
        ],
        series_description=lo(ctx.outputs.sr_series_description),
        manufacturer_model_name=MODEL_NAME,
        software_versions=ctx.software_version,
        device_serial_number=ctx.device_uid,
        previous_versions=[predecessor] if predecessor is not None else None,
    )
    copy_patient_study(source, sr)
    return sr


_CREATED = ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime")
_CREATED += ("DateOfSecondaryCapture", "TimeOfSecondaryCapture")


def _decoded(data: bytes) -> Dataset:
    """``data`` read back with every element decoded (so that writing it encodes every element anew)."""
    ds = pydicom.dcmread(io.BytesIO(data))

    def decode(d: Dataset) -> None:
        for elem in d:  # iterating decodes each raw element in place
            if elem.VR == "SQ":
                for i in elem.value:
                    decode(i)

    decode(ds)
    return ds


def _as_made_now(data: bytes) -> Dataset:
    """``data`` decoded, with the values that differ from one construction to the next made equal: the
    creation times, highdicom's contribution time and its random Dimension Organization UID."""
    ds = _decoded(data)
    for keyword in _CREATED:
        if keyword in ds:
            setattr(ds, keyword, "20000101" if keyword.endswith("Date") else "000000")
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if equipment.Manufacturer == "Highdicom open-source contributors":
            equipment.ContributionDateTime = "20000101000000"
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for dimension in ds.get(keyword, []):
            dimension.DimensionOrganizationUID = "2.25.1"
    return ds


def assert_identical(made: Dataset, reference: Dataset) -> None:
    """``made`` is ``reference`` (but for :func:`_as_made_now`), and its bytes are what pydicom writes for
    its content: the encoded parts it was assembled from are right, not only their decoded values."""
    data = encoded(made)
    assert encoded(_decoded(data)) == data, "assembled bytes differ from pydicom's encoding of their content"
    ours, theirs = _as_made_now(data), _as_made_now(encoded(reference))
    assert ours.file_meta == theirs.file_meta
    assert ours.to_json_dict() == theirs.to_json_dict()  # a readable difference first
    assert encoded(ours) == encoded(theirs)


def _odd_source(index: int = 0) -> Dataset:
    """A source with what real ones carry and highdicom refuses or handles on its own: a name without
    ``^``, sex X, a partial birth date, a Latin-1 character set, more Patient and Study module attributes,
    a frame of reference, Pixel Spacing, lossy compression."""
    source = make_source("CR", "MONOCHROME1", index)
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "MÜLLER JÖRG"
    source.PatientSex = "X"
    source.PatientBirthDate = "1970"
    source.ReferringPhysicianName = "Dr Who"
    source.PatientComments = "prior pneumonia"
    source.OtherPatientNames = "Jörg Müller"
    source.AdmittingDiagnosesDescription = "cough"
    source.FrameOfReferenceUID = "2.25.777"
    source.PixelSpacing = [0.15, 0.15]
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = "10"
    source.LossyImageCompressionMethod = "ISO_10918_1"
    source.AcquisitionDate = "20250827"
    del source.ImagerPixelSpacing
    return source


def _bare_source() -> Dataset:
    """A source without the optional attributes, without a manufacturer (no acquisition equipment)."""
    source = make_source("CR")
    for keyword in ("AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "PatientSex", "StudyID"):
        delattr(source, keyword)
    for keyword in (
        "StudyTime",
        "StudyDescription",
        "PatientOrientation",
        "Manufacturer",
        "SpecificCharacterSet",
    ):
        delattr(source, keyword)
    return source


IDENTITY_SOURCES = {"dx": make_source, "odd": _odd_source, "bare": _bare_source}


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("kind", sorted(IDENTITY_SOURCES))
@pytest.mark.parametrize(
    "model", [None, "ResNet18", "EfficientNet-B0"], ids=["summary", "positive", "negative"]
)
def test_sc_equals_the_highdicom_secondary_capture(kind: str, model: str | None) -> None:
    source, ctx, analysis = IDENTITY_SOURCES[kind](), make_context(), make_analysis()
    where = placed(source, ctx, "summary" if model is None else "sc", model, 3)
    for pixels in (make_overlay(1), make_overlay(2)[:95, :127]):  # resampled; an odd number of bytes
        made = build_secondary_capture(source, pixels, analysis, model, ctx, where)
        assert_identical(made, reference_sc(source, pixels, analysis, model, ctx, where))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("kind", sorted(IDENTITY_SOURCES))
@pytest.mark.parametrize(
    "probabilities",
    [None, {"ResNet18": 0.9, "EfficientNet-B0": 0.9, "DenseNet121": 0.9}, ALL_NEGATIVE],
    ids=["mixed", "positive", "negative"],
)
@pytest.mark.parametrize("predecessor", [False, True], ids=["first", "superseding"])
def test_sr_equals_the_highdicom_document(kind: str, probabilities: dict | None, predecessor: bool) -> None:
    """Three positive models, two of three, none; a first report and one that supersedes another; with
    the evidence of a real result (and the maps of negative models too)."""
    source, analysis = IDENTITY_SOURCES[kind](), make_analysis(probabilities)
    ctx = make_context(outputs=OutputsConfig(negative_maps=kind == "odd"))
    before = predecessor_header(source) if predecessor else None
    built = build_all(source, analysis, ctx, before)
    evidence = [Evidence(b.kind, b.model, b.dataset) for b in built[:-1]]
    sr = built[-1].dataset
    where = Placement(sr.SeriesInstanceUID, sr.SOPInstanceUID, int(sr.InstanceNumber))
    assert_identical(built[-1].dataset, reference_sr(source, analysis, ctx, where, evidence, before))


def test_identity_checks_fail_on_a_difference() -> None:
    """The identity checks above are not vacuous: one changed value, or one element more, fails them."""
    source, ctx, analysis = make_source(), make_context(), make_analysis()
    where = placed(source, ctx, "sr")
    reference = reference_sr(source, analysis, ctx, where, [])
    made = build_sr(source, analysis, ctx, where)
    assert_identical(made, reference)
    changed = reread(made)
    changed.ContentSequence[-1].TextValue += "."
    with pytest.raises(AssertionError):
        assert_identical(changed, reference)
    more = reread(made)
    more.StudyComments = "x"
    with pytest.raises(AssertionError):
        assert_identical(more, reference)


# --- encoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "when",
    [datetime.datetime(2026, 3, 4, 5, 6, 7, 890), datetime.datetime(2026, 3, 4, 5, 6, 7)],
    ids=["microseconds", "whole second"],
)
def test_timestamps_are_written_as_pydicom_writes_highdicoms_values(when: datetime.datetime) -> None:
    date, time, moment = timestamp(when)
    for tag, vr, text, value in (
        (0x00080012, "DA", date, DA(when.date())),
        (0x00080013, "TM", time, TM(when.time())),
        (0x0018A002, "DT", moment, DT(when)),
    ):
        assert element(tag, vr, text) == encode(DataElement(tag, vr, value)), vr


@pytest.mark.parametrize(
    ("vr", "value"),
    [
        ("CS", "ODD"),
        ("CS", "EVEN"),
        ("CS", ""),
        ("UI", "2.25.123"),
        ("UI", "2.25.12"),
        ("DS", "0.87312345678912"),
        ("IS", "7"),
        ("LO", "Müller"),
        ("LO", "Jörg"),
        ("SH", "x"),
        ("ST", "é" * 7),
        ("LT", "a\\b"),
        ("UT", "x" * 70000),
        ("LO", "x" * 70001),
        ("US", 1),
        ("FD", 0.1),
        ("FL", [1.5, 2.25]),
        ("AT", 0x0062000B),
    ],
)
@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192"])
@pytest.mark.filterwarnings("ignore:The value")  # the over-long LO, which pydicom writes as UN
def test_elements_are_encoded_as_pydicom_encodes_them(vr: str, value: object, charset: str | None) -> None:
    """The fast encoding of simple values, and pydicom's for the rest, give pydicom's bytes."""
    from pydicom.charset import convert_encodings

    encodings = tuple(convert_encodings(charset)) if charset else DEFAULT_ENCODINGS
    tag = {"AT": 0x00209165, "FL": 0x00700022, "FD": 0x0040A161, "US": 0x00280010}.get(vr, 0x00100010)
    assert element(tag, vr, value, encodings) == encode(DataElement(tag, vr, value), encodings)


def test_outputs_share_no_mutable_part() -> None:
    """Outputs are assembled from cached encoded parts: changing one output changes no other, nor the
    next one built."""
    source = make_source()
    first = build_all(source)
    for b in first:
        b.dataset.ContributingEquipmentSequence[-2].Manufacturer = "CHANGED"
        b.dataset.SeriesDescription = "CHANGED"
    first[-1].dataset.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning = "CHANGED"
    for b in build_all(source):
        text = encoded(b.dataset)
        assert b"CHANGED" not in text, b.kind
