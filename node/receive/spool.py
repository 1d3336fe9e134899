"""Durable files of the node: received instances and made outputs under ``storage_dir``.

Layout (UIDs are checked with :func:`valid_uid` before they become path parts, so a hostile UID can
never climb out of the spool)::

    storage_dir/<study_uid>/<sop_instance_uid>.dcm            received instances
    storage_dir/outputs/<source sop_uid>/<output sop_uid>.dcm outputs ("outputs" is no valid UID: no clash)

Every file is written by :func:`write_atomic`: a reader (or a restart after a crash) sees the old file or
the whole new one, never a torn one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from gradcam.eligibility import UID_RE, valid_uid

__all__ = [
    "InvalidUIDError",
    "UID_RE",
    "valid_uid",
    "instance_path",
    "output_path",
    "write_atomic",
    "free_bytes",
]


class InvalidUIDError(ValueError):
    """A UID that is not a valid DICOM UID (digits and dots, at most 64 characters)."""


def _check(name: str, uid: object) -> str:
    if not valid_uid(uid):
        raise InvalidUIDError(f"{name} is not a valid DICOM UID: {str(uid)[:80]!r}")
    return str(uid)


def instance_path(root: Path, study_uid: str, sop_uid: str) -> Path:
    """Where a received instance lives; raises :class:`InvalidUIDError` for a bad UID."""
    return Path(root) / _check("Study Instance UID", study_uid) / f"{_check('SOP Instance UID', sop_uid)}.dcm"


def output_path(root: Path, source_sop_uid: str, output_sop_uid: str) -> Path:
    """Where an output made from a received instance lives; raises :class:`InvalidUIDError` for a bad UID."""
    src = _check("source SOP Instance UID", source_sop_uid)
    return Path(root) / "outputs" / src / f"{_check('output SOP Instance UID', output_sop_uid)}.dcm"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, fsyncing each parent so the new entries are durable."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass  # another thread made it meanwhile
        _fsync_dir(d.parent)


def write_atomic(path: Path, data: bytes | Sequence[bytes]) -> None:
    """Write ``data`` (bytes, or buffers written one after the other) to ``path`` durably and atomically,
    replacing any file there.

    A temporary file in the same folder is written and fsynced, renamed over ``path`` with
    :func:`os.replace`, then the folder is fsynced so the rename itself survives a power cut.
    Raises :class:`OSError` (disk full, permissions...) with nothing left behind.
    """
    path = Path(path)
    buffers = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    _make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            for buffer in buffers:
                view = memoryview(buffer)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def free_bytes(path: Path) -> int:
    """Bytes available to this (unprivileged) process on the file system holding ``path``.

    ``path`` need not exist yet: its nearest existing ancestor is asked.
    """
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize
