"""node.work.results: the device UID of an installation, Instance Numbers per series, the SR a new one
supersedes; on real SQLite files."""

from __future__ import annotations

from pathlib import Path

from pydicom.uid import UID

from node.db import Instance, Job, JobStatus, Output, create_schema, make_engine, session_factory
from node.db.device import device_uid
from node.outputs import Planned
from node.work.results import instance_numbers, predecessor_of

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _job(s, inst: Instance, status: JobStatus = JobStatus.DONE, key: str | None = "k1") -> Job:
    job = Job(instance_id=inst.id, status=status, attempts=1, reply_ae="SCU", content_key=key)
    s.add(job)
    s.flush()
    return job


def _instance(s, uid: str = "1.2.3") -> Instance:
    inst = Instance(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid="1.2",
        series_instance_uid="1.2.1", transfer_syntax="1.2.840.10008.1.2.1", path="/x", size_bytes=1,
        calling_ae="SCU",
    )  # fmt: skip
    s.add(inst)
    s.flush()
    return inst


def _output(s, job: Job, uid: str, series: str = "9.1", number: int = 1, kind: str = "sr") -> None:
    s.add(
        Output(
            job_id=job.id, kind=kind, sop_class_uid=SR_CLASS, sop_instance_uid=uid,
            series_instance_uid=series, instance_number=number, path=f"/o/{uid}",
        )
    )  # fmt: skip


def test_device_uid_is_made_once_per_installation(tmp_path: Path, sessions) -> None:
    uid = device_uid(sessions)
    assert UID(uid).is_valid and uid.startswith("2.25.") and len(uid) <= 64
    assert device_uid(sessions) == uid  # kept: every later start (and every process) gets the same
    other = make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    create_schema(other)
    try:
        assert device_uid(session_factory(other)) != uid  # another installation, another device
    finally:
        other.dispose()
    assert device_uid(sessions, "1.2.826.0.1.99") == "1.2.826.0.1.99"  # [node] device_uid wins


def test_instance_numbers_continue_the_series_and_keep_known_objects(sessions) -> None:
    with sessions.begin() as s:
        job = _job(s, _instance(s))
        _output(s, job, "5.1", series="9.1", number=1)
        _output(s, job, "5.2", series="9.1", number=2)
    planned = [
        Planned("sc", "A", "9.1", "5.3"),
        Planned("sc", "B", "9.1", "5.4"),
        Planned("sr", None, "9.2", "6.1"),
        Planned("sc", "C", "9.1", "5.2"),  # made before (same UID): keeps its number
    ]
    with sessions() as s:
        numbers = instance_numbers(s, planned)
    assert numbers == {"5.3": 3, "5.4": 4, "6.1": 1, "5.2": 2}


def test_predecessor_is_the_latest_sr_of_another_configuration(sessions) -> None:
    with sessions.begin() as s:
        inst = _instance(s)
        first = _job(s, inst, key="k1")
        _output(s, first, "7.1")
        second = _job(s, inst, key="k2")
        _output(s, second, "7.2")
        failed = _job(s, inst, status=JobStatus.FAILED, key="k3")
        current = _job(s, inst, status=JobStatus.RUNNING, key="k1")
        other = _job(s, _instance(s, "1.2.4"), status=JobStatus.RUNNING, key="k9")
        ids = (first.id, second.id, failed.id, current.id, other.id)
    with sessions() as s:
        assert predecessor_of(s, ids[0], "k1") is None  # the first analysis supersedes nothing
        header = predecessor_of(s, ids[3], "k1")
        assert header is not None
        assert (header.SOPInstanceUID, header.SeriesInstanceUID, header.SOPClassUID) == (
            "7.2",
            "9.1",
            SR_CLASS,
        )
        assert header.StudyInstanceUID == "1.2"
        # back to k2's configuration: its predecessor is k1's SR, not its own earlier one
        assert predecessor_of(s, ids[3], "k2").SOPInstanceUID == "7.1"
        assert predecessor_of(s, ids[4], "k9") is None  # another image
