"""The figures of the status page, read from the database in one short session per page.

Everything here is what ``gradcam-node jobs`` shows (UIDs, AE titles, statuses, reasons, model figures);
``instances.patient_id`` is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, selectinload

from node.config import Settings
from node.db import Association, Job, JobStatus, Output, Result, Send, SendAttempt, SendStatus, utcnow

# the record of one job is exactly the one `gradcam-node jobs --json` prints
from node.ops.report import iso, job_record, job_records
from node.receive.spool import free_bytes
from node.work.presence import WorkerView, seen_workers

__all__ = [
    "THUMBNAIL_KINDS",
    "ModelRate",
    "SendSummary",
    "Disk",
    "Holder",
    "Overview",
    "overview",
    "job_detail",
]

THUMBNAIL_KINDS = ("summary", "sc")  # Secondary Captures: pictures; the summary is preferred
_UNRESOLVED = (SendStatus.PENDING, SendStatus.SENDING, SendStatus.FAILED)


@dataclass(frozen=True)
class ModelRate:
    """One model's decisions over a window."""

    model: str
    analysed: int
    positive: int

    @property
    def rate(self) -> float:
        return self.positive / self.analysed if self.analysed else 0.0


@dataclass(frozen=True)
class SendSummary:
    """The outbox: sends by status and the latest error of one not yet sent."""

    by_status: dict[str, int]
    last_error: str | None = None
    last_error_at: datetime | None = None
    last_error_destination: str | None = None
    last_error_job: int | None = None


@dataclass(frozen=True)
class Disk:
    """Free space under the spool against the reserve below which C-STOREs are refused."""

    folder: Path
    free_bytes: int | None  # None: statvfs failed (``error`` says why)
    reserve_bytes: int
    error: str | None = None

    @property
    def low(self) -> bool:
        """Less than twice the reserve left: worth a look before stores are refused."""
        return self.free_bytes is not None and self.free_bytes < 2 * self.reserve_bytes


@dataclass(frozen=True)
class Holder:
    """A worker process that holds running jobs: its id (``host:pid``), how many, and until when at most;
    a lease in the past means the worker is gone and another one takes its jobs over."""

    worker: str
    jobs: int
    lease_until: datetime | None
    expired: bool


@dataclass(frozen=True)
class Overview:
    """Everything the page shows, taken at ``now``."""

    now: datetime
    queue_depth: int
    running: int
    oldest_queued_job: int | None
    oldest_queued_at: datetime | None
    last_hour: dict[str, int]  # jobs created in the last hour, by their status now
    last_day: dict[str, int]
    models: list[ModelRate]  # decisions of the last 24 h
    sends: SendSummary
    disk: Disk
    recent: list[dict[str, Any]]  # job records as `jobs --json`, with "thumbnail": an output id or None
    holders: list[Holder] = field(default_factory=list)  # the worker processes running jobs now
    workers: list[WorkerView] = field(default_factory=list)  # every worker process seen in the last day

    @property
    def oldest_queued_age_s(self) -> float | None:
        if self.oldest_queued_at is None:
            return None
        return max(0.0, (self.now - self.oldest_queued_at).total_seconds())


def _by_status(rows: Any) -> dict[str, int]:
    return {str(getattr(status, "value", status)): int(n) for status, n in rows if n}


def _queue(s: Session) -> tuple[int, int, int | None, datetime | None]:
    counts = _by_status(
        s.execute(
            select(Job.status, func.count())
            .where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
            .group_by(Job.status)
        ).all()
    )
    oldest = s.execute(
        select(Job.id, Job.created_at)
        .where(Job.status == JobStatus.QUEUED)
        .order_by(Job.created_at, Job.id)
        .limit(1)
    ).first()
    return (
        counts.get(JobStatus.QUEUED.value, 0),
        counts.get(JobStatus.RUNNING.value, 0),
        oldest[0] if oldest else None,
        oldest[1] if oldest else None,
    )


def _windows(s: Session, now: datetime) -> tuple[dict[str, int], dict[str, int]]:
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    rows = s.execute(
        select(Job.status, func.sum(case((Job.created_at >= hour, 1), else_=0)), func.count())
        .where(Job.created_at >= day)
        .group_by(Job.status)
    ).all()
    return _by_status((st, h) for st, h, _ in rows), _by_status((st, d) for st, _, d in rows)


def _models(s: Session, now: datetime) -> list[ModelRate]:
    rows = s.execute(
        select(Result.model, func.count(), func.sum(case((Result.positive, 1), else_=0)))
        .where(Result.created_at >= now - timedelta(days=1))
        .group_by(Result.model)
        .order_by(Result.model)
    ).all()
    return [ModelRate(model, int(n), int(pos or 0)) for model, n, pos in rows]


def _sends(s: Session) -> SendSummary:
    by_status = _by_status(s.execute(select(Send.status, func.count()).group_by(Send.status)).all())
    last = s.execute(
        select(SendAttempt.detail, SendAttempt.finished_at, Send.destination, Send.job_id)
        .join(Send, SendAttempt.send_id == Send.id)
        .where(Send.status.in_(_UNRESOLVED), SendAttempt.outcome == "failed")
        .order_by(SendAttempt.id.desc())
        .limit(1)
    ).first()
    if last is None:
        return SendSummary(by_status)
    return SendSummary(by_status, last[0], last[1], last[2], last[3])


def disk(settings: Settings) -> Disk:
    """Free space under ``[node] storage_dir`` and the ``min_free_disk_mb`` reserve."""
    folder = settings.node.storage_dir
    reserve = settings.node.min_free_disk_mb * 2**20
    try:
        return Disk(folder, free_bytes(folder), reserve)
    except OSError as exc:
        return Disk(folder, None, reserve, exc.strerror or str(exc))


def _thumbnails(s: Session, job_ids: list[int]) -> dict[int, int]:
    """``{job id: output id}`` of the picture to show for each job: its summary, else its first SC."""
    if not job_ids:
        return {}
    rows = s.execute(
        select(Output.job_id, Output.kind, Output.id)
        .where(Output.job_id.in_(job_ids), Output.kind.in_(THUMBNAIL_KINDS), Output.purged_at.is_(None))
        .order_by(Output.id)
    ).all()
    chosen: dict[int, tuple[int, int]] = {}  # job -> (rank of the kind, output id)
    for job_id, kind, output_id in rows:
        rank = THUMBNAIL_KINDS.index(kind)
        if job_id not in chosen or rank < chosen[job_id][0]:
            chosen[job_id] = (rank, output_id)
    return {job_id: output_id for job_id, (_, output_id) in chosen.items()}


def _holders(s: Session, now: datetime) -> list[Holder]:
    rows = s.execute(
        select(Job.leased_by, func.count(), func.max(Job.lease_until))
        .where(Job.status == JobStatus.RUNNING)
        .group_by(Job.leased_by)
        .order_by(Job.leased_by)
    ).all()
    out = []
    for worker, n, until in rows:
        until = None if until is None else (until if until.tzinfo else until.replace(tzinfo=UTC))
        out.append(Holder(worker or "(unknown)", int(n), until, until is not None and until < now))
    return out


def overview(s: Session, settings: Settings, recent: int, now: datetime | None = None) -> Overview:
    """The page's figures; ``recent`` newest jobs, as ``gradcam-node jobs --json --limit recent``."""
    now = now or utcnow()
    depth, running, oldest_job, oldest_at = _queue(s)
    hour, day = _windows(s, now)
    records = job_records(s, recent)
    thumbs = _thumbnails(s, [r["job_id"] for r in records])
    for r in records:
        r["thumbnail"] = thumbs.get(r["job_id"])
    return Overview(
        now=now,
        queue_depth=depth,
        running=running,
        oldest_queued_job=oldest_job,
        oldest_queued_at=oldest_at,
        last_hour=hour,
        last_day=day,
        models=_models(s, now),
        sends=_sends(s),
        disk=disk(settings),
        recent=records,
        holders=_holders(s, now),
        workers=seen_workers(s, now, settings.worker.lease_s),
    )


def job_detail(s: Session, job_id: int) -> dict[str, Any] | None:
    """One job as ``jobs --json`` shows it, plus output ids, every send attempt and the association."""
    job = s.scalar(
        select(Job)
        .where(Job.id == job_id)
        .options(selectinload(Job.instance), selectinload(Job.results), selectinload(Job.outputs))
        .options(selectinload(Job.sends).selectinload(Send.attempts_log))
    )
    if job is None:
        return None
    record = job_record(job)
    for shown, row in zip(record["outputs"], job.outputs, strict=True):
        shown["id"] = row.id
        shown["thumbnail"] = row.id if row.kind in THUMBNAIL_KINDS and row.purged_at is None else None
    for shown, send in zip(record["sends"], job.sends, strict=True):
        shown.update(ae_title=send.ae_title, host=send.host, port=send.port)
        shown["attempts_log"] = [
            {
                "started_at": iso(a.started_at),
                "finished_at": iso(a.finished_at),
                "outcome": a.outcome,
                "detail": a.detail,
            }
            for a in send.attempts_log
        ]
    assoc_id = job.instance.association_id
    assoc = s.get(Association, assoc_id) if assoc_id is not None else None
    record["association"] = (
        None
        if assoc is None
        else {
            "id": assoc.id,
            "calling_ae": assoc.calling_ae,
            "called_ae": assoc.called_ae,
            "peer": f"{assoc.peer_host}:{assoc.peer_port}",
            "status": assoc.status.value,
            "reason": assoc.reason,
            "started_at": iso(assoc.started_at),
            "n_received": assoc.n_received,
            "n_failed": assoc.n_failed,
        }
    )
    return record
