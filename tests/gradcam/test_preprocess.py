"""Preprocessing: DICOM display pipeline, transfer syntaxes, PNG/JPEG, refusals and the model input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from gradcam.config import ModelConfig, Window
from gradcam.errors import (
    CorruptPixelDataError,
    ImageTooLargeError,
    InputError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)
from gradcam.preprocess import IMAGENET_MEAN, IMAGENET_STD, SourceImage, load_image, to_model_input
from tests import helpers

LIMIT = 10_000_000
SIZE = 64


def pattern(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A smooth radiograph-like pattern in [0, 1] (two dark lungs, a bright blob, mild noise)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    lungs = np.exp(-((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.04) + np.exp(
        -((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.04
    )
    blob = np.exp(-((xx - 0.65) ** 2 + (yy - 0.6) ** 2) / 0.005)
    img = 0.85 - 0.6 * lungs + 0.3 * blob + 0.05 * yy
    img += np.random.default_rng(seed).normal(0, 0.01, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return img


def make_ds(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **attrs: object
) -> Dataset:
    """A DX image dataset holding ``pixels`` (H,W grey; F,H,W frames; H,W,3 colour), uncompressed."""
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # native until compress() or save()
    ds.SOPClassUID = helpers.DX_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "PHANTOM^TEST"
    ds.PatientID = "PHANTOM-0001"
    ds.Modality = "DX"
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    if pixels.ndim == 3 and not colour:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path, syntax: UID = ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def load_ds(ds: Dataset, path: Path, **kw: int) -> np.ndarray:
    return load_image(save(ds, path), LIMIT, **kw).pixels


def quantise(p: np.ndarray, bits: int, dtype: type = np.uint16, offset: int = 0) -> np.ndarray:
    return (np.round(p * (2**bits - 1)) + offset).astype(dtype)


# --- the display pipeline ------------------------------------------------------------------------


def test_modality_lut_then_header_window(tmp_path: Path) -> None:
    stored = np.tile(np.array([0, 100, 200, 300], np.uint16), (4, 1))
    ds = make_ds(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=401)
    image = load_image(save(ds, tmp_path / "w.dcm"), LIMIT, min_side=1)
    np.testing.assert_allclose(image.modality_values[0], [-100, 100, 300, 500])
    # PS3.3 C.11.2.1.2.1 LINEAR: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] -> [0, 1]; here [-0.5, 399.5].
    np.testing.assert_allclose(image.pixels[0], [0.0, 100.5 / 400, 300.5 / 400, 1.0], atol=1e-6)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (4, 4)


def test_first_of_several_windows_and_sigmoid(tmp_path: Path) -> None:
    stored = np.tile(np.array([0, 100, 200, 300], np.uint16), (4, 1))
    several = make_ds(stored, WindowCenter=[150, 20], WindowWidth=[201, 10])
    np.testing.assert_allclose(
        load_ds(several, tmp_path / "a.dcm", min_side=1)[0], [0, 50.5 / 200, 150.5 / 200, 1], atol=1e-6
    )
    sigmoid = make_ds(stored, WindowCenter=150, WindowWidth=200, VOILUTFunction="SIGMOID")
    expected = 1 / (1 + np.exp(-4 * (np.array([0, 100, 200, 300]) - 150) / 200))
    np.testing.assert_allclose(load_ds(sigmoid, tmp_path / "b.dcm", min_side=1)[0], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("entries", "first", "lut_bits", "vr"), [(256, 0, 16, "US"), (4096, 0, 8, "US"), (3000, 500, 12, "OW")]
)
def test_voi_lut_sequence_wins_over_window(
    entries: int, first: int, lut_bits: int, vr: str, tmp_path: Path
) -> None:
    stored = np.linspace(0, 4095, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    top = 2**lut_bits - 1
    lut = np.round((np.arange(entries) / (entries - 1)) ** 2 * top).astype(np.uint16)  # a non-linear curve
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, lut_bits])  # LUT Descriptor: entries, first mapped, bits
    item.add_new(0x00283006, vr, lut.tobytes() if vr == "OW" else lut.tolist())  # LUT Data
    ds = make_ds(stored, bits_stored=12, WindowCenter=128, WindowWidth=20)
    ds.VOILUTSequence = [item]
    # PS3.3 C.11.2.1.1: values below the first mapped get the first entry, above the range the last one.
    expected = lut[np.clip(stored.astype(int) - first, 0, entries - 1)] / top
    np.testing.assert_allclose(load_ds(ds, tmp_path / "lut.dcm"), expected, atol=1e-6)


def test_automatic_window_without_header_window(tmp_path: Path) -> None:
    stored = quantise(pattern(), 10, offset=1000)
    stored[0, :3] = 65535  # outliers (burnt-in marker) must not squash the anatomy
    stored[-1, :3] = 0
    for attrs in ({}, {"WindowCenter": 500, "WindowWidth": 0}):
        px = load_ds(make_ds(stored, **attrs), tmp_path / "auto.dcm")
        assert px.min() == 0.0 and px.max() == 1.0
        assert np.percentile(px, 0.5) < 0.01 and np.percentile(px, 99.5) > 0.99
        assert px[0, :3].tolist() == [1.0] * 3 and px[-1, :3].tolist() == [0.0] * 3
        assert px.std() > 0.15  # a min-max scaling would put the anatomy into a band ~0.016 wide


def test_monochrome1_is_displayed_like_monochrome2_of_inverted_data(tmp_path: Path) -> None:
    v = quantise(pattern(), 12)
    mono1 = load_image(save(make_ds(v, "MONOCHROME1", 12), tmp_path / "m1.dcm"), LIMIT)
    mono2 = load_image(save(make_ds(4095 - v, "MONOCHROME2", 12), tmp_path / "m2.dcm"), LIMIT)
    assert mono1.inverted and not mono2.inverted
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=1e-5)
    # With header windows (c mirrored); LINEAR's half-pixel offset leaves a 1/(w-1) difference.
    w1 = load_ds(make_ds(v, "MONOCHROME1", 12, WindowCenter=1500, WindowWidth=2001), tmp_path / "w1.dcm")
    w2 = load_ds(
        make_ds(4095 - v, "MONOCHROME2", 12, WindowCenter=2595, WindowWidth=2001), tmp_path / "w2.dcm"
    )
    np.testing.assert_allclose(w1, w2, atol=1e-3)
    assert 0.0 < w1.mean() < 1.0


@pytest.mark.parametrize(("bits", "dtype"), [(8, np.uint8), (12, np.uint16), (16, np.uint16)])
def test_bit_depths_give_the_same_display(bits: int, dtype: type, tmp_path: Path) -> None:
    p = pattern()
    reference = load_ds(make_ds(quantise(p, 16), bits_stored=16), tmp_path / "ref.dcm")
    px = load_ds(make_ds(quantise(p, bits, dtype), bits_stored=bits), tmp_path / f"b{bits}.dcm")
    np.testing.assert_allclose(px, reference, atol=0.01)


@pytest.mark.parametrize("bits", [12, 16])
def test_signed_pixels_match_unsigned(bits: int, tmp_path: Path) -> None:
    p = pattern()
    unsigned = load_image(save(make_ds(quantise(p, 11), bits_stored=bits), tmp_path / "u.dcm"), LIMIT)
    signed_values = quantise(p, 11, np.int16, offset=-1024)
    assert signed_values.min() < 0
    signed = load_image(save(make_ds(signed_values, bits_stored=bits), tmp_path / "s.dcm"), LIMIT)
    assert signed.modality_values.min() == -1024
    np.testing.assert_allclose(signed.pixels, unsigned.pixels, atol=1e-5)
    # A window given in modality units after a rescale, on signed data.
    ds = make_ds(
        signed_values,
        bits_stored=bits,
        RescaleSlope=1,
        RescaleIntercept=1024,
        WindowCenter=1024,
        WindowWidth=2049,
    )
    windowed = load_ds(ds, tmp_path / "sw.dcm")
    np.testing.assert_allclose(windowed, (unsigned.modality_values + 0.5) / 2048, atol=1e-5)


def test_rgb_and_ybr_full_are_accepted(tmp_path: Path) -> None:
    grey = quantise(pattern(), 8, np.uint8)
    reference = load_ds(make_ds(grey, bits_stored=8), tmp_path / "g.dcm")
    rgb = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_allclose(load_ds(make_ds(rgb, "RGB"), tmp_path / "rgb.dcm"), reference, atol=1e-5)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    np.testing.assert_allclose(load_ds(make_ds(ybr, "YBR_FULL"), tmp_path / "ybr.dcm"), reference, atol=0.02)
    # Channel order: a pure red image is darker than a pure green one (Rec. 601 weights).
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:4, :, 0] = 255  # top half red, bottom half green
    colour[4:, :, 1] = 255
    px = load_ds(make_ds(colour, "RGB"), tmp_path / "rg.dcm", min_side=1)
    assert px[0, 0] < px[-1, -1]


def test_multi_frame_uses_the_first_frame(tmp_path: Path) -> None:
    p = pattern()
    frames = np.stack([quantise(p, 12), quantise(1 - p, 12), quantise(p**2, 12)])
    first = load_ds(make_ds(frames[0], bits_stored=12), tmp_path / "one.dcm")
    native = make_ds(frames, bits_stored=12)
    np.testing.assert_array_equal(load_ds(native, tmp_path / "multi.dcm"), first)
    native.compress(RLELossless)
    np.testing.assert_array_equal(
        load_image(save(native, tmp_path / "rle.dcm", RLELossless), LIMIT).pixels, first
    )


# --- transfer syntaxes ---------------------------------------------------------------------------


def _pydicom(syntax: UID, **kwargs: object) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        ds = pydicom.dcmread(src)
        if syntax.is_compressed:
            ds.compress(syntax, **kwargs)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(dst, enforce_file_format=True)

    return encode


def _dcmtk(tool: str, *options: str) -> Callable[[Path, Path], None]:
    def encode(src: Path, dst: Path) -> None:
        result = helpers.run_tool([helpers.dcmtk(tool), *options, src, dst])
        assert result.returncode == 0, result.stdout

    return encode


# name: (encoder, bits, expected transfer syntax UID, lossless)
SYNTAXES: dict[str, tuple[Callable[[Path, Path], None], int, str, bool]] = {
    "explicit LE": (_pydicom(ExplicitVRLittleEndian), 12, "1.2.840.10008.1.2.1", True),
    "implicit LE": (_pydicom(ImplicitVRLittleEndian), 12, "1.2.840.10008.1.2", True),
    "deflate": (_pydicom(DeflatedExplicitVRLittleEndian), 12, "1.2.840.10008.1.2.1.99", True),
    "RLE (pydicom)": (_pydicom(RLELossless), 12, "1.2.840.10008.1.2.5", True),
    "RLE (dcmcrle)": (_dcmtk("dcmcrle"), 12, "1.2.840.10008.1.2.5", True),
    "JPEG lossless SV1 (dcmcjpeg default)": (_dcmtk("dcmcjpeg"), 12, "1.2.840.10008.1.2.4.70", True),
    "JPEG lossless (dcmcjpeg +el)": (_dcmtk("dcmcjpeg", "+el"), 16, "1.2.840.10008.1.2.4.57", True),
    "JPEG baseline (dcmcjpeg +eb)": (_dcmtk("dcmcjpeg", "+eb"), 8, "1.2.840.10008.1.2.4.50", False),
    "JPEG extended (dcmcjpeg +ee)": (_dcmtk("dcmcjpeg", "+ee"), 12, "1.2.840.10008.1.2.4.51", False),
    "JPEG-LS lossless (dcmcjpls)": (_dcmtk("dcmcjpls"), 12, "1.2.840.10008.1.2.4.80", True),
    "JPEG-LS near-lossless (dcmcjpls +en)": (_dcmtk("dcmcjpls", "+en"), 12, "1.2.840.10008.1.2.4.81", False),
    "JPEG 2000 lossless (pydicom)": (_pydicom(JPEG2000Lossless), 12, "1.2.840.10008.1.2.4.90", True),
    "JPEG 2000 lossy (pydicom)": (_pydicom(JPEG2000, j2k_cr=[4]), 12, "1.2.840.10008.1.2.4.91", False),
}


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_transfer_syntax_decodes_close_to_original(name: str, tmp_path: Path) -> None:
    encode, bits, uid, lossless = SYNTAXES[name]
    dtype = np.uint8 if bits == 8 else np.uint16
    src = save(make_ds(quantise(pattern(), bits, dtype), bits_stored=bits), tmp_path / "src.dcm")
    dst = tmp_path / "dst.dcm"
    encode(src, dst)
    assert pydicom.dcmread(dst, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    original, decoded = load_image(src, LIMIT).pixels, load_image(dst, LIMIT).pixels
    assert decoded.shape == original.shape
    if lossless:
        np.testing.assert_array_equal(decoded, original)
    else:
        error = np.abs(decoded - original)
        assert error.mean() < 0.01 and error.max() < 0.1, (error.mean(), error.max())


# --- PNG and JPEG --------------------------------------------------------------------------------


def _raster(kind: str) -> tuple[np.ndarray, np.ndarray, str, float]:
    """(array for cv2.imwrite (BGR order), expected grey in [0, 1], suffix, tolerance)."""
    p = pattern()
    g8, g16 = quantise(p, 8, np.uint8), quantise(p, 16)
    bgr8, bgr16 = np.repeat(g8[..., None], 3, 2), np.repeat(g16[..., None], 3, 2)
    alpha = np.full(g8.shape + (1,), 128, np.uint8)
    return {
        "png grey 8": (g8, g8 / 255.0, ".png", 1e-6),
        "png grey 16": (g16, g16 / 65535.0, ".png", 1e-6),
        "png rgb 8": (bgr8, g8 / 255.0, ".png", 1e-5),
        "png rgb 16": (bgr16, g16 / 65535.0, ".png", 1e-5),
        "png rgba 8": (np.concatenate([bgr8, alpha], axis=2), g8 / 255.0, ".png", 1e-5),
        "jpeg grey": (g8, g8 / 255.0, ".jpg", 0.03),
        "jpeg rgb": (bgr8, g8 / 255.0, ".jpg", 0.03),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["png grey 8", "png grey 16", "png rgb 8", "png rgb 16", "png rgba 8", "jpeg grey", "jpeg rgb"]
)
def test_png_and_jpeg(kind: str, tmp_path: Path) -> None:
    array, expected, suffix, tolerance = _raster(kind)
    path = tmp_path / f"img{suffix}"
    assert cv2.imwrite(str(path), array)
    image = load_image(path, LIMIT)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == expected.shape
    assert image.modality_values is None and image.source == str(path)
    error = np.abs(image.pixels - expected)
    assert error.mean() < tolerance and error.max() < max(tolerance * 8, 1e-5)


def test_png_colour_channel_order(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4, :, 0] = 255  # top half pure red, bottom half pure green (one colour alone would be blank)
    rgb[4:, :, 1] = 255
    cv2.imwrite(str(tmp_path / "rg.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    px = load_image(tmp_path / "rg.png", LIMIT, min_side=1).pixels
    np.testing.assert_allclose(px[:4], 0.299, atol=1e-3)
    np.testing.assert_allclose(px[4:], 0.587, atol=1e-3)


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "notes", "notes.png", "notes.jpg", "notes.dcm"])
def test_text_file_is_not_an_image(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text("Findings: none. This is a text file, not an image.\n" * 20)
    with pytest.raises(NotAnImageError) as info:
        load_image(path, LIMIT)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotAnImageError, match="no such file"):
        load_image(tmp_path / "absent.dcm", LIMIT)


def test_no_pixel_data(tmp_path: Path) -> None:
    sr = helpers.write_dataset(helpers.sr_dataset(), tmp_path / "sr.dcm")
    with pytest.raises(NoPixelDataError, match="no pixel data") as info:
        load_image(sr, LIMIT)
    assert str(sr) in str(info.value) and helpers.SR_SOP_CLASS in str(info.value)
    ds = make_ds(quantise(pattern(), 12))
    del ds.PixelData
    with pytest.raises(NoPixelDataError):
        load_image(save(ds, tmp_path / "nopix.dcm"), LIMIT)


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    ds = make_ds(quantise(pattern(), 8, np.uint8))
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(200)])  # an MPEG-2 sequence header start
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "video.dcm", MPEG2MPML)
    with pytest.raises(UnsupportedTransferSyntaxError) as info:
        load_image(path, LIMIT)
    assert str(path) in str(info.value) and MPEG2MPML in str(info.value) and "MPEG2" in str(info.value)


def test_too_large_is_refused_before_decoding(tmp_path: Path) -> None:
    ds = make_ds(quantise(pattern(), 12))
    ds.Rows = ds.Columns = 50_000
    ds.PixelData = bytes(16)  # decoding would fail with a corrupt-data error instead
    path = save(ds, tmp_path / "huge.dcm")
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, 60_000_000)
    assert str(path) in str(info.value) and "max_pixels" in str(info.value)
    # Encapsulated data too: the limit comes before any decoder.
    ds = make_ds(quantise(pattern(), 12))
    ds.compress(RLELossless)
    ds.Rows = ds.Columns = 50_000
    with pytest.raises(ImageTooLargeError):
        load_image(save(ds, tmp_path / "huge-rle.dcm", RLELossless), 60_000_000)
    png = tmp_path / "big.png"
    cv2.imwrite(str(png), quantise(pattern(), 8, np.uint8))
    with pytest.raises(ImageTooLargeError, match="4096 pixels exceeds the limit of 4000"):
        load_image(png, 4000)


def _truncated_native(tmp_path: Path) -> Path:
    ds = make_ds(quantise(pattern(), 12))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return save(ds, tmp_path / "half.dcm")


def _cut_file(tmp_path: Path) -> Path:
    raw = save(make_ds(quantise(pattern(), 12)), tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) - 1000])
    return tmp_path / "cut.dcm"


def _damaged_codestream(syntax: UID) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        ds = make_ds(quantise(pattern(), 12))
        ds.compress(syntax)
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 3]])
        return save(ds, tmp_path / "damaged.dcm", syntax)

    return make


def _garbage_jpeg_ls(tmp_path: Path) -> Path:
    ds = make_ds(quantise(pattern(), 12))
    ds.PixelData = encapsulate([b"\xff\xd8" + np.random.default_rng(0).bytes(300)])
    ds["PixelData"].VR = "OB"
    return save(ds, tmp_path / "garbage.dcm", JPEGLSLossless)


def _truncated_png(tmp_path: Path) -> Path:
    cv2.imwrite(str(tmp_path / "whole.png"), np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    raw = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "cut.png"


@pytest.mark.parametrize(
    "make",
    [
        _truncated_native,
        _cut_file,
        _damaged_codestream(JPEG2000Lossless),
        _damaged_codestream(RLELossless),
        _garbage_jpeg_ls,
        _truncated_png,
    ],
    ids=["truncated native", "cut file", "damaged J2K", "damaged RLE", "garbage JPEG-LS", "truncated PNG"],
)
def test_corrupt_pixel_data(make: Callable[[Path], Path], tmp_path: Path) -> None:
    path = make(tmp_path)
    with pytest.raises(CorruptPixelDataError) as info:
        load_image(path, LIMIT)
    assert str(path) in str(info.value) and "cannot be decoded" in str(info.value)
    assert isinstance(info.value, InputError)


# --- what the models may not see: pixel rules, size and blank images (gradcam.eligibility) ---------------

BLANK = "blank image: every pixel has the same value after the display pipeline; nothing to analyse"
SPECKS = "blank image: 99% of the pixels have one value after the display pipeline; nothing to analyse"


def _refused(path: Path, reason: str, **kw: int) -> None:
    """Loading ``path`` raises UnsupportedImageError (an InputError) saying ``path: reason``."""
    with pytest.raises(UnsupportedImageError) as info:
        load_image(path, LIMIT, **kw)
    assert isinstance(info.value, InputError)
    assert str(info.value) == f"{path}: {reason}"


def _png(array: np.ndarray, path: Path) -> Path:
    assert cv2.imwrite(str(path), array)
    return path


def test_rescale_slope_zero_is_a_blank_image(tmp_path: Path) -> None:
    # Every stored value maps to the intercept: nothing to see, whatever the window; the reason names the
    # likely cause.
    reason = BLANK.replace("pipeline;", "pipeline (Rescale Slope 0?);")
    stored = quantise(pattern(), 12)
    for name, window in (("plain", {}), ("windowed", {"WindowCenter": 2048, "WindowWidth": 4096})):
        ds = make_ds(stored, bits_stored=12, RescaleSlope=0, RescaleIntercept=100, **window)
        _refused(save(ds, tmp_path / f"{name}.dcm"), reason)


CONSTANT_DICOM: dict[str, Callable[[], Dataset]] = {
    "zeros": lambda: make_ds(np.zeros((SIZE, SIZE), np.uint16), bits_stored=12),
    "grey with header window": lambda: make_ds(
        np.full((SIZE, SIZE), 1000, np.uint16), bits_stored=12, WindowCenter=1000, WindowWidth=500
    ),
    "MONOCHROME1 8 bit": lambda: make_ds(np.full((SIZE, SIZE), 200, np.uint8), "MONOCHROME1"),
}


@pytest.mark.parametrize("name", list(CONSTANT_DICOM))
def test_constant_dicom_is_a_blank_image(name: str, tmp_path: Path) -> None:
    _refused(save(CONSTANT_DICOM[name](), tmp_path / "constant.dcm"), BLANK)


def _pure_red() -> np.ndarray:
    bgr = np.zeros((SIZE, SIZE, 3), np.uint8)
    bgr[..., 2] = 255
    return bgr


CONSTANT_RASTER: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    "png black 8 bit": (lambda: np.zeros((SIZE, SIZE), np.uint8), ".png"),
    "png grey 16 bit": (lambda: np.full((SIZE, SIZE), 40000, np.uint16), ".png"),
    "png pure red": (_pure_red, ".png"),
    "jpeg grey": (lambda: np.full((SIZE, SIZE), 128, np.uint8), ".jpg"),
}


@pytest.mark.parametrize("name", list(CONSTANT_RASTER))
def test_constant_png_or_jpeg_is_a_blank_image(name: str, tmp_path: Path) -> None:
    make, suffix = CONSTANT_RASTER[name]
    _refused(_png(make(), tmp_path / f"constant{suffix}"), BLANK)


def _specks(value: int, speck: int, dtype: type) -> np.ndarray:
    """A flat field with 8 bright specks (0.2 % of the pixels): a few burnt-in dots, nothing else."""
    img = np.full((SIZE, SIZE), value, dtype)
    img[np.arange(8) * 7 + 3, np.arange(8) * 5 + 10] = speck
    return img


def test_specks_on_an_empty_dicom_are_a_blank_image(tmp_path: Path) -> None:
    # The automatic window stretches the specks to white: the range is full, yet nothing is there.
    _refused(save(make_ds(_specks(0, 4095, np.uint16), bits_stored=12), tmp_path / "specks.dcm"), SPECKS)


def test_specks_on_an_empty_png_are_a_blank_image(tmp_path: Path) -> None:
    _refused(_png(_specks(30, 255, np.uint8), tmp_path / "specks.png"), SPECKS)


def test_low_contrast_dicom_is_analysed_with_the_automatic_window(tmp_path: Path) -> None:
    # 13 stored values in a full-range header window: less than one display grey level between darkest
    # and brightest. Not blank: the automatic window shows what is there.
    stored = (2000 + np.round(pattern() * 12)).astype(np.uint16)
    windowed = make_ds(stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    px = load_ds(windowed, tmp_path / "low.dcm")
    np.testing.assert_array_equal(px, load_ds(make_ds(stored, bits_stored=12), tmp_path / "auto.dcm"))
    assert px.min() == 0.0 and px.max() == 1.0


def test_low_contrast_png_is_analysed(tmp_path: Path) -> None:
    # Three grey levels only, but not one: analysed as it is (PNG/JPEG have no window).
    grey = (100 + np.round(pattern() * 2)).astype(np.uint8)
    assert set(np.unique(grey).tolist()) == {100, 101, 102}
    px = load_image(_png(grey, tmp_path / "low.png"), LIMIT).pixels
    np.testing.assert_allclose(px, grey / 255.0, atol=1e-6)


def test_header_window_showing_nothing_falls_back_to_the_automatic_window(tmp_path: Path) -> None:
    stored = quantise(pattern(), 12)
    automatic = load_ds(make_ds(stored, bits_stored=12), tmp_path / "auto.dcm")
    for name, window in (
        ("far above", {"WindowCenter": 30000, "WindowWidth": 100}),  # every pixel below the window: black
        ("far below", {"WindowCenter": -5000, "WindowWidth": 10}),  # every pixel above it: white
    ):
        px = load_ds(make_ds(stored, bits_stored=12, **window), tmp_path / f"{name}.dcm")
        np.testing.assert_array_equal(px, automatic, err_msg=name)
    # MONOCHROME1 is inverted after the fallback, as after any window.
    mono1 = load_image(
        save(make_ds(stored, "MONOCHROME1", 12, WindowCenter=30000, WindowWidth=100), tmp_path / "m1.dcm"),
        LIMIT,
    )
    assert mono1.inverted
    np.testing.assert_allclose(mono1.pixels, 1.0 - automatic, atol=1e-6)


def test_bits_allocated_1_is_refused(tmp_path: Path) -> None:
    ds = make_ds(quantise(pattern(), 8, np.uint8))
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = np.packbits(pattern() > 0.5, bitorder="little").tobytes()  # a binary mask
    reason = "Bits Allocated 1 (a binary image, not a radiograph) is not analysed: CR/DX images have 8 or 16"
    _refused(save(ds, tmp_path / "mask.dcm"), reason)


@pytest.mark.parametrize(
    ("keyword", "dtype", "name"),
    [
        ("FloatPixelData", np.float32, "Float Pixel Data (7FE0,0008)"),
        ("DoubleFloatPixelData", np.float64, "Double Float Pixel Data (7FE0,0009)"),
    ],
)
def test_float_pixel_data_is_refused(keyword: str, dtype: type, name: str, tmp_path: Path) -> None:
    ds = make_ds(quantise(pattern(), 12))
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = np.dtype(dtype).itemsize * 8
    setattr(ds, keyword, pattern().astype(dtype).tobytes())
    reason = f"{name} is not analysed: radiographs store integers in Pixel Data (7FE0,0010)"
    _refused(save(ds, tmp_path / "float.dcm"), reason)


@pytest.mark.parametrize(("side", "suffix"), [(1, ".dcm"), (32, ".dcm"), (1, ".png"), (32, ".png")])
def test_images_smaller_than_min_side_are_refused(side: int, suffix: str, tmp_path: Path) -> None:
    grey = quantise(pattern(side), 12) if side > 1 else np.full((1, 1), 100, np.uint16)
    if suffix == ".dcm":
        path = save(make_ds(grey, bits_stored=12), tmp_path / "small.dcm")
    else:
        path = _png((grey >> 4).astype(np.uint8), tmp_path / "small.png")
    reason = (
        f"image of {side} x {side} pixels is too small to be a radiograph "
        "(at least 64 a side: [preprocess] min_side)"
    )
    _refused(path, reason)
    if side > 1:  # the limit is a parameter ([preprocess] min_side)
        assert load_image(path, LIMIT, min_side=side).pixels.shape == (side, side)
        _refused(path, reason.replace("64 a side", f"{side + 1} a side"), min_side=side + 1)


# --- model input ---------------------------------------------------------------------------------


def _cfg(size: int, window: Window | None = None) -> ModelConfig:
    return ModelConfig("M", "resnet18", Path("x.pt"), "layer4", input_size=size, window=window)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_model_input_shape_and_imagenet_normalisation() -> None:
    images = [
        SourceImage(pixels=np.full((40, 50), 0.5, np.float32)),
        SourceImage(pixels=np.random.default_rng(1).random((100, 70)).astype(np.float32)),
    ]
    x = to_model_input(images, _cfg(48))
    assert x.shape == (2, 3, 48, 48) and x.dtype == torch.float32 and x.is_contiguous()
    for c in range(3):
        expected = (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[0, c], torch.full((48, 48), expected), atol=1e-6)
    grey = _unnormalise(x)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(
        grey[:, 0], grey[:, 2], atol=1e-6
    )
    assert 0.3 < float(grey[1].mean()) < 0.7  # the random image, area-resized


def test_model_input_fixed_window_on_modality_values(tmp_path: Path) -> None:
    modality = np.linspace(-1000, 1000, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    expected = np.clip((modality - (40 - 400)) / 800, 0, 1)
    window = Window(center=40, width=800)
    for inverted in (False, True):
        image = SourceImage(
            pixels=np.zeros((SIZE, SIZE), np.float32), modality_values=modality, inverted=inverted
        )
        got = _unnormalise(to_model_input([image], _cfg(SIZE, window)))[0, 0].numpy()
        np.testing.assert_allclose(got, 1 - expected if inverted else expected, atol=1e-5)
    # Without a window the display pixels are used; PNG-like images (no modality values) ignore it.
    image = SourceImage(pixels=np.full((SIZE, SIZE), 0.25, np.float32), modality_values=modality)
    assert torch.allclose(
        _unnormalise(to_model_input([image], _cfg(SIZE)))[0, 0], torch.tensor(0.25), atol=1e-6
    )
    png = SourceImage(pixels=np.full((SIZE, SIZE), 0.25, np.float32))
    assert torch.allclose(
        _unnormalise(to_model_input([png], _cfg(SIZE, window)))[0, 0], torch.tensor(0.25), atol=1e-6
    )
    # End to end: a DICOM whose header window differs from the model's fixed window.
    stored = (modality + 1024).astype(np.uint16)
    ds = make_ds(stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-600, WindowWidth=1500)
    loaded = load_image(save(ds, tmp_path / "ct.dcm"), LIMIT)
    got = _unnormalise(to_model_input([loaded], _cfg(SIZE, window)))[0, 0].numpy()
    np.testing.assert_allclose(got, np.clip((np.round(modality) - (40 - 400)) / 800, 0, 1), atol=2e-3)


ODD: dict[str, Callable[[Dataset], None]] = {
    "palette": lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"),
    "no rows": lambda ds: delattr(ds, "Rows"),
    "zero rows": lambda ds: setattr(ds, "Rows", 0),
    "bits stored 20": lambda ds: setattr(ds, "BitsStored", 20),
    "MONOCHROME3": lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME3"),
    "2 samples": lambda ds: setattr(ds, "SamplesPerPixel", 2),
    "frames beyond data": lambda ds: setattr(ds, "NumberOfFrames", 5),
    "empty VOI LUT item": lambda ds: setattr(ds, "VOILUTSequence", [Dataset()]),
    "empty pixel data": lambda ds: setattr(ds, "PixelData", b""),
    # DS values are text: written as a valid placeholder, damaged in the file below.
    "bad slope": lambda ds: ds.update({"RescaleSlope": "7.25", "RescaleIntercept": 0}),
    "bad window": lambda ds: ds.update({"WindowCenter": "7.25", "WindowWidth": 200}),
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_headers_give_an_input_error(name: str, tmp_path: Path) -> None:
    ds = make_ds(quantise(pattern(), 12), bits_stored=12)
    ODD[name](ds)
    path = save(ds, tmp_path / "odd.dcm")
    path.write_bytes(path.read_bytes().replace(b"7.25", b"abcd"))
    with pytest.raises(InputError) as info:
        load_image(path, LIMIT)
    assert str(path) in str(info.value)
