"""Leases: how a process holds a running job or a send in progress, and how others take it back.

A claim writes the holder (``host:pid``, :func:`holder_id`) and a deadline, ``lease_until``, into the row;
the holder's :class:`LeaseKeeper` pushes the deadline on while it works. A process that vanishes (killed,
its machine gone) stops renewing, and once the deadline has passed any worker may claim the job again
(:mod:`node.work.claim`; sends: :mod:`node.send.outbox`). Nothing has to restart for that.

:func:`recover` is the fast path on one machine: a process that starts gives back at once what processes
of its own host that no longer exist were holding, instead of waiting for their leases to run out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Collection
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.db.tables import Job, JobStatus, Send, SendStatus, utcnow

__all__ = ["holder_id", "recover", "LeaseKeeper"]

log = logging.getLogger(__name__)


def holder_id() -> str:
    """This process as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(holder: str | None) -> bool:
    """Whether ``holder`` was a process of this host that no longer exists (or no holder was recorded,
    as by releases before leases). Holders on other hosts are never judged from here."""
    if not holder:
        return True
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, another user's
    return False


def recover(sessions: sessionmaker[Session]) -> tuple[int, int]:
    """Give back the jobs and sends that dead processes of this host held; call when a process starts.

    Their jobs are ``queued`` again and their sends ``pending`` again, due now. Attempt counters are kept
    (an attempt is counted when a job is claimed), so a job that kills its worker every time still runs
    out of attempts (:func:`node.work.claim.claim_jobs`).

    Returns
    -------
    tuple[int, int]
        The number of jobs and of sends given back.
    """
    now = utcnow()
    with sessions.begin() as s:
        held_jobs = s.execute(select(Job.id, Job.leased_by).where(Job.status == JobStatus.RUNNING)).all()
        held_sends = s.execute(select(Send.id, Send.leased_by).where(Send.status == SendStatus.SENDING)).all()
        job_ids = [i for i, holder in held_jobs if _gone(holder)]
        send_ids = [i for i, holder in held_sends if _gone(holder)]
        if job_ids:
            s.execute(
                update(Job)
                .where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING)
                .values(
                    status=JobStatus.QUEUED,
                    started_at=None,
                    next_attempt_at=None,
                    leased_by=None,
                    lease_until=None,
                )
                .execution_options(synchronize_session=False)
            )
        if send_ids:
            s.execute(
                update(Send)
                .where(Send.id.in_(send_ids), Send.status == SendStatus.SENDING)
                .values(status=SendStatus.PENDING, next_attempt_at=now, leased_by=None, lease_until=None)
                .execution_options(synchronize_session=False)
            )
    if job_ids or send_ids:
        log.warning(
            "recovered after an unclean stop: %d job(s) re-queued, %d send(s) pending again",
            len(job_ids),
            len(send_ids),
        )
    return len(job_ids), len(send_ids)


class LeaseKeeper:
    """A thread that renews the leases of what this process is working on, every third of ``lease_s``.

    ``held`` answers which job ids and which send ids that is, at each round: a job this process gave up
    on without being able to record it (the database was down) is no longer renewed, so its lease runs
    out and another worker claims it.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        holder: str,
        lease_s: float,
        held: Callable[[], tuple[Collection[int], Collection[int]]],
    ) -> None:
        self.sessions = sessions
        self.holder = holder
        self.lease_s = lease_s
        self.held = held
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def renew(self) -> None:
        """Push the deadline of what this process works on to ``lease_s`` from now."""
        job_ids, send_ids = self.held()
        if not job_ids and not send_ids:
            return
        until = utcnow() + timedelta(seconds=self.lease_s)
        with self.sessions.begin() as s:
            for table, ids in ((Job, job_ids), (Send, send_ids)):
                if ids:
                    s.execute(
                        update(table)
                        .where(table.id.in_(list(ids)), table.leased_by == self.holder)
                        .values(lease_until=until)
                        .execution_options(synchronize_session=False)
                    )

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except OperationalError as exc:  # the next round tries again; a lease lasts three rounds
                log.warning("cannot renew leases yet: %s", exc)
