"""Exceptions of the imaging and model core.

Callers tell apart *input* problems (the image cannot be analysed: record the reason, keep the file)
from *configuration* and *checkpoint* problems (the operator must act) and from bugs (anything else).
"""

from __future__ import annotations

__all__ = [
    "GradcamError",
    "ConfigError",
    "CheckpointError",
    "CheckpointMissingError",
    "NotACheckpointError",
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "InputError",
    "NotAnImageError",
    "NoPixelDataError",
    "UnsupportedTransferSyntaxError",
    "UnsupportedImageError",
    "ImageTooLargeError",
    "CorruptPixelDataError",
]


class GradcamError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(GradcamError):
    """A configuration file is missing, unreadable or holds a bad value."""

    def __init__(self, file: str, key: str, expected: str) -> None:
        self.file = file
        self.key = key
        self.expected = expected
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {expected}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str]]:
        # so that it crosses a process boundary (the node's model process reports it to the parent)
        return (type(self), (self.file, self.key, self.expected))


class CheckpointError(GradcamError):
    """A checkpoint cannot be used."""


class CheckpointMissingError(CheckpointError):
    """The checkpoint file does not exist."""


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch checkpoint at all (neither torch.save's zip format nor a pickle)."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs arbitrary unpickling, which is refused."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the configured architecture."""


class InputError(GradcamError):
    """An input image cannot be analysed; the message says why."""


class NotAnImageError(InputError):
    """The file is neither DICOM nor a decodable PNG/JPEG image."""


class NoPixelDataError(InputError):
    """A DICOM object without an image (no Pixel Data)."""


class UnsupportedTransferSyntaxError(InputError):
    """The DICOM transfer syntax has no available decoder."""


class UnsupportedImageError(InputError):
    """Pixel layout this pipeline cannot turn into a grey radiograph."""


class ImageTooLargeError(InputError):
    """More pixels than the configured limit (checked before decoding)."""


class CorruptPixelDataError(InputError):
    """The pixel data cannot be decoded (truncated or damaged)."""
