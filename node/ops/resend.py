"""``gradcam-node resend``: queue new sends of outputs the node has already made.

A job's Send to a destination is put back to ``pending`` (attempts from 0, due now, the destination's
address as configured now; ``last_error`` stays until the next attempt replaces it), or made if the job has
none to its reply destination. The node's sender (any process of it) then sends it like any other. A job
without outputs, or whose output files were purged or are missing, is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, selectinload

from gradcam.errors import ConfigError
from node.config import Destination, Settings
from node.db import Delivery, Job, Send, SendStatus, utcnow
from node.db.doorbell import SENDS, ring
from node.ops.record import Report
from node.send.outbox import create_send

__all__ = ["resend", "jobs_with_failed_sends"]

_ERROR_SHOWN = 120  # characters of a send's last error in a line


def jobs_with_failed_sends(session: Session) -> list[int]:
    """Ids of the jobs with at least one ``failed`` send, oldest first."""
    stmt = select(Send.job_id).where(Send.status == SendStatus.FAILED).distinct().order_by(Send.job_id)
    return list(session.scalars(stmt))


def _where(dest: Destination) -> str:
    return f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"


def _short(text: str | None) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= _ERROR_SHOWN else text[: _ERROR_SHOWN - 3] + "..."


def _unsendable(job: Job) -> str | None:
    """Why the outputs of ``job`` cannot be sent again, or None."""
    if not job.outputs:
        why = f"job is {job.status.value}" + (f": {job.reason}" if job.reason else "")
        return f"no outputs to send ({why})"
    purged = [o.purged_at for o in job.outputs if o.purged_at is not None]
    if purged:
        return f"its output files were purged on {min(purged):%Y-%m-%d %H:%M} UTC"
    missing = [o.path for o in job.outputs if not Path(o.path).is_file()]
    if missing:
        return f"{len(missing)} of its {len(job.outputs)} output files are missing, e.g. {missing[0]}"
    return None


def _reset(session: Session, send: Send, dest: Destination, now: datetime) -> tuple[str, bool]:
    """Put a finished send back to pending (guarded: a send the sender holds is left alone); what
    happened, and whether it was reset."""
    before, attempts, error = send.status, send.attempts, send.last_error
    if before is SendStatus.PENDING:
        return f"send {send.id} is already pending", False
    if before is SendStatus.SENDING:
        return f"send {send.id} is being sent now", False
    changed = session.execute(
        update(Send)
        .where(Send.id == send.id, Send.status.in_((SendStatus.SENT, SendStatus.FAILED)))
        .values(
            status=SendStatus.PENDING,
            attempts=0,
            next_attempt_at=now,
            sent_at=None,
            ae_title=dest.ae_title,
            host=dest.host,
            port=dest.port,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if changed != 1:
        return f"send {send.id} changed meanwhile; left alone", False
    ring(session, SENDS)  # a sender on another machine starts at once (PostgreSQL)
    if before is SendStatus.SENT:
        # asked to send a delivered job again: every file goes again. A failed send keeps the record of
        # the files the destination did acknowledge, and goes on with the others.
        session.execute(delete(Delivery).where(Delivery.send_id == send.id))
    was = f"was {before.value} after {attempts} attempt(s)"
    if before is SendStatus.FAILED and error:
        was += f": {_short(error)}"
    return f"send {send.id} pending again ({was})", True


def _resend_job(
    session: Session, settings: Settings, job: Job, failed_only: bool, now: datetime
) -> list[tuple[str, bool]]:
    """(line, queued) per send of one job whose outputs are sendable; LookupError says why to refuse it."""
    if failed_only:
        targets = [s for s in job.sends if s.status is SendStatus.FAILED]
    else:
        dest = settings.destination_for_caller(job.reply_ae)
        if dest is None:
            raise LookupError(
                f"no destination for calling AE {job.reply_ae!r} and no [routing] default_destination "
                f"in {settings.path}"
            )
        targets = [s for s in job.sends if s.destination == dest.name]
        if not targets:
            send_id = create_send(session, job.id, dest, now)
            return [(f"job {job.id} -> {_where(dest)}: send {send_id} queued (new)", True)]
    dests = []
    for send in targets:  # every destination checked before any send changes: all of the job or nothing
        try:
            dests.append(settings.destination(send.destination))
        except ConfigError:
            raise LookupError(
                f"destination {send.destination!r} of send {send.id} is no longer in [[destinations]] of "
                f"{settings.path}"
            ) from None
    lines = []
    for send, dest in zip(targets, dests, strict=True):
        what, queued = _reset(session, send, dest, now)
        lines.append((f"job {job.id} -> {_where(dest)}: {what}", queued))
    return lines


def resend(
    session: Session,
    settings: Settings,
    job_ids: Sequence[int] | None,
    now: datetime | None = None,
) -> Report:
    """Queue new sends of the outputs of ``job_ids``, or of every job with a failed send when None.

    With ``job_ids`` each job's send to its reply destination (``Settings.destination_for_caller``, as
    configured now) is reset or made; with None, each failed send is reset, to its own destination. The
    caller commits ``session``. One line per send (or per refused job) in the report.
    """
    now = now or utcnow()
    failed_only = job_ids is None
    ids = jobs_with_failed_sends(session) if job_ids is None else list(dict.fromkeys(job_ids))
    report = Report()
    if failed_only and not ids:
        report.note("no job has a failed send")
    jobs = {
        j.id: j
        for j in session.scalars(
            select(Job).where(Job.id.in_(ids)).options(selectinload(Job.outputs), selectinload(Job.sends))
        )
    }
    for job_id in ids:
        job = jobs.get(job_id)
        why = "no such job" if job is None else _unsendable(job)
        if why is None:
            assert job is not None
            try:
                lines = _resend_job(session, settings, job, failed_only, now)
            except LookupError as exc:
                why = str(exc)
        if why is not None:
            report.refuse(f"job {job_id}: refused: {why}")
            continue
        for line, queued in lines:
            (report.ok if queued else report.note)(line)
    return report
