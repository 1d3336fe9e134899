"""The heatmap outputs (``node.outputs.heatmap``): one FRACTIONAL Segmentation per model with a map, at the
source's geometry, read back with highdicom and checked with dciodvfy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from node.config import OutputsConfig
from node.outputs import build_heatmap
from tests.node.test_outputs import (
    ALL_NEGATIVE,
    IDENTITY_SOURCES,
    SEG_CLASS,
    SIZE,
    assert_identical,
    assert_same_patient_and_study,
    assert_valid,
    blob,
    build_all,
    by_kind,
    make_analysis,
    make_context,
    make_result,
    make_source,
    placed,
    reference_heatmap,
    write,
)

IHE_PROCESSING_ALGORITHM = ("1630", "99IHE", "Processing Algorithm")


def heatmap_file(tmp_path: Path, model: str = "ResNet18", negative_maps: bool = False) -> Path:
    ctx = make_context(outputs=OutputsConfig(negative_maps=negative_maps))
    built = by_kind(build_all(make_source(), make_analysis(), ctx))
    return write(built["heatmap", model], tmp_path / f"heatmap-{model}.dcm")


def test_heatmap_passes_dciodvfy(tmp_path: Path) -> None:
    assert_valid(heatmap_file(tmp_path))


def test_heatmap_is_a_fractional_segmentation_of_the_source(tmp_path: Path) -> None:
    source = make_source()
    seg = hd.seg.segread(heatmap_file(tmp_path))
    assert seg.SOPClassUID == SEG_CLASS and seg.Modality == "SEG"
    assert (seg.SegmentationType, seg.MaximumFractionalValue) == ("FRACTIONAL", 255)
    assert (seg.Rows, seg.Columns, seg.NumberOfFrames) == (source.Rows, source.Columns, 1)
    assert_same_patient_and_study(seg, source)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.SeriesNumber == OutputsConfig().heatmap_series_number
    assert seg.SeriesDescription == OutputsConfig().heatmap_series_description


@pytest.mark.parametrize("columns", [SIZE, 100], ids=["square", "narrow"])
def test_heatmap_values_are_the_cam(tmp_path: Path, columns: int) -> None:
    source, analysis = make_source(columns=columns), make_analysis(columns=columns)
    cam = analysis.models["ResNet18"].cam
    path = write(by_kind(build_all(source, analysis))["heatmap", "ResNet18"], tmp_path / "heatmap.dcm")
    assert_valid(path)
    seg = hd.seg.Segmentation.from_dataset(hd.seg.segread(path))
    assert (seg.Rows, seg.Columns) == (SIZE, columns)
    pixels = seg.get_pixels_by_source_instance(
        [source.SOPInstanceUID], segment_numbers=[1], rescale_fractional=True
    )
    back = np.asarray(pixels, np.float64)[0, :, :, 0]
    assert back.shape == cam.shape
    assert np.corrcoef(back.ravel(), cam.ravel())[0, 1] >= 0.99
    assert np.abs(back - cam).max() <= 1 / 255 + 1e-6


def test_heatmap_segment_names_the_model_and_its_checkpoint(tmp_path: Path) -> None:
    seg = hd.seg.segread(heatmap_file(tmp_path, "DenseNet121"))
    (segment,) = seg.SegmentSequence
    assert "DenseNet121" in segment.SegmentLabel and "pneumonia" in segment.SegmentLabel
    assert len(segment.SegmentLabel) <= 64
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        "DenseNet121",
        make_context().model("DenseNet121").version,
    )
    assert algorithm.AlgorithmVersion == "sha256:" + "c3" * 6
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "233604007"  # Pneumonia


def test_heatmap_names_its_algorithm_as_contributing_equipment(tmp_path: Path) -> None:
    seg = hd.seg.segread(heatmap_file(tmp_path))
    algorithms = [
        e
        for e in seg.ContributingEquipmentSequence
        if tuple(
            getattr(e.PurposeOfReferenceCodeSequence[0], k)
            for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
        )
        == IHE_PROCESSING_ALGORITHM
    ]
    assert [(e.ManufacturerModelName, e.SoftwareVersions) for e in algorithms] == [
        ("ResNet18", "sha256:" + "a1" * 6)
    ]


def test_no_heatmap_for_a_negative_model_by_default() -> None:
    built = by_kind(build_all(make_source(), make_analysis()))
    assert ("heatmap", "EfficientNet-B0") not in built
    assert {m for k, m in built if k == "heatmap"} == {"ResNet18", "DenseNet121"}
    assert not [
        k for k in by_kind(build_all(make_source(), make_analysis(ALL_NEGATIVE))) if k[0] == "heatmap"
    ]


def test_negative_map_is_labelled_normal(tmp_path: Path) -> None:
    path = heatmap_file(tmp_path, "EfficientNet-B0", negative_maps=True)
    assert_valid(path)
    (segment,) = hd.seg.segread(path).SegmentSequence
    assert "EfficientNet-B0" in segment.SegmentLabel and "NORMAL" in segment.SegmentLabel
    assert "pneumonia" not in segment.SegmentLabel.lower()
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "17621005"  # Normal


def test_heatmap_refuses_a_map_of_another_size_or_not_finite() -> None:
    source, ctx = make_source(), make_context()
    where = placed(source, ctx, "heatmap", "ResNet18")
    small = dataclasses.replace(make_result(), cam=blob((10, 10), shape=(64, 64)))
    with pytest.raises(ValueError, match="shape"):
        build_heatmap(source, small, ctx, where)
    broken = make_result().cam.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        build_heatmap(source, dataclasses.replace(make_result(), cam=broken), ctx, where)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("kind", sorted(IDENTITY_SOURCES))
@pytest.mark.parametrize("model", ["ResNet18", "EfficientNet-B0"], ids=["positive", "negative"])
def test_heatmap_equals_the_highdicom_segmentation(kind: str, model: str) -> None:
    """The heatmap is the Segmentation highdicom made (see ``assert_identical``), for ordinary and odd
    sources, a positive and a negative map, an odd number of pixels, and an empty map."""
    source, ctx = IDENTITY_SOURCES[kind](), make_context()
    result = make_analysis().models[model]
    where = placed(source, ctx, "heatmap", model, 4)
    assert_identical(build_heatmap(source, result, ctx, where), reference_heatmap(source, result, ctx, where))
    odd = make_source(columns=101)  # 128 x 101 pixels: an odd number of bytes
    narrow = make_result(model, columns=101)
    assert_identical(build_heatmap(odd, narrow, ctx, where), reference_heatmap(odd, narrow, ctx, where))
    empty = dataclasses.replace(result, cam=np.zeros((SIZE, SIZE), np.float32))
    assert_identical(build_heatmap(source, empty, ctx, where), reference_heatmap(source, empty, ctx, where))


def test_heatmap_refuses_a_source_with_a_patient_coordinate_system() -> None:
    """A map is laid out on the source's pixels; highdicom would need planes for such a source (CR and DX
    have none)."""
    source, ctx = make_source(), make_context()
    source.FrameOfReferenceUID = "2.25.777"
    source.ImagePositionPatient = [0, 0, 0]
    with pytest.raises(ValueError, match="coordinate system"):
        build_heatmap(source, make_result(), ctx, placed(source, ctx, "heatmap", "ResNet18"))
