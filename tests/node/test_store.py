"""node.receive.store: one durable file + one transaction per new instance; duplicates; refusals leave
nothing."""

from __future__ import annotations

import copy
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from sqlalchemy import func, select

from node.db import (
    Association,
    AssociationStatus,
    Instance,
    Job,
    JobStatus,
)
from node.outputs.identity import revised_key
from node.queue import JobSignal
from node.receive.store import (
    CONN_CLOSED_REASON,
    AssociationLog,
    InstanceStore,
    OutOfResourcesError,
    Received,
)
from tests import helpers


def _rec(uid: str = "1.2.3", analysable: bool = True, association_id: int | None = None) -> Received:
    return Received(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2",
        series_instance_uid="1.2.1",
        patient_id="P",
        modality="DX",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="SCU",
        association_id=association_id,
        analysable=analysable,
        skip_reason=None if analysable else "modality CT is not CR/DX",
    )


_IMAGE = helpers.image_dataset(sop_uid="1.2.3", study_uid="1.2", size=32)


def _dicom(syntax: str = ExplicitVRLittleEndian, **changes: object) -> bytes:
    """The test image as a C-STORE brings it (file meta included), in ``syntax``, with ``changes``."""
    ds: Dataset = copy.deepcopy(_IMAGE)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


DATA1 = _dicom()


def _counts(sessions) -> tuple[int, int]:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Instance)), s.scalar(
            select(func.count()).select_from(Job)
        )


def test_store_then_duplicate(tmp_path: Path, sessions) -> None:
    signal = JobSignal()
    assoc_id = AssociationLog(sessions).open("SCU", "GRADCAM", "127.0.0.1", 1, AssociationStatus.ACCEPTED)
    store = InstanceStore(tmp_path / "spool", sessions, signal, 0)
    first = store.store(_rec(association_id=assoc_id), DATA1)
    assert first.outcome == "stored" and first.job_status is JobStatus.QUEUED
    assert first.path == tmp_path / "spool" / "1.2" / "1.2.3.dcm"
    assert first.path.read_bytes() == DATA1
    assert signal.pending  # the worker is woken after the commit
    signal.wait(0)

    # the same image in another transfer syntax (another route, another encoding): not stored again
    again = store.store(_rec(association_id=assoc_id), _dicom(ImplicitVRLittleEndian))
    assert again.outcome == "duplicate" and again.instance_id == first.instance_id
    assert first.path.read_bytes() == DATA1  # not overwritten
    assert not signal.pending  # nothing new to do
    assert _counts(sessions) == (1, 1)
    with sessions() as s:
        assert s.scalar(select(Instance.times_received)) == 2
        assert s.get(Association, assoc_id).n_received == 2


def test_skipped_job_has_reason_and_no_wakeup(tmp_path: Path, sessions) -> None:
    signal = JobSignal()
    res = InstanceStore(tmp_path, sessions, signal, 0).store(_rec(analysable=False), b"CT")
    assert res.job_status is JobStatus.SKIPPED
    with sessions() as s:
        job = s.scalars(select(Job)).one()
        assert job.reason == "modality CT is not CR/DX" and job.finished_at is not None
    assert not signal.pending


def test_low_disk_refuses_and_writes_nothing(tmp_path: Path, sessions) -> None:
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), min_free_bytes=2**62)
    with pytest.raises(OutOfResourcesError, match="below the minimum"):
        store.store(_rec(), b"DATA")
    assert not (tmp_path / "spool").exists()
    assert _counts(sessions) == (0, 0)


def test_database_failure_refuses_and_removes_file(tmp_path: Path, sessions) -> None:
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0)
    sessions.kw["bind"].dispose()
    with sessions.kw["bind"].begin() as c:
        c.exec_driver_sql("DROP TABLE jobs")  # the job insert now fails after the file is written
    with pytest.raises(OutOfResourcesError, match="database error"):
        store.store(_rec(), b"DATA")
    assert not (tmp_path / "spool" / "1.2" / "1.2.3.dcm").exists()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0  # rolled back with the job


def test_disk_failure_is_out_of_resources(tmp_path: Path, sessions) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "1.2").write_bytes(b"a file where the study folder should be")
    with pytest.raises(OutOfResourcesError, match="cannot write"):
        InstanceStore(spool, sessions, JobSignal(), 0).store(_rec(), b"DATA")
    assert _counts(sessions) == (0, 0)


def test_association_log(sessions) -> None:
    log = AssociationLog(sessions)
    a = log.open("SCU", "GRADCAM", "127.0.0.1", 5, AssociationStatus.ACCEPTED)
    log.count_failure(a)
    log.close(a, AssociationStatus.ABORTED, CONN_CLOSED_REASON)  # a guess from the closed connection...
    log.close(a, AssociationStatus.RELEASED)  # ...corrected by the real release
    log.close(a, AssociationStatus.ABORTED, "A-ABORT")  # an ended association stays ended
    r = log.open("BAD", "GRADCAM", "127.0.0.1", 6, AssociationStatus.REJECTED, reason="not allowed")
    with sessions() as s:
        row = s.get(Association, a)
        assert (row.status, row.reason, row.n_failed) == (AssociationStatus.RELEASED, None, 1)
        assert row.ended_at is not None and row.ended_at >= row.started_at
        rej = s.get(Association, r)
        assert rej.status is AssociationStatus.REJECTED and rej.ended_at is not None


def _finish(sessions, job_id: int, content_key: str | None) -> None:
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        job.status, job.content_key = JobStatus.DONE, content_key


def test_received_again_after_a_configuration_change_is_analysed_again(tmp_path: Path, sessions) -> None:
    signal = JobSignal()
    store = InstanceStore(tmp_path / "spool", sessions, signal, 0, content_key="new")
    first = store.store(_rec(), DATA1)
    signal.wait(0)
    # still queued: received again while its analysis waits, nothing more to do
    assert store.store(_rec(), DATA1).job_id is None and not signal.pending
    _finish(sessions, first.job_id, "old")  # its results were made with another configuration
    again = store.store(_rec(), DATA1)
    assert again.outcome == "duplicate" and again.job_status is JobStatus.QUEUED
    assert again.job_id not in (None, first.job_id) and signal.pending
    signal.wait(0)
    with sessions() as s:
        jobs = s.get(Instance, first.instance_id).jobs
    assert [(j.id, j.status) for j in jobs] == [
        (first.job_id, JobStatus.DONE),
        (again.job_id, JobStatus.QUEUED),
    ]
    assert "another configuration" in (jobs[1].reason or "")
    # once done with the current configuration, receiving it again changes nothing
    _finish(sessions, again.job_id, "new")
    assert store.store(_rec(), DATA1).job_id is None and not signal.pending
    assert _counts(sessions) == (1, 2)


def test_received_again_is_only_counted_without_a_content_key_or_when_skipped(
    tmp_path: Path, sessions
) -> None:
    counting = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0)
    first = counting.store(_rec(), DATA1)
    _finish(sessions, first.job_id, "old")
    assert counting.store(_rec(), DATA1).job_id is None
    current = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="new")
    skipped = current.store(_rec("1.2.4", analysable=False), b"CT")
    assert skipped.job_status is JobStatus.SKIPPED
    assert current.store(_rec("1.2.4", analysable=False), b"CT").job_id is None
    assert _counts(sessions) == (2, 2)


def test_received_again_after_a_purge_gets_its_file_back(tmp_path: Path, sessions) -> None:
    from datetime import UTC, datetime

    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), DATA1)
    first.path.unlink()  # what purge does to the file, keeping the row
    with sessions.begin() as s:
        s.get(Instance, first.instance_id).purged_at = datetime.now(UTC)
    again = store.store(_rec(), DATA1)
    assert again.outcome == "duplicate" and first.path.read_bytes() == DATA1
    with sessions() as s:
        assert s.get(Instance, first.instance_id).purged_at is None


# --- the same SOP Instance UID with other content: revisions ----------------------------------------------


def _instance(sessions, instance_id: int) -> Instance:
    with sessions() as s:
        return s.get(Instance, instance_id)


def test_received_again_with_another_patient_is_a_new_revision_analysed_again(
    tmp_path: Path, sessions
) -> None:
    """A PACS that corrected the patient sends the image again under its UID: the node must not keep results
    filed under the old patient. The new content is kept next to the old file, the instance names it, and a
    job analyses it again (its outputs get UIDs of their own: node.outputs.identity.revised_key)."""
    signal = JobSignal()
    store = InstanceStore(tmp_path / "spool", sessions, signal, 0, content_key="k")
    first = store.store(_rec(), DATA1)
    _finish(sessions, first.job_id, "k")
    signal.wait(0)

    corrected = _dicom(PatientID="PHANTOM-0002", PatientName="PHANTOM^RECONCILED")
    revised = store.store(replace(_rec(), patient_id="PHANTOM-0002"), corrected)
    assert revised.outcome == "revised" and revised.instance_id == first.instance_id
    assert revised.job_status is JobStatus.QUEUED and revised.job_id != first.job_id and signal.pending
    assert revised.path == first.path.with_name("1.2.3.r2.dcm") and revised.path.read_bytes() == corrected
    assert first.path.read_bytes() == DATA1  # what the first analysis saw stays
    row = _instance(sessions, first.instance_id)
    assert (row.revision, row.patient_id, row.path, row.times_received) == (
        2,
        "PHANTOM-0002",
        str(revised.path),
        2,
    )
    assert row.earlier_paths == str(first.path)
    with sessions() as s:
        job = s.get(Job, revised.job_id)
    assert (
        job.reason == "received again with other content (PatientName, PatientID): revision 2, analysed again"
    )
    assert "PHANTOM-0002" not in job.reason  # names of what changed, never a patient's values

    # the corrected image again, as the node now has it: counted only; analysed with the current
    # configuration at this revision, it is not analysed again
    _finish(sessions, revised.job_id, revised_key("k", 2))
    signal.wait(0)
    again = store.store(
        replace(_rec(), patient_id="PHANTOM-0002"),
        _dicom(ImplicitVRLittleEndian, PatientID="PHANTOM-0002", PatientName="PHANTOM^RECONCILED"),
    )
    assert again.outcome == "duplicate" and again.job_id is None and not signal.pending
    assert _counts(sessions) == (1, 2)


def test_other_pixels_under_a_known_uid_are_a_revision_and_another_encoding_is_not(
    tmp_path: Path, sessions
) -> None:
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), DATA1)
    _finish(sessions, first.job_id, "k")
    # the same pixels, RLE-compressed by a router: the same image
    assert store.store(_rec(), _dicom(RLELossless)).outcome == "duplicate"
    pixels = np.frombuffer(_IMAGE.PixelData, np.uint16).copy()
    pixels[0] += 1
    other = store.store(_rec(), _dicom(PixelData=pixels.tobytes()))
    assert other.outcome == "revised" and other.job_status is JobStatus.QUEUED
    with sessions() as s:
        assert "(pixel data)" in s.get(Job, other.job_id).reason


def test_revision_while_the_job_waits_needs_no_second_job(tmp_path: Path, sessions) -> None:
    """Still queued: the job reads the instance's file when a worker claims it, which is the new one now."""
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), DATA1)
    revised = store.store(_rec(), _dicom(StudyDescription="MOVED"))
    assert revised.outcome == "revised" and revised.job_id == first.job_id
    assert _counts(sessions) == (1, 1)
    assert _instance(sessions, first.instance_id).path == str(revised.path)


def test_revision_of_a_purged_instance_is_told_by_what_its_row_says(tmp_path: Path, sessions) -> None:
    from datetime import UTC, datetime

    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), DATA1)
    _finish(sessions, first.job_id, "k")
    first.path.unlink()  # purged; the row stays
    with sessions.begin() as s:
        s.get(Instance, first.instance_id).purged_at = datetime.now(UTC)
    moved = replace(_rec(), study_instance_uid="1.9")
    revised = store.store(moved, _dicom(StudyInstanceUID="1.9"))
    assert revised.outcome == "revised" and revised.path == tmp_path / "spool" / "1.9" / "1.2.3.r2.dcm"
    row = _instance(sessions, first.instance_id)
    assert (row.study_instance_uid, row.purged_at, row.revision) == ("1.9", None, 2)
    with sessions() as s:
        assert "(StudyInstanceUID)" in s.get(Job, revised.job_id).reason


def test_purge_takes_the_files_of_earlier_revisions_with_the_instance(tmp_path: Path, sessions) -> None:
    from datetime import timedelta

    from node.db import utcnow
    from node.ops.purge import Rules, purge

    spool = tmp_path / "spool"
    store = InstanceStore(spool, sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), DATA1)
    _finish(sessions, first.job_id, "k")
    second = store.store(_rec(), _dicom(StudyDescription="MOVED"))
    _finish(sessions, second.job_id, revised_key("k", 2))
    third = store.store(_rec(), _dicom(StudyDescription="MOVED AGAIN"))
    _finish(sessions, third.job_id, revised_key("k", 3))
    files = [first.path, second.path, third.path]
    assert all(f.is_file() for f in files) and third.path.name == "1.2.3.r3.dcm"
    assert _instance(sessions, first.instance_id).earlier_paths == f"{first.path}\n{second.path}"

    report = purge(sessions, spool, Rules(received_days=1), now=utcnow() + timedelta(days=2))
    assert report.received_files == 3 and not any(f.exists() for f in files)
    row = _instance(sessions, first.instance_id)
    assert row.purged_at is not None and row.earlier_paths is None


def test_the_same_image_in_another_encoding_is_the_same_whatever_its_sequences_hold(
    tmp_path: Path, sessions
) -> None:
    """Implicit VR reads a VOI LUT's data as numbers (US) where the explicit VR file holds words (OW), and a
    router may add private elements inside a sequence's items: neither is other content."""
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 12]
    lut.add_new(0x00283006, "OW", np.array([0, 1000, 3000, 4095], "<u2").tobytes())  # LUT Data
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID1", "99TEST", "Chest PA"
    base = {"VOILUTSequence": [lut], "ProcedureCodeSequence": [code]}
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0, content_key="k")
    first = store.store(_rec(), _dicom(**base))
    _finish(sessions, first.job_id, "k")

    routed = copy.deepcopy(code)
    routed.private_block(0x0011, "SOME ROUTER", create=True).add_new(0x01, "LO", "routed")
    again = store.store(
        _rec(), _dicom(ImplicitVRLittleEndian, VOILUTSequence=[lut], ProcedureCodeSequence=[routed])
    )
    assert again.outcome == "duplicate" and again.job_id is None

    other_lut = copy.deepcopy(lut)
    other_lut.LUTData = np.array([0, 1000, 3001, 4095], "<u2").tobytes()
    revised = store.store(_rec(), _dicom(VOILUTSequence=[other_lut], ProcedureCodeSequence=[code]))
    assert revised.outcome == "revised"
    with sessions() as s:
        assert "(VOILUTSequence)" in s.get(Job, revised.job_id).reason
