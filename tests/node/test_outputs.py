"""The node's DICOM outputs: Secondary Captures and the Comprehensive 3D SR, checked with dciodvfy, dsrdump
and highdicom, on synthetic sources (phantoms from ``gradcam.phantoms`` when present)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DS

from gradcam.results import DISCLAIMER, ModelResult, consensus_of
from node.config import OutputsConfig
from node.db import Result
from node.outputs import (
    MANUFACTURER,
    SOFTWARE_VERSION,
    SRReadError,
    build_secondary_capture,
    build_sr,
    derive_uid,
    is_own_output,
    read_sr_findings,
    sc_instance_uid,
    sr_instance_uid,
)
from tests import helpers

DCIODVFY = Path("/usr/bin/dciodvfy")
DSRDUMP = Path("/usr/bin/dsrdump")
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_3D_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
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
OUTPUTS = OutputsConfig()


# --- inputs ------------------------------------------------------------------------------------------


def make_source(modality: str = "DX", photometric: str = "MONOCHROME2", index: int = 0) -> Dataset:
    """A synthetic chest image: a ``gradcam.phantoms`` phantom when that module exists, else a small DX."""
    try:
        from gradcam.phantoms import make_phantom, phantom_dataset
    except ImportError:
        ds = helpers.image_dataset(modality=modality, size=96, seed=index, photometric=photometric)
        ds.AccessionNumber = f"ACC{index:04d}"
        ds.PatientBirthDate = "19700101"
        ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
        ds.StudyDescription = "XR CHEST PA (synthetic)"
        ds.PatientOrientation = ["L", "F"]
        if modality == "DX":
            ds.ImagerPixelSpacing = [0.2, 0.2]
    else:
        ds = phantom_dataset(make_phantom(7, index, index % 2 == 0, 96), 7, index, modality=modality)
        if photometric == "MONOCHROME1" and ds.PhotometricInterpretation != "MONOCHROME1":
            ds.PhotometricInterpretation = "MONOCHROME1"
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds.file_meta = FileMetaDataset()  # as read from a file: the renderer's decoder needs the syntax
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def make_result(
    model: str = "ResNet18",
    probability: float = 0.8731234567891234,
    threshold: float = 0.25,
    digest: str = "ab" * 32,
    builder: str = "resnet18",
) -> ModelResult:
    cam = np.zeros((96, 96), np.float32)
    cam[30:60, 20:50] = 1.0
    return ModelResult(
        model=model,
        builder=builder,
        probability=probability,
        threshold=threshold,
        positive=probability >= threshold,
        cam=cam,
        cam_peak=(45, 35),
        checkpoint_sha256=digest,
        ms=12.5,
    )


def three_results() -> list[ModelResult]:
    return [
        make_result("ResNet18", 0.8731234567891234, 0.25, "a1" * 32, "resnet18"),
        make_result("EfficientNet-B0", 0.0912345678901234, 0.15, "b2" * 32, "efficientnet_b0"),
        make_result("DenseNet121", 0.1800000000000001, 0.18, "c3" * 32, "densenet121"),
    ]


def make_overlay(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 128, 3), dtype=np.uint8)


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
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


def assert_valid(path: Path, allowed_warnings: tuple[str, ...] = ()) -> None:
    """No dciodvfy error and no warning, except warnings containing one of ``allowed_warnings``."""
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy errors in {path.name}: {errors}; warnings: {warnings}"
    unexpected = [w for w in warnings if not any(a in w for a in allowed_warnings)]
    assert unexpected == [], f"dciodvfy warnings in {path.name}: {unexpected}"


def dsrdump(path: Path) -> str:
    if not os.access(DSRDUMP, os.X_OK):
        pytest.skip(f"{DSRDUMP} is not installed (Debian package dcmtk)")
    proc = subprocess.run([str(DSRDUMP), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("E:", "F:"))]
    return proc.stdout


def sc_file(tmp_path: Path, source: Dataset, result: ModelResult | None = None, n: int = 1) -> Path:
    r = result or make_result()
    return write(build_secondary_capture(source, make_overlay(n), r, OUTPUTS, n), tmp_path / f"sc{n}.dcm")


def sr_file(tmp_path: Path, source: Dataset, results: list[ModelResult] | None = None) -> Path:
    rs = results or three_results()
    return write(build_sr(source, rs, consensus_of(rs), OUTPUTS), tmp_path / "sr.dcm")


def assert_same_patient_and_study(out: Dataset, source: Dataset) -> None:
    for kw in PATIENT_STUDY:
        assert out.get(kw) == source.get(kw), (kw, out.get(kw), source.get(kw))


# --- Secondary Capture -------------------------------------------------------------------------------


def test_sc_passes_dciodvfy(tmp_path: Path) -> None:
    assert_valid(sc_file(tmp_path, make_source()))


def test_sc_header(tmp_path: Path) -> None:
    source = make_source()
    source.PatientOrientation = ["P", "F"]
    result = make_result()
    ds = pydicom.dcmread(sc_file(tmp_path, source, result, n=2))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == SC_CLASS
    assert_same_patient_and_study(ds, source)
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesNumber == OUTPUTS.sc_series_number and ds.InstanceNumber == 2
    assert ds.SeriesDescription == OUTPUTS.sc_series_description
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.BurnedInAnnotation == "YES"
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert (ds.Manufacturer, ds.SoftwareVersions) == (MANUFACTURER, SOFTWARE_VERSION)
    assert ds.ManufacturerModelName
    refs = ds.SourceImageSequence
    assert [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]
    text = ds.DerivationDescription
    for part in ("Grad-CAM", "ResNet18", "p=0.873", "threshold 0.25", "positive", "ab" * 32, DISCLAIMER):
        assert part in text, (part, text)
    assert DISCLAIMER in ds.ImageComments and "0.873123" in ds.ImageComments
    assert ds.DerivationCodeSequence[0].CodeValue == "130403"  # Gradient-weighted class activation
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
    assert len(ours) == 1 and "ab" * 32 in ours[0].ContributionDescription
    assert ds.PatientOrientation == source.PatientOrientation


def test_sc_pixels_are_the_overlay(tmp_path: Path) -> None:
    overlay = make_overlay(5)
    ds = build_secondary_capture(make_source(), overlay, make_result(), OUTPUTS)
    back = pydicom.dcmread(write(ds, tmp_path / "sc.dcm"))
    assert (back.Rows, back.Columns) == overlay.shape[:2]
    np.testing.assert_array_equal(back.pixel_array, overlay)


def test_sc_refuses_a_bad_overlay() -> None:
    source = make_source()
    with pytest.raises(ValueError, match="overlay"):
        build_secondary_capture(source, np.zeros((8, 8), np.uint8), make_result(), OUTPUTS)
    with pytest.raises(TypeError, match="uint8"):
        build_secondary_capture(source, np.zeros((8, 8, 3), np.float32), make_result(), OUTPUTS)


def test_long_configured_descriptions_are_cut_to_64(tmp_path: Path) -> None:
    cfg = OutputsConfig(sc_series_description="H" * 80, sr_series_description="F" * 65)
    sc = build_secondary_capture(make_source(), make_overlay(), make_result(), cfg)
    sr = build_sr(make_source(), three_results(), True, cfg)
    assert (sc.SeriesDescription, sr.SeriesDescription) == ("H" * 64, "F" * 64)
    assert_valid(write(sc, tmp_path / "sc.dcm"))
    assert_valid(write(sr, tmp_path / "sr.dcm"))


# --- UIDs --------------------------------------------------------------------------------------------


def test_uids_are_valid_and_deterministic() -> None:
    source = make_source()
    r = make_result()
    first = build_secondary_capture(source, make_overlay(), r, OUTPUTS)
    again = build_secondary_capture(source, make_overlay(), r, OUTPUTS)
    assert first.SOPInstanceUID == again.SOPInstanceUID == sc_instance_uid(source.SOPInstanceUID, r)
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    rs = three_results()
    sr1 = build_sr(source, rs, True, OUTPUTS)
    sr2 = build_sr(source, list(reversed(rs)), True, OUTPUTS)
    assert sr1.SOPInstanceUID == sr2.SOPInstanceUID == sr_instance_uid(source.SOPInstanceUID, rs)
    for uid in (first.SOPInstanceUID, first.SeriesInstanceUID, sr1.SOPInstanceUID, sr1.SeriesInstanceUID):
        assert UID(uid).is_valid and len(uid) <= 64 and uid.startswith("2.25."), uid
    # the database's rows give the same UIDs (tests and reports recompute them from there)
    rows = [Result(model=x.model, checkpoint_sha256=x.checkpoint_sha256, threshold=x.threshold) for x in rs]
    assert sc_instance_uid(source.SOPInstanceUID, rows[0]) == sc_instance_uid(source.SOPInstanceUID, rs[0])
    assert sr_instance_uid(source.SOPInstanceUID, rows) == sr1.SOPInstanceUID
    assert derive_uid("1.2.3", "sc", "m", "d") == derive_uid("1.2.3", "sc", "m", "d")
    assert derive_uid("1.2.3", "sc", "m", "d") != derive_uid("1.2.3", "sc", "md", "")


def test_uids_differ_with_model_digest_threshold_and_source() -> None:
    source = make_source()
    base = make_result()
    variants = [
        base,
        dataclasses.replace(base, model="DenseNet121"),
        dataclasses.replace(base, checkpoint_sha256="cd" * 32),
        dataclasses.replace(base, threshold=0.3),
    ]
    uids = {build_secondary_capture(source, make_overlay(), r, OUTPUTS).SOPInstanceUID for r in variants}
    other = make_source(index=1)
    uids.add(build_secondary_capture(other, make_overlay(), base, OUTPUTS).SOPInstanceUID)
    assert len(uids) == len(variants) + 1
    rs = three_results()
    changed = [dataclasses.replace(rs[0], checkpoint_sha256="ef" * 32), *rs[1:]]
    assert sr_instance_uid(source.SOPInstanceUID, rs) != sr_instance_uid(source.SOPInstanceUID, changed)


def test_series_shared_per_study_and_kind() -> None:
    source = make_source()
    second = make_source(index=1)
    second.StudyInstanceUID = source.StudyInstanceUID
    second.SOPInstanceUID = generate_uid()
    scs = [
        build_secondary_capture(s, make_overlay(), r, OUTPUTS, n)
        for s in (source, second)
        for n, r in enumerate(three_results(), start=1)
    ]
    assert len({ds.SOPInstanceUID for ds in scs}) == 6
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1
    srs = [build_sr(s, three_results(), True, OUTPUTS) for s in (source, second)]
    assert len({ds.SOPInstanceUID for ds in srs}) == 2
    assert len({ds.SeriesInstanceUID for ds in srs}) == 1
    assert srs[0].SeriesInstanceUID not in (scs[0].SeriesInstanceUID, source.SeriesInstanceUID)
    other_study = make_source(index=2)
    other_study.StudyInstanceUID = generate_uid()
    moved = build_secondary_capture(other_study, make_overlay(), make_result(), OUTPUTS)
    assert moved.SeriesInstanceUID != scs[0].SeriesInstanceUID


# --- SR ----------------------------------------------------------------------------------------------


def test_sr_passes_dciodvfy_and_dsrdump(tmp_path: Path) -> None:
    rs = three_results()
    path = sr_file(tmp_path, make_source(), rs)
    assert_valid(path)
    dump = dsrdump(path)
    for r in rs:
        assert f'"{DS(r.probability, auto_format=True)}"' in dump, (r.model, dump)
        assert r.model in dump
    assert "Comprehensive 3D SR" in dump and "Pneumonia" in dump


def test_sr_findings_read_back_equal_the_inputs(tmp_path: Path) -> None:
    rs = three_results()
    assert consensus_of(rs) is True  # two of three positive
    for consensus in (True, False):  # the consensus is recorded as given
        path = write(build_sr(make_source(), rs, consensus, OUTPUTS), tmp_path / f"sr-{consensus}.dcm")
        findings = read_sr_findings(pydicom.dcmread(path))
        assert findings.consensus is consensus
        assert [f.model for f in findings.models] == [r.model for r in rs]
        for f, r in zip(findings.models, rs, strict=True):
            assert f.probability == pytest.approx(r.probability, abs=1e-12)
            assert (f.threshold, f.positive) == (r.threshold, r.positive)
            assert (f.builder, f.checkpoint_sha256) == (r.builder, r.checkpoint_sha256)
        as_dict = findings.as_dict()
        assert as_dict["consensus"] is consensus
        assert as_dict["DenseNet121"] == {
            "probability": rs[2].probability,
            "threshold": 0.18,
            "positive": True,
        }


def test_sr_probability_survives_without_the_float_copy(tmp_path: Path) -> None:
    # a PACS may drop FloatingPointValue (optional); the DS string alone must still be precise enough
    ds = pydicom.dcmread(sr_file(tmp_path, make_source()))
    removed = 0
    for item in _walk(ds):
        for mv in item.get("MeasuredValueSequence", []):
            if "FloatingPointValue" in mv:
                del mv.FloatingPointValue
                removed += 1
    assert removed >= 6  # probability and threshold of three models (and any image library spacing)
    got = read_sr_findings(ds).by_model()
    for r in three_results():
        assert got[r.model].probability == pytest.approx(r.probability, abs=1e-9)


def _walk(ds: Dataset) -> list[Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_walk(item))
    return items


def test_sr_header_and_content(tmp_path: Path) -> None:
    source = make_source()
    ds = pydicom.dcmread(sr_file(tmp_path, source))
    assert ds.SOPClassUID == SR_3D_CLASS and ds.Modality == "SR"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert_same_patient_and_study(ds, source)
    assert (ds.SeriesNumber, ds.SeriesDescription) == (
        OUTPUTS.sr_series_number,
        OUTPUTS.sr_series_description,
    )
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert (ds.Manufacturer, ds.CompletionFlag, ds.VerificationFlag) == (
        MANUFACTURER,
        "COMPLETE",
        "UNVERIFIED",
    )
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence[0].StudyInstanceUID == source.StudyInstanceUID
    series = evidence[0].ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in series.ReferencedSOPSequence] == [
        (source.SOPClassUID, source.SOPInstanceUID)
    ]
    items = _walk(ds)
    comments = [
        i.TextValue
        for i in items
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]
    assert len(comments) == 1 and DISCLAIMER in comments[0]
    images = [i for i in items if i.ValueType == "IMAGE"]
    assert images and all(
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID for i in images
    )
    codes = {
        (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator)
        for i in items
        if i.ValueType == "CODE"
    }
    assert {("233604007", "SCT"), ("52101004", "SCT"), ("272519000", "SCT"), ("399208008", "SCT")} <= codes
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    observers = report.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    device = observers[0].observer_identifying_attributes
    assert (device.name, device.manufacturer_name) == (MANUFACTURER, MANUFACTURER)
    assert len(report.get_image_measurement_groups()) == 4  # three models and the consensus


def test_sr_image_library_describes_the_radiograph(tmp_path: Path) -> None:
    source = make_source()
    source.PatientOrientation = ["L", "F"]
    source.ImagerPixelSpacing = [0.2, 0.2]
    with_geometry = pydicom.dcmread(sr_file(tmp_path, source))
    names = {i.ConceptNameCodeSequence[0].CodeMeaning for i in _walk(with_geometry)}
    assert {"Patient Orientation Row", "Horizontal Pixel Spacing"} <= names
    del source.ImagerPixelSpacing  # CR images often have none: the SR is still made, without those rows
    (tmp_path / "bare").mkdir()
    path = sr_file(tmp_path / "bare", source)
    assert_valid(path)
    names = {i.ConceptNameCodeSequence[0].CodeMeaning for i in _walk(pydicom.dcmread(path))}
    assert "Horizontal Pixel Spacing" not in names and "Pixel Data Rows" in names


def test_read_sr_findings_refuses_other_objects() -> None:
    with pytest.raises(SRReadError):
        read_sr_findings(make_source())
    with pytest.raises(SRReadError):
        read_sr_findings(helpers.sr_dataset())


def test_build_sr_needs_results() -> None:
    with pytest.raises(ValueError, match="at least one"):
        build_sr(make_source(), [], False, OUTPUTS)


# --- loop protection ---------------------------------------------------------------------------------


def test_is_own_output(tmp_path: Path) -> None:
    source = make_source()
    assert is_own_output(source) is False
    assert is_own_output(helpers.sr_dataset()) is False
    sc = pydicom.dcmread(sc_file(tmp_path, source))
    sr = pydicom.dcmread(sr_file(tmp_path, source))
    assert is_own_output(sc) and is_own_output(sr)
    # a PACS or viewer that rewrites the equipment of a derived object keeps the contributing equipment
    sc.Manufacturer = "OTHER"
    sc.ManufacturerModelName = "OTHER"
    assert is_own_output(sc)


# --- unusual sources ---------------------------------------------------------------------------------


def test_monochrome1_source_through_the_renderer(tmp_path: Path) -> None:
    from gradcam.config import RenderConfig
    from gradcam.preprocess import load_dataset_image
    from gradcam.render import render_overlay

    source = make_source(modality="CR", photometric="MONOCHROME1")
    image = load_dataset_image(source, max_pixels=10_000_000)
    rs = three_results()
    paths = []
    for n, r in enumerate(rs, start=1):
        overlay = render_overlay(
            image,
            dataclasses.replace(r, cam=np.resize(r.cam, image.pixels.shape)),
            RenderConfig(max_side=256),
        )
        ds = build_secondary_capture(source, overlay, r, OUTPUTS, n)
        paths.append(write(ds, tmp_path / f"sc{n}.dcm"))
        back = pydicom.dcmread(paths[-1])
        assert back.PhotometricInterpretation == "RGB"
        np.testing.assert_array_equal(back.pixel_array, overlay)
    paths.append(sr_file(tmp_path, source, rs))
    for path in paths:
        assert_valid(path)
        assert_same_patient_and_study(pydicom.dcmread(path), source)


def test_source_without_optional_attributes(tmp_path: Path) -> None:
    source = make_source()
    for kw in (
        "AccessionNumber",
        "PatientBirthDate",
        "StudyDescription",
        "ReferringPhysicianName",
        "PatientSex",
        "StudyID",
        "StudyTime",
        "PatientOrientation",
        "ImagerPixelSpacing",
    ):
        if kw in source:
            delattr(source, kw)
    sc = pydicom.dcmread(sc_file(tmp_path, source))
    sr = pydicom.dcmread(sr_file(tmp_path, source))
    for ds, path in ((sc, tmp_path / "sc1.dcm"), (sr, tmp_path / "sr.dcm")):
        # the source has no Study Time/ID to copy: only the DICOMDIR hints may be missing
        assert_valid(path, allowed_warnings=("needed to build DICOMDIR",))
        for kw in (
            "AccessionNumber",
            "PatientBirthDate",
            "ReferringPhysicianName",
            "PatientSex",
            "StudyID",
            "StudyTime",
        ):
            assert kw in ds and not ds[kw].value, kw  # type 2: present, empty
        assert "StudyDescription" not in ds
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert read_sr_findings(sr).consensus is True


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_odd_but_real_world_values_are_copied_verbatim(tmp_path: Path) -> None:
    # highdicom itself refuses these; the outputs must still be made and match the source exactly
    source = make_source()
    source.PatientName = "ANONYMOUS"
    source.PatientSex = "X"
    source.PatientBirthDate = "1970"
    source.ReferringPhysicianName = "Dr Who"
    sc = pydicom.dcmread(sc_file(tmp_path, source))
    sr = pydicom.dcmread(sr_file(tmp_path, source))
    for ds in (sc, sr):
        assert (str(ds.PatientName), ds.PatientSex, ds.PatientBirthDate) == ("ANONYMOUS", "X", "1970")
        assert str(ds.ReferringPhysicianName) == "Dr Who"
    assert read_sr_findings(sr).models[0].model == "ResNet18"


def test_character_set_follows_the_source(tmp_path: Path) -> None:
    source = make_source()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "MÜLLER^JÖRG"
    sc = pydicom.dcmread(sc_file(tmp_path, source))
    sr = pydicom.dcmread(sr_file(tmp_path, source))
    for ds in (sc, sr):
        assert ds.SpecificCharacterSet == "ISO_IR 100" and str(ds.PatientName) == "MÜLLER^JÖRG"
    assert_valid(tmp_path / "sc1.dcm")
    assert_valid(tmp_path / "sr.dcm")


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_sr_equals_the_plain_highdicom_document(modality: str) -> None:
    """build_sr gives highdicom an evidence stand-in instead of the whole content tree (it is several times
    faster); the document must be the one highdicom makes from the real content, element for element."""
    from node.outputs.common import copy_patient_study, reference_header
    from node.outputs.sr import sr_content, sr_document_arguments

    source = make_source(modality)
    if modality == "CR":
        del source.ImagerPixelSpacing  # CR without projection geometry: the image library's other branch
    rs = three_results()
    fast = build_sr(source, rs, consensus_of(rs), OUTPUTS)
    ref = reference_header(source)
    plain = hd.sr.Comprehensive3DSR(
        evidence=[ref],
        content=sr_content(ref, rs, consensus_of(rs)),
        **sr_document_arguments(source, rs, OUTPUTS),
    )
    copy_patient_study(source, plain)
    # the creation times differ by the microseconds between the two calls; nothing else may
    timed = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")
    for ds in (fast, plain):
        for keyword in timed:
            ds.pop(keyword, None)
        for item in ds.ContributingEquipmentSequence:
            item.pop("ContributionDateTime", None)
    assert "CurrentRequestedProcedureEvidenceSequence" in fast
    assert _encoded(fast) == _encoded(plain)
    assert fast.content[0].ContentSequence == plain.content[0].ContentSequence  # the in-memory tree too


def _encoded(ds: Dataset) -> bytes:
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
