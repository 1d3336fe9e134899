"""node.receive.spool: UID validation before paths, layout, atomic durable writes, free space."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from node.receive.spool import (
    InvalidUIDError,
    free_bytes,
    instance_path,
    output_path,
    valid_uid,
    write_atomic,
)


@pytest.mark.parametrize("uid", ["1", "1.2.3", "1.2.840.10008.5.1.4.1.1.1.1", "0.0", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        ".",
        "1.",
        ".1",
        "1..2",
        "1.2 ",
        " 1.2",
        "1.2\n",
        "1.a",
        "../1",
        "1/2",
        "1\\2",
        "1.2" * 30,
        None,
        12,
    ],
)
def test_invalid_uids(uid: object) -> None:
    assert not valid_uid(uid)


def test_uid_length_limit() -> None:
    assert valid_uid("1" * 64)
    assert not valid_uid("1" * 65)


def test_instance_and_output_paths(tmp_path: Path) -> None:
    assert instance_path(tmp_path, "1.2", "1.2.3") == tmp_path / "1.2" / "1.2.3.dcm"
    assert output_path(tmp_path, "1.2.3", "9.8") == tmp_path / "outputs" / "1.2.3" / "9.8.dcm"


@pytest.mark.parametrize(
    ("study", "sop"), [("..", "1.2"), ("1.2", "../../etc/passwd"), ("/abs", "1"), ("1", "")]
)
def test_bad_uids_never_become_paths(tmp_path: Path, study: str, sop: str) -> None:
    with pytest.raises(InvalidUIDError):
        instance_path(tmp_path, study, sop)
    with pytest.raises(ValueError):  # InvalidUIDError is a ValueError
        output_path(tmp_path, study, sop)


def test_write_atomic_creates_dirs_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.dcm"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"
    write_atomic(target, b"second" * 1000)
    assert target.read_bytes() == b"second" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.dcm"]  # no temporary files left
    assert oct(target.stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def test_write_atomic_failure_leaves_old_state_and_no_temp(tmp_path: Path) -> None:
    # The target is a non-empty directory: os.replace fails after the temporary file was written.
    target = tmp_path / "d" / "x.dcm"
    target.mkdir(parents=True)
    (target / "keep").write_bytes(b"k")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert (target / "keep").read_bytes() == b"k"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.dcm"]


def test_write_atomic_empty_and_memoryview(tmp_path: Path) -> None:
    write_atomic(tmp_path / "e", b"")
    assert (tmp_path / "e").read_bytes() == b""
    write_atomic(tmp_path / "m", memoryview(b"abc"))
    assert (tmp_path / "m").read_bytes() == b"abc"


def test_write_atomic_buffers_one_after_the_other(tmp_path: Path) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, more than one write() may take at once
    write_atomic(tmp_path / "p", [b"head", big, b"", b"tail"])
    assert (tmp_path / "p").read_bytes() == b"head" + big + b"tail"


def test_free_bytes(tmp_path: Path) -> None:
    free = free_bytes(tmp_path)
    assert free > 0
    assert abs(free - shutil.disk_usage(tmp_path).free) < 64 * 2**20  # same file system, moments apart
    assert free_bytes(tmp_path / "not" / "yet" / "there") == pytest.approx(free, abs=64 * 2**20)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old
