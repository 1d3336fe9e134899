"""node.receive.triage: only frontal chest CR/DX are analysed; everything else is skipped with a reason."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.receive.triage import triage
from tests import helpers


def _img(**kw) -> Dataset:
    return helpers.image_dataset(size=64, **kw)  # [preprocess] min_side is 64 by default


@pytest.mark.parametrize(
    "kw",
    [
        {"modality": "DX", "view": "PA", "body_part": "CHEST"},
        {"modality": "CR", "view": "AP", "body_part": "CHEST"},
        {"modality": "DX", "view": None, "body_part": None},
        {"modality": "DX", "view": "", "body_part": ""},
        {"modality": "CR", "view": "pa", "body_part": "chest"},
        {"modality": "DX", "view": "AP", "body_part": "THORAX"},
        {"modality": "DX", "view": "PA", "body_part": "Chest ", "photometric": "MONOCHROME1"},
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case on purpose: devices send it
def test_frontal_chest_radiographs_are_analysed(kw: dict) -> None:
    assert triage(_img(**kw)) == (True, None)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"modality": "CT"}, "modality CT is not CR/DX"),
        ({"view": "LL"}, "view LL is not frontal (PA/AP)"),
        ({"view": "RLO"}, "view RLO is not frontal (PA/AP)"),
        ({"body_part": "HAND"}, "body part HAND is not CHEST"),
        ({"manufacturer": "gradcam-node"}, "own output (loop protection)"),
        ({"manufacturer": "GradCAM-Node"}, "own output (loop protection)"),
        ({"photometric": "RGB"}, "colour image (RGB) is not a radiograph"),
        (
            {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1.1"},
            "Digital X-Ray Image Storage - For Processing (raw detector data) is not analysed",
        ),
    ],
)
def test_other_images_are_skipped_with_reason(kw: dict, reason: str) -> None:
    assert triage(_img(**kw)) == (False, reason)


def test_structured_report_has_no_pixel_data() -> None:
    ok, reason = triage(helpers.sr_dataset())
    assert not ok
    assert reason == "SOP class Basic Text SR Storage has no pixel data"


def test_missing_modality() -> None:
    ds = _img()
    del ds.Modality
    assert triage(ds) == (False, "modality (none) is not CR/DX")


def test_multiframe_is_skipped() -> None:
    ds = _img()
    ds.NumberOfFrames = 3
    assert triage(ds) == (False, "multi-frame image (3 frames) is not analysed")


def test_own_output_wins_over_everything() -> None:
    # Even a perfect frontal chest DX is never analysed when the node made it.
    ds = _img(manufacturer="gradcam-node")
    assert triage(ds) == (False, "own output (loop protection)")


def test_own_outputs_recognised_by_outputs_module() -> None:
    outputs = pytest.importorskip("node.outputs", reason="node.outputs (helper O) not written yet")
    ds = _img()
    assert triage(ds)[0] is True
    assert outputs.is_own_output(ds) is False


def test_header_only_no_pixel_decoding() -> None:
    # Pixel data that cannot be decoded does not matter to triage: it reads the header only.
    ds = _img()
    ds.PixelData = b"\x00"  # far too short for 64x64x16 bits
    assert triage(ds) == (True, None)


def test_size_comes_from_the_header_and_min_side_is_honoured() -> None:
    small = helpers.image_dataset(size=32)
    too_small = (
        "image of 32 x 32 pixels is too small to be a radiograph (at least 64 a side: [preprocess] min_side)"
    )
    assert triage(small) == (False, too_small)
    assert triage(small, min_side=32) == (True, None)
    assert triage(_img(), min_side=65)[1] == too_small.replace("32 x 32", "64 x 64").replace("64 a", "65 a")
    # Rows and Columns decide, not the pixel data (never decoded at store time): a header saying
    # 2000 x 1500 is large enough whatever its pixel data, one saying 40 rows is not.
    ds = _img()
    ds.Rows, ds.Columns = 2000, 1500
    ds.PixelData = b""
    assert triage(ds) == (True, None)
    ds.Rows = 40
    assert triage(ds) == (False, too_small.replace("32 x 32", "1500 x 40"))
