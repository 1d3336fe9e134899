"""Thumbnails of the node's Secondary Captures, as PNG, for the status page.

Only an output the database knows is read, from the path the node recorded for it (and only when that
path lies in the spool): nothing from a URL ever becomes a path. Outputs are immutable once written, so
thumbnails are kept in a small cache by output id.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pydicom
from sqlalchemy.orm import sessionmaker

from node.db import Output
from node.http.status import THUMBNAIL_KINDS

__all__ = ["ThumbnailError", "Thumbnails", "thumbnail_png"]

MAX_SIDE = 256


class ThumbnailError(Exception):
    """No thumbnail for this output; ``status`` is the HTTP status to answer (404 or 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _as_rgb8(pixels: np.ndarray, photometric: str) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected a single-frame greyscale or RGB image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


def thumbnail_png(path: Path, max_side: int = MAX_SIDE) -> bytes:
    """A PNG of the Secondary Capture at ``path``, its long side at most ``max_side`` pixels."""
    ds = pydicom.dcmread(path)
    photometric = str(ds.get("PhotometricInterpretation", "RGB"))
    rgb = _as_rgb8(np.asarray(ds.pixel_array), photometric)  # pydicom 3 gives YBR as RGB
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


class Thumbnails:
    """Thumbnails by output id, with the last ``capacity`` kept in memory."""

    def __init__(self, sessions: sessionmaker, spool: Path, capacity: int = 128) -> None:
        self.sessions = sessions
        self.spool = Path(spool).resolve()
        self.capacity = capacity
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def png(self, output_id: int) -> bytes:
        """The PNG of output ``output_id``; :class:`ThumbnailError` when there is none to give."""
        with self._lock:
            if output_id in self._cache:
                self._cache.move_to_end(output_id)
                return self._cache[output_id]
        with self.sessions() as s:
            row = s.get(Output, output_id)
            kind, path = (row.kind, row.path) if row is not None else (None, None)
        if path is None or kind not in THUMBNAIL_KINDS:
            raise ThumbnailError(404, f"no picture with output id {output_id}")
        file = Path(path).resolve()
        if not file.is_relative_to(self.spool):
            raise ThumbnailError(404, f"output {output_id} lies outside the spool")
        try:
            data = thumbnail_png(file)
        except FileNotFoundError:
            raise ThumbnailError(404, f"the file of output {output_id} is gone") from None
        except Exception as exc:  # unreadable file: the page shows a broken image, the log says why
            raise ThumbnailError(500, f"output {output_id}: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self._cache[output_id] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
