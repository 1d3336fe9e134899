"""The job queue as a worker sees it: claim due jobs under a lease, and give a failed one back.

A job is claimable when it is ``queued`` and due, or ``running`` under a lease that ran out (its worker
vanished: killed, out of memory, its machine gone). Claims take the rows with ``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so workers on many machines never wait for each other nor take the same job; on
SQLite the transaction's write lock (``BEGIN IMMEDIATE``) does the same for the processes of one machine.

An attempt is counted when the job is claimed. A job that comes back to the queue with its attempts spent
never finished any of them: its worker died every time, and the claim ends it ``failed`` instead of
killing another worker with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import Instance, Job, JobStatus, holder_id, utcnow

__all__ = ["ClaimedJob", "claim_jobs", "next_job_due", "give_back"]


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds (status ``running``, leased to it)."""

    job_id: int
    attempt: int
    reply_ae: str
    sop_instance_uid: str
    path: Path
    started_at: datetime
    revision: int = 1  # of the source image (node.receive.revision): its outputs' UIDs depend on it


def _claimable(now: object):  # noqa: ANN202 - an SQLAlchemy boolean clause
    due = (Job.status == JobStatus.QUEUED) & or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)
    # held by a worker that vanished (rows without a lease, from before leases, are recover()'s)
    orphaned = (Job.status == JobStatus.RUNNING) & (Job.lease_until < now)
    return or_(due, orphaned)


def _died_reason(attempts: int, earlier: str | None) -> str:
    if earlier:
        return f"gave up after {attempts} attempts: the last one's worker died (before that: {earlier})"
    return (
        f"worker died {attempts} times while analysing it (killed, out of memory, crashed?): not tried again"
    )


# claim_jobs' statements, built once: they run for every batch
_CLAIMABLE = (
    select(
        Job.id,
        Job.attempts,
        Job.reason,
        Job.reply_ae,
        Instance.sop_instance_uid,
        Instance.path,
        Instance.revision,
    )
    .join(Instance, Instance.id == Job.instance_id)
    .where(_claimable(bindparam("now")))
    .order_by(Job.id)
    .limit(bindparam("limit"))
    .with_for_update(of=Job, skip_locked=True)
)
_DIED = (
    update(Job)
    .where(Job.id == bindparam("job_id"))
    .values(
        status=JobStatus.FAILED,
        reason=bindparam("why"),
        finished_at=bindparam("now"),
        next_attempt_at=None,
        leased_by=None,
        lease_until=None,
    )
    .execution_options(synchronize_session=False)
)
_CLAIM = (
    update(Job)
    .where(Job.id == bindparam("job_id"))
    .values(
        status=JobStatus.RUNNING,
        started_at=bindparam("now"),
        attempts=bindparam("attempt"),
        leased_by=bindparam("holder"),
        lease_until=bindparam("until"),
    )
    .execution_options(synchronize_session=False)
)


def claim_jobs(
    factory: sessionmaker[Session],
    limit: int,
    now: datetime | None = None,
    *,
    holder: str = "",
    lease_s: float = 30.0,
    max_attempts: int = 3,
) -> list[ClaimedJob]:
    """Take up to ``limit`` claimable jobs (oldest first), ``running`` under a lease to ``holder``
    (default: this process).

    A claimable job whose attempts are spent is ended ``failed`` (its worker died each time) and not
    returned.
    """
    now = now or utcnow()
    lease = {"holder": holder or holder_id(), "until": now + timedelta(seconds=lease_s), "now": now}
    claimed: list[ClaimedJob] = []
    with factory.begin() as s:
        rows = s.execute(_CLAIMABLE, {"now": now, "limit": limit}).all()
        for job_id, attempts, reason, reply_ae, uid, path, revision in rows:
            if attempts >= max_attempts:
                s.execute(_DIED, {"job_id": job_id, "why": _died_reason(attempts, reason), "now": now})
                continue
            s.execute(_CLAIM, {"job_id": job_id, "attempt": attempts + 1, **lease})
            claimed.append(ClaimedJob(job_id, attempts + 1, reply_ae, uid, Path(path), now, revision))
    return claimed


def held_by(holder: str, job_id: int):  # noqa: ANN201 - an SQLAlchemy boolean clause
    """The job is still ``running`` under ``holder``'s lease (not taken over after it ran out)."""
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.leased_by == holder)


def give_back(factory: sessionmaker[Session], holder: str, job_id: int, values: dict[str, object]) -> bool:
    """End ``holder``'s lease on a job with ``values`` (queued for a retry, or failed); False if the job
    was no longer its own."""
    with factory.begin() as s:
        return (
            s.execute(
                update(Job)
                .where(held_by(holder, job_id))
                .values(leased_by=None, lease_until=None, **values)
                .execution_options(synchronize_session=False)
            ).rowcount
            == 1
        )


def next_job_due(session: Session) -> datetime | None:
    """When a worker next has something to claim without being told: the earliest scheduled retry, or the
    earliest lease to run out (None if neither)."""
    retry = session.scalar(
        select(func.min(Job.next_attempt_at)).where(
            Job.status == JobStatus.QUEUED, Job.next_attempt_at.is_not(None)
        )
    )
    lease = session.scalar(select(func.min(Job.lease_until)).where(Job.status == JobStatus.RUNNING))
    times = [t for t in (retry, lease) if t is not None]
    return min(times) if times else None
