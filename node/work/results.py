"""Recording an analysed job: what the database must say before its outputs are built (their Instance
Numbers, the SR they supersede), writing them to the spool, and committing results, outputs and the send
in one transaction.

These run for every job: their statements are built once, below, and executed with parameters (SQLAlchemy
finds their compiled form without walking a new statement each time), and rows are inserted as plain rows,
not ORM objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from gradcam.results import AnalysisResult
from node.config import Destination
from node.db import Instance, Job, JobStatus, Output, Result, utcnow
from node.outputs import Built, Planned
from node.outputs.encoding import file_parts
from node.receive.spool import output_path, write_atomic
from node.send.outbox import create_send

__all__ = [
    "PermanentError",
    "LostLease",
    "predecessor_of",
    "current_revision",
    "instance_numbers",
    "write_outputs",
    "record_done",
]


class PermanentError(Exception):
    """This job cannot succeed however often it is tried; the message says why."""


class LostLease(Exception):
    """The job is no longer this worker's: its lease ran out and another worker took it over (which makes
    the same outputs, with the same UIDs), or an operator changed it meanwhile."""


_JOB_ID = bindparam("job_id")

_OWN = aliased(Job)
_INSTANCE_OF_JOB = select(_OWN.instance_id).where(_OWN.id == _JOB_ID).scalar_subquery()
_REVISION_OF_JOB = (
    select(Instance.revision).join(Job, Job.instance_id == Instance.id).where(Job.id == _JOB_ID)
)


def current_revision(session: Session, job_id: int) -> int | None:
    """The revision of job ``job_id``'s image now (:mod:`node.receive.revision`)."""
    return session.scalar(_REVISION_OF_JOB, {"job_id": job_id})


_PREDECESSOR = (
    select(
        Output.series_instance_uid,
        Output.sop_class_uid,
        Output.sop_instance_uid,
        Output.path,
        Instance.study_instance_uid,
    )
    .join(Job, Job.id == Output.job_id)
    .join(Instance, Instance.id == Job.instance_id)
    .where(
        Job.instance_id == _INSTANCE_OF_JOB,
        Job.id < _JOB_ID,
        Job.status == JobStatus.DONE,
        or_(Job.content_key.is_(None), Job.content_key != bindparam("content_key")),
        Output.kind == "sr",
    )
    .order_by(Job.id.desc(), Output.id.desc())
    .limit(1)
)


def predecessor_of(session: Session, job_id: int, content_key: str) -> Dataset | None:
    """The header of the SR that job ``job_id``'s SR supersedes, or None.

    That is the SR of the latest earlier finished analysis of the same image made with another
    configuration: a re-analysis with an unchanged configuration names the same predecessor again, so
    its SR keeps the same content and UID.
    """
    row = session.execute(_PREDECESSOR, {"job_id": job_id, "content_key": content_key}).first()
    if row is None:
        return None
    header = Dataset()
    header.StudyInstanceUID = _study_of(Path(row.path), row.study_instance_uid)
    header.SeriesInstanceUID = row.series_instance_uid
    header.SOPClassUID = row.sop_class_uid
    header.SOPInstanceUID = row.sop_instance_uid
    return header


def _study_of(sr_path: Path, instance_study: str) -> str:
    """The study an earlier SR was filed in: its own file says (the image may have moved to another study
    since: a revision, :mod:`node.receive.revision`); the image's study now if the file is gone."""
    try:
        return str(
            dcmread(sr_path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID
        )
    except (OSError, InvalidDicomError, AttributeError):
        return instance_study


_KNOWN_NUMBERS = (
    select(Output.sop_instance_uid, func.max(Output.instance_number))
    .where(Output.sop_instance_uid.in_(bindparam("uids", expanding=True)))
    .group_by(Output.sop_instance_uid)
)
_TOP_NUMBERS = (
    select(Output.series_instance_uid, func.max(Output.instance_number))
    .where(Output.series_instance_uid.in_(bindparam("series", expanding=True)))
    .group_by(Output.series_instance_uid)
)


def instance_numbers(session: Session, planned: Iterable[Planned]) -> dict[str, int]:
    """An Instance Number for each planned output, unique within its series across the study's images:
    the number an identical output (same UID) already has, else the next free one in the series.

    Two queries whatever the number of outputs: the known numbers of these UIDs, the highest per series.
    """
    planned = list(planned)
    known = dict(session.execute(_KNOWN_NUMBERS, {"uids": [p.sop_uid for p in planned]}).all())
    top = dict(session.execute(_TOP_NUMBERS, {"series": sorted({p.series_uid for p in planned})}).all())
    numbers: dict[str, int] = {}
    for p in planned:
        if known.get(p.sop_uid) is not None:
            numbers[p.sop_uid] = int(known[p.sop_uid])
            continue
        top[p.series_uid] = int(top.get(p.series_uid) or 0) + 1
        numbers[p.sop_uid] = top[p.series_uid]
    return numbers


def write_outputs(storage_dir: object, source_uid: str, built: Iterable[Built]) -> list[dict[str, object]]:
    """Write each output atomically under the spool; their rows of the ``outputs`` table, without the job."""
    rows: list[dict[str, object]] = []
    for b in built:
        ds = b.dataset
        try:
            path = output_path(storage_dir, source_uid, str(ds.SOPInstanceUID))  # type: ignore[arg-type]
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        write_atomic(path, file_parts(ds))
        rows.append(
            {
                "kind": b.kind,
                "model": b.model,
                "sop_class_uid": str(ds.SOPClassUID),
                "sop_instance_uid": str(ds.SOPInstanceUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "instance_number": int(ds.InstanceNumber),
                "supersedes": b.supersedes,
                "path": str(path),
                "created_at": utcnow(),
            }
        )
    return rows


@dataclass(frozen=True)
class Done:
    """What :func:`record_done` needs to know about a finished analysis."""

    job_id: int
    analysis: AnalysisResult
    content_key: str
    outputs: list[dict[str, object]]  # rows of the outputs table (write_outputs), without the job
    destination: Destination | None
    duration_ms: float
    holder: str  # the worker process that holds the job's lease (node.db.leases.holder_id)


_LOCK_JOB = select(Job.status, Job.leased_by).where(Job.id == _JOB_ID).with_for_update()
_INSERT_RESULTS = insert(Result.__table__)
_INSERT_OUTPUTS = insert(Output.__table__)
_DONE = (
    update(Job.__table__)
    .where(Job.id == _JOB_ID)
    .values(
        status=JobStatus.DONE,
        reason=bindparam("why"),
        consensus=bindparam("consensus"),
        content_key=bindparam("key"),
        finished_at=bindparam("now"),
        next_attempt_at=None,
        duration_ms=bindparam("ms"),
        leased_by=None,
        lease_until=None,
    )
)


def record_done(factory: sessionmaker[Session], done: Done, now: datetime | None = None) -> None:
    """Commit a job's results, outputs and send (if it has a destination) and mark it ``done``, in one
    transaction, ending the worker's lease; :class:`LostLease` if the job is no longer this worker's."""
    now = now or utcnow()
    with factory.begin() as s:
        row = s.execute(_LOCK_JOB, {"job_id": done.job_id}).first()
        if row is None or row.status != JobStatus.RUNNING or row.leased_by != done.holder:
            holder = "nobody" if row is None else (row.leased_by or "nobody")
            state = "gone" if row is None else row.status
            raise LostLease(f"job {done.job_id} is no longer this worker's ({state}, held by {holder})")
        results = [
            {
                "job_id": done.job_id,
                "model": r.model,
                "builder": r.builder,
                "probability": float(r.probability),
                "threshold": float(r.threshold),
                "positive": bool(r.positive),
                "cam_peak_row": int(r.cam_peak[0]),
                "cam_peak_col": int(r.cam_peak[1]),
                "checkpoint_sha256": r.checkpoint_sha256,
                "ms": float(r.ms),
                "created_at": now,
            }
            for r in done.analysis.models.values()
        ]
        if results:
            s.execute(_INSERT_RESULTS, results)
        if done.outputs:
            s.execute(_INSERT_OUTPUTS, [{**o, "job_id": done.job_id} for o in done.outputs])
        if done.destination is not None:
            create_send(s, done.job_id, done.destination, now)
        s.execute(
            _DONE,
            {
                "job_id": done.job_id,
                "why": None if done.destination is not None else "no destination configured",
                "consensus": bool(done.analysis.consensus),
                "key": done.content_key,
                "now": now,
                "ms": done.duration_ms,
            },
        )
