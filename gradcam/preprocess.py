"""From a file or a DICOM dataset to a display-ready grey image, and from there to model input.

DICOM: modality LUT (rescale), then the VOI LUT or window from the header (else a robust automatic window
from the 0.5th and 99.5th percentiles), MONOCHROME1 inverted, so that bright means dense as on a light box.
Radiographs have no Hounsfield units: the seed's fixed CT window is only applied for models configured
with ``window``, on the modality values.

Refused on the way (:mod:`gradcam.eligibility` words the reasons, all :class:`~gradcam.errors.InputError`):
pixel encodings no radiograph has (Float Pixel Data, Bits Allocated other than 8 or 16) and images smaller
than ``min_side`` before decoding; a blank image after the display pipeline (a header window that shows
nothing falls back to the automatic window first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.multival
import torch
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array

from gradcam.config import ModelConfig, Window
from gradcam.eligibility import DEFAULT_MIN_SIDE, Verdict, check_displayed, check_pixel_encoding, check_size
from gradcam.errors import (
    CorruptPixelDataError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedImageError,
    UnsupportedTransferSyntaxError,
)

__all__ = [
    "SourceImage",
    "load_image",
    "load_raster",
    "load_dataset_image",
    "read_dicom",
    "raster_size",
    "to_model_input",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}


@dataclass(frozen=True)
class SourceImage:
    """A grey radiograph at source resolution.

    ``pixels`` is float32 in [0, 1], display-ready (bright = dense). ``modality_values`` holds the DICOM
    values after the modality LUT (before any window), for models with a fixed window; None for PNG/JPEG.
    """

    pixels: np.ndarray = field(repr=False)
    modality_values: np.ndarray | None = field(default=None, repr=False)
    source: str = ""
    inverted: bool = False

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def _auto_window(values: np.ndarray) -> np.ndarray:
    """Robust window: 0.5th to 99.5th percentile (on a subsample, for speed)."""
    step = max(1, int(np.sqrt(values.size / 250_000)))
    sample = values[::step, ::step]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    return _to_unit(values, float(lo), float(hi))


def _first(value: object) -> float:
    """First value of a possibly multi-valued DICOM number."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _voi_lut_table(item: pydicom.Dataset) -> tuple[np.ndarray, int]:
    """``(LUT values as float32, first stored value mapped)`` of a VOI LUT item (LUT Data US or OW)."""
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words, little endian (big endian syntaxes are retired)
        values = np.frombuffer(data[: 2 * (len(data) // 2)], "<u2")
    else:
        values = np.atleast_1d(np.asarray(data))
    if values.size == 0:
        raise ValueError("empty LUT Data")
    return values[:entries].astype(np.float32), first


def _header_voi(modality: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The header's VOI transform to [0, 1]: VOI LUT Sequence, else the first window; None if neither."""
    if "VOILUTSequence" in ds:
        lut, first = _voi_lut_table(ds.VOILUTSequence[0])
        # Our own lookup: pydicom's apply_voi_lut indexes an 8-bit LUT with uint8 (wraps beyond 256 entries).
        index = np.clip(np.round(modality) - first, 0, lut.size - 1).astype(np.int64)
        return _to_unit(lut[index], float(lut.min()), float(lut.max()))
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if width <= 0:
        return None
    function = str(getattr(ds, "VOILUTFunction", "LINEAR")).strip().upper()
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (modality - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return _to_unit(modality, center - width / 2.0, center + width / 2.0)
    # PS3.3 C.11.2.1.2.1: LINEAR maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto the output range.
    lo = center - 0.5 - (width - 1.0) / 2.0
    return _to_unit(modality, lo, lo + max(width - 1.0, 1e-6))


def _grey(arr: np.ndarray) -> np.ndarray:
    """RGB(A)/BGR to grey with Rec. 601 weights; grey stays as is."""
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[..., :3].astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    raise UnsupportedImageError(f"unsupported pixel layout {arr.shape}")


def _refuse_unless(verdict: Verdict, source: str) -> None:
    if not verdict.ok:
        raise UnsupportedImageError(f"{source}: {verdict.reason}")


def _check_size(rows: int, cols: int, max_pixels: int, min_side: int, source: str) -> None:
    if rows <= 0 or cols <= 0:
        raise UnsupportedImageError(f"{source}: image has no pixels ({rows}x{cols})")
    _refuse_unless(check_size(rows, cols, min_side), source)
    if rows * cols > max_pixels:
        raise ImageTooLargeError(
            f"{source}: {cols}x{rows} = {rows * cols} pixels exceeds the limit of {max_pixels} "
            "([preprocess] max_pixels)"
        )


def load_dataset_image(
    ds: pydicom.Dataset, max_pixels: int, source: str = "", *, min_side: int = DEFAULT_MIN_SIDE
) -> SourceImage:
    """Decode the first frame of a DICOM image and make it display-ready.

    Parameters
    ----------
    ds
        The dataset, with its file meta information (for the transfer syntax).
    max_pixels, min_side
        Refuse more pixels than ``max_pixels`` and fewer rows or columns than ``min_side`` (``[preprocess]``).
    source
        Names the image in error messages (default: its SOP Instance UID).

    Raises
    ------
    NoPixelDataError, UnsupportedTransferSyntaxError, ImageTooLargeError, CorruptPixelDataError,
    UnsupportedImageError
        The last one also for Float Pixel Data, Bits Allocated other than 8/16, too few rows or columns
        and a blank image.
    """
    source = source or str(getattr(ds, "SOPInstanceUID", "dataset"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NoPixelDataError(f"{source}: no pixel data (SOP class {getattr(ds, 'SOPClassUID', '?')})")
    _refuse_unless(check_pixel_encoding(ds), source)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        raise UnsupportedTransferSyntaxError(f"{source}: no transfer syntax in the file meta information")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"{source}: transfer syntax {tsyntax.name} ({tsyntax}) is not supported"
        ) from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntaxError(f"{source}: no decoder installed for {tsyntax.name} ({tsyntax})")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise UnsupportedImageError(f"{source}: Rows/Columns missing or invalid") from None
    _check_size(rows, cols, max_pixels, min_side, source)
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    try:
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        arr = pixel_array(ds, index=0 if frames > 1 else None)
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError, IndexError, EOFError) as exc:
        raise CorruptPixelDataError(f"{source}: pixel data cannot be decoded: {exc}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # pydicom already converted YBR to RGB; colour images have no modality/VOI LUT.
        pixels = _auto_window(_grey(arr))
        _refuse_unless(check_displayed(pixels), source)
        return SourceImage(pixels=pixels, source=source)
    if arr.ndim != 2:
        raise UnsupportedImageError(f"{source}: unsupported pixel array shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImageError(f"{source}: unsupported photometric interpretation {photometric!r}")
    try:
        modality = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        pixels = _header_voi(modality, ds)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise UnsupportedImageError(f"{source}: invalid modality/VOI LUT attributes: {exc}") from None
    hint = _blank_hint(ds)
    shown = None if pixels is None else check_displayed(pixels, hint)
    if shown is None or not shown.ok:  # no header window, or one that shows nothing: find one that does
        pixels = _auto_window(modality)
        shown = check_displayed(pixels, hint)
    _refuse_unless(shown, source)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        pixels = 1.0 - pixels
    return SourceImage(pixels=pixels, modality_values=modality, source=source, inverted=inverted)


def _blank_hint(ds: pydicom.Dataset) -> str:
    """A likely cause of a blank image, for the administrator."""
    slope = ds.get("RescaleSlope", None)
    try:
        return "(Rescale Slope 0?)" if slope not in (None, "") and _first(slope) == 0 else ""
    except (TypeError, ValueError):
        return ""


def read_dicom(path: Path) -> pydicom.Dataset | None:
    """The dataset in ``path`` if it is DICOM, else None (CorruptPixelDataError if a .dcm is unreadable)."""
    forced = path.suffix.lower() in _DICOM_SUFFIXES and path.suffix != ""
    try:
        ds = pydicom.dcmread(path, force=forced)
        # force=True "parses" any bytes (a text file named .dcm); without a preamble, only a dataset
        # that looks like an image object counts as DICOM.
        if forced and ds.preamble is None and "SOPClassUID" not in ds and "PixelData" not in ds:
            return None
        return ds
    except InvalidDicomError:
        return None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as exc:
        if path.suffix.lower() in (".dcm", ".dicom"):
            raise CorruptPixelDataError(f"{path}: DICOM file cannot be read: {exc}") from None
        return None


def raster_size(path: Path) -> tuple[int, int]:
    """``(rows, columns)`` of a PNG/JPEG file from its header; NotAnImageError if it is none."""
    try:
        with Image.open(path) as im:
            cols, rows = im.size
    except Exception:  # PIL raises many types for non-images; all mean the same here
        raise NotAnImageError(f"{path}: not DICOM, PNG or JPEG") from None
    return int(rows), int(cols)


def load_raster(path: Path, max_pixels: int, min_side: int) -> SourceImage:
    """Load a PNG or JPEG file (8 or 16 bit; grey, RGB or RGBA); limits as in :func:`load_dataset_image`."""
    rows, cols = raster_size(path)
    _check_size(rows, cols, max_pixels, min_side, str(path))
    buf = np.fromfile(path, dtype=np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise CorruptPixelDataError(f"{path}: image data cannot be decoded")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB)
    grey = _grey(arr).astype(np.float32)
    top = 65535.0 if arr.dtype == np.uint16 else 255.0
    pixels = np.clip(grey / top, 0.0, 1.0).astype(np.float32)
    _refuse_unless(check_displayed(pixels), str(path))
    return SourceImage(pixels=pixels, source=str(path))


def load_image(path: Path, max_pixels: int, *, min_side: int = DEFAULT_MIN_SIDE) -> SourceImage:
    """Load a DICOM, PNG or JPEG file (8 or 16 bit; grey, RGB or RGBA); limits as in
    :func:`load_dataset_image`."""
    path = Path(path)
    if not path.is_file():
        raise NotAnImageError(f"{path}: no such file")
    ds = read_dicom(path)
    if ds is not None:
        return load_dataset_image(ds, max_pixels, str(path), min_side=min_side)
    return load_raster(path, max_pixels, min_side)


def _window(values: np.ndarray, window: Window, inverted: bool) -> np.ndarray:
    lo = window.center - window.width / 2.0
    out = _to_unit(values, lo, lo + window.width)
    return 1.0 - out if inverted else out


def to_model_input(images: list[SourceImage], cfg: ModelConfig) -> torch.Tensor:
    """Stack images as a normalised ``(N, 3, S, S)`` batch for one model (grey to 3 channels)."""
    size = cfg.input_size
    batch = np.empty((len(images), size, size), np.float32)
    for i, img in enumerate(images):
        grey = img.pixels
        if cfg.window is not None and img.modality_values is not None:
            grey = _window(img.modality_values, cfg.window, img.inverted)
        batch[i] = cv2.resize(grey, (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(batch).unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()
