"""Durable outbox: the queries behind sending results (one Send per job and destination).

A Send is ``pending`` until it is due (``next_attempt_at``), ``sending`` while a sender holds it (under a
lease, :mod:`node.db.leases`: a send whose sender vanished is claimed again once the lease runs out), then
``sent`` or, after ``outbox.max_attempts`` failed attempts, ``failed``. Every attempt is kept as a
SendAttempt with its outcome and per-instance statuses, so an operator can see why results did not arrive.

Each file the destination acknowledges is recorded at once (:class:`~node.db.Delivery`): an attempt cut
short, by a lost association or a kill, is followed by one that sends only the files not yet delivered.

The statements that run for every job sent are built once, here, and executed with parameters: SQLAlchemy
then finds their compiled form without walking a new statement each time (measured on SQLite: a query for
due sends in 195 us of CPU instead of 365, a delivery recorded in 200 instead of 255).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, OutboxConfig
from node.db import Delivery, Output, Send, SendAttempt, SendStatus, holder_id, utcnow
from node.db.doorbell import SENDS, ring

__all__ = [
    "OutgoingFile",
    "SendWork",
    "backoff_delay",
    "as_utc",
    "create_send",
    "due_send_ids",
    "next_due_at",
    "claim_send",
    "record_delivery",
    "record_attempt",
]


@dataclass(frozen=True)
class OutgoingFile:
    """One output instance to C-STORE."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    kind: str
    model: str | None


@dataclass(frozen=True)
class SendWork:
    """A claimed Send: where to, which files, and which attempt this is (1-based)."""

    send_id: int
    job_id: int
    destination: str
    ae_title: str
    host: str
    port: int
    attempt: int
    files: tuple[OutgoingFile, ...]  # the job's outputs not yet delivered to this destination
    delivered: int = 0  # files delivered by earlier attempts


def backoff_delay(attempts: int, cfg: OutboxConfig) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: doubling from the initial delay, capped."""
    if attempts < 1:
        return 0.0
    # min() before the power would overflow for absurd attempt counts; cap the exponent instead.
    return min(cfg.backoff_initial_s * 2.0 ** min(attempts - 1, 64), cfg.backoff_max_s)


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; every stored time is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def create_send(session: Session, job_id: int, dest: Destination, now: datetime | None = None) -> int:
    """Add a pending Send for a job, due at once (the caller commits it with the job's results); its id.
    Senders are rung at the commit (on PostgreSQL, :mod:`node.db.doorbell`)."""
    now = now or utcnow()
    row = {
        "job_id": job_id,
        "destination": dest.name,
        "ae_title": dest.ae_title,
        "host": dest.host,
        "port": dest.port,
        "status": SendStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
    }
    (send_id,) = session.execute(_CREATE_SEND, row).inserted_primary_key
    ring(session, SENDS)
    return int(send_id)


def _due_clause(now: object):  # noqa: ANN202 - an SQLAlchemy boolean clause
    due = (Send.status == SendStatus.PENDING) & or_(
        Send.next_attempt_at.is_(None), Send.next_attempt_at <= now
    )
    # held by a sender that vanished (rows without a lease, from before leases, are recover()'s)
    orphaned = (Send.status == SendStatus.SENDING) & (Send.lease_until < now)
    return or_(due, orphaned)


_CREATE_SEND = insert(Send.__table__)
_NOW = bindparam("now")
_SEND_ID = bindparam("send_id")

_DUE = (
    select(Send.id)
    .where(_due_clause(_NOW))
    .order_by(Send.next_attempt_at.is_not(None), Send.next_attempt_at, Send.id)
    .limit(bindparam("limit"))
)


def due_send_ids(session: Session, now: datetime | None = None, limit: int = 100) -> list[int]:
    """Ids of pending sends that are due, oldest due first."""
    return list(session.scalars(_DUE, {"now": now or utcnow(), "limit": limit}))


def next_due_at(session: Session) -> datetime | None:
    """When the earliest pending send becomes due (None when nothing is pending)."""
    pending = session.scalar(select(func.count()).where(Send.status == SendStatus.PENDING))
    if not pending:
        return None
    earliest = session.scalar(select(func.min(Send.next_attempt_at)).where(Send.status == SendStatus.PENDING))
    if earliest is None:
        # a pending send without a due time is due now
        return utcnow()
    return as_utc(earliest)


# claim_send's statements (plain rows, no ORM objects: they run for every job sent)
_LOCK_DUE_SEND = (
    select(Send.job_id, Send.destination, Send.ae_title, Send.host, Send.port, Send.attempts)
    .where(Send.id == _SEND_ID, _due_clause(_NOW))
    .with_for_update(skip_locked=True)
)
_CLAIM_SEND = (
    update(Send)
    .where(Send.id == _SEND_ID, _due_clause(_NOW))
    .values(
        status=SendStatus.SENDING,
        attempts=Send.attempts + 1,
        leased_by=bindparam("holder"),
        lease_until=bindparam("until"),
    )
    .execution_options(synchronize_session=False)
)
_DELIVERED = select(Delivery.sop_instance_uid).where(Delivery.send_id == _SEND_ID)
_OUTPUTS = (
    select(Output.sop_class_uid, Output.sop_instance_uid, Output.path, Output.kind, Output.model)
    .where(Output.job_id == bindparam("job_id"))
    .order_by(Output.id)
)
_RECORD_DELIVERY = insert(Delivery.__table__)


def claim_send(
    factory: sessionmaker[Session],
    send_id: int,
    now: datetime | None = None,
    *,
    holder: str = "",
    lease_s: float = 30.0,
) -> SendWork | None:
    """Atomically move one due send to ``sending`` under a lease to ``holder`` (default: this process)
    and count the attempt; None if another sender holds it (``FOR UPDATE SKIP LOCKED`` on PostgreSQL) or
    took it first."""
    now = now or utcnow()
    params = {"send_id": send_id, "now": now}
    with factory.begin() as session:
        send = session.execute(_LOCK_DUE_SEND, params).first()
        if send is None:
            return None
        claimed = session.execute(
            _CLAIM_SEND,
            {**params, "holder": holder or holder_id(), "until": now + timedelta(seconds=lease_s)},
        ).rowcount
        if claimed != 1:
            return None
        done = set(session.scalars(_DELIVERED, params))
        files = tuple(
            OutgoingFile(sop_class, uid, Path(path), kind, model)
            for sop_class, uid, path, kind, model in session.execute(_OUTPUTS, {"job_id": send.job_id})
            if uid not in done
        )
        return SendWork(
            send_id=send_id,
            job_id=send.job_id,
            destination=send.destination,
            ae_title=send.ae_title,
            host=send.host,
            port=send.port,
            attempt=send.attempts + 1,
            files=files,
            delivered=len(done),
        )


def record_delivery(factory: sessionmaker[Session], send_id: int, sop_instance_uid: str, status: int) -> None:
    """The destination acknowledged one file of a send: it is not sent again by a later attempt. One plain
    INSERT (this runs for every file sent); a delivery recorded already is left as it is."""
    row = {
        "send_id": send_id,
        "sop_instance_uid": sop_instance_uid,
        "status": status,
        "delivered_at": utcnow(),
    }
    try:
        with factory.begin() as session:
            session.execute(_RECORD_DELIVERY, row)
    except IntegrityError:
        pass  # the same file acknowledged twice (sent again after a kill): one record is enough


# record_attempt's statements
_ATTEMPTS = select(Send.attempts).where(Send.id == _SEND_ID)
_RECORD_ATTEMPT = insert(SendAttempt.__table__)
_END_ATTEMPT = (
    update(Send)
    .where(Send.id == _SEND_ID)
    .values(
        status=bindparam("new_status"),
        sent_at=func.coalesce(bindparam("sent"), Send.sent_at),
        last_error=bindparam("error"),
        next_attempt_at=bindparam("next_at"),
        leased_by=None,
        lease_until=None,
    )
    .execution_options(synchronize_session=False)
)


def record_attempt(
    factory: sessionmaker[Session],
    work: SendWork,
    started_at: datetime,
    finished_at: datetime,
    ok: bool,
    detail: str,
    cfg: OutboxConfig,
) -> tuple[SendStatus, datetime | None]:
    """Store one attempt and move the send on: sent, pending again after a backoff, or failed.

    Returns the new status and, when pending, the time of the next attempt.
    """
    with factory.begin() as session:
        attempts = session.scalar(_ATTEMPTS, {"send_id": work.send_id})
        if attempts is None:
            raise LookupError(f"send {work.send_id} vanished while it was being sent")
        next_at: datetime | None = None
        if ok:
            status = SendStatus.SENT
        elif attempts >= cfg.max_attempts:
            status = SendStatus.FAILED
        else:
            status = SendStatus.PENDING
            next_at = finished_at + timedelta(seconds=backoff_delay(attempts, cfg))
        session.execute(
            _RECORD_ATTEMPT,
            {
                "send_id": work.send_id,
                "started_at": started_at,
                "finished_at": finished_at,
                "outcome": "sent" if ok else "failed",
                "detail": detail,
                "send_status": status.value,
            },
        )
        session.execute(
            _END_ATTEMPT,
            {
                "send_id": work.send_id,
                "new_status": status,
                "sent": finished_at if ok else None,
                "error": None if ok else detail,
                "next_at": next_at,
            },
        )
        return status, next_at
