r"""The sending threads: drain the durable outbox (:mod:`node.send.outbox`) by C-STORE over
:class:`~node.send.link.Link`\ s.

One association per destination carries the outputs of job after job. A failed attempt is recorded with its
reason and retried with exponential backoff; a send whose sender vanished is taken over when its lease runs
out, and goes on with the files not yet delivered.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import LeaseKeeper, SendStatus, holder_id, utcnow
from node.db.doorbell import SENDS, Listener
from node.queue import JobSignal
from node.send.link import Link, SendOutcome
from node.send.outbox import (
    OutgoingFile,
    SendWork,
    as_utc,
    claim_send,
    due_send_ids,
    next_due_at,
    record_attempt,
    record_delivery,
)

__all__ = ["Sender"]

log = logging.getLogger(__name__)

_DB_ERROR_PAUSE_S = 1.0
_RECORD_TRIES = 5
_LINGER_S = 1.0  # an idle association to a destination is kept this long for the next results


class Sender:
    """Threads (``outbox.associations`` of them) that send due outbox entries, each over its own
    association: sending is bound by round trips more than by CPU, so a second association nearly doubles
    the rate at which results reach the PACS. A send is claimed atomically, so no two threads send it."""

    def __init__(
        self, settings: Settings, sessionmaker: sessionmaker[Session], send_signal: JobSignal
    ) -> None:
        self.settings = settings
        self.factory = sessionmaker
        self.signal = send_signal
        self.holder = holder_id()
        self._held: set[int] = set()  # the sends the threads are sending now (their leases are renewed)
        self._held_lock = threading.Lock()
        self.leases = LeaseKeeper(sessionmaker, self.holder, settings.worker.lease_s, self._holding)
        self.doorbell = Listener(settings.database_url, SENDS, send_signal.notify)  # PostgreSQL only
        self._stop = threading.Event()
        n = settings.outbox.associations
        self._threads = [
            # the first thread keeps its association a moment for the next results; the others only help
            # with a backlog and close theirs as soon as nothing is due (an open pynetdicom association
            # costs CPU even when idle: its threads poll)
            threading.Thread(
                target=self._run, args=(_LINGER_S if i == 0 else 0.0,), name=f"sender-{i + 1}", daemon=True
            )
            for i in range(n)
        ]

    def start(self) -> None:
        """Start the threads."""
        log.info("sender started (%d associations at most)", len(self._threads))
        self.leases.start()
        self.doorbell.start()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Ask the threads to exit once the send in progress is finished."""
        self._stop.set()
        self.signal.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the threads to exit (``timeout`` for all of them together)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not self.is_alive():
            self.doorbell.stop()
            self.leases.stop()
            log.info("sender stopped")

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, linger_s: float) -> None:
        while not self._stop.is_set():
            timeout: float | None = None
            try:
                worked = self._drain(linger_s)
                if not worked:
                    timeout = self._wait_time()
            except OperationalError as exc:
                # database locked or unavailable: nothing is lost (state is in the DB); try again shortly
                log.error("sender: database error, retrying in %.0f s: %s", _DB_ERROR_PAUSE_S, exc)
                timeout, worked = _DB_ERROR_PAUSE_S, False
            except Exception:
                log.exception("sender: unexpected error; pausing before the next round")
                timeout, worked = _DB_ERROR_PAUSE_S, False
            if not worked and not self._stop.is_set():
                self.signal.wait(timeout)

    def _holding(self) -> tuple[list[int], list[int]]:
        with self._held_lock:
            return [], list(self._held)

    def _wait_time(self) -> float:
        """Until the next send is due, at most ``[worker] poll_s`` (sends that workers in other processes
        queue: those on this machine ring, the others are found by looking)."""
        with self.factory() as session:
            due = next_due_at(session)
        poll = self.settings.worker.poll_s
        return poll if due is None else min(poll, max(0.0, (due - utcnow()).total_seconds()))

    def _drain(self, linger_s: float = _LINGER_S) -> bool:
        """Send everything due, and what becomes due meanwhile; True if anything was attempted.

        Sends to the same destination share one association, kept open while results keep coming (up to
        ``linger_s`` without any): outputs flow to the PACS as each job finishes, without an association
        per job. Each send is still claimed, attempted and recorded on its own, as soon as it is done.
        """
        worked = False
        link: Link | None = None
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                with self.factory() as session:
                    ids = due_send_ids(session)
                progressed = False
                for send_id in ids:
                    if self._stop.is_set():
                        break
                    work = claim_send(
                        self.factory, send_id, holder=self.holder, lease_s=self.settings.worker.lease_s
                    )
                    if work is None:
                        continue
                    progressed = worked = True
                    if link is not None and not link.serves(work):
                        link.close()
                        link = None
                    if link is None:
                        link = Link(self.settings, work)
                    self._attempt(link, work)
                if progressed:
                    idle_since = None
                    continue
                # nothing due: keep a working association a moment for the results being written now
                if link is None or not link.usable:
                    break
                idle_since = idle_since or time.monotonic()
                remaining = linger_s - (time.monotonic() - idle_since)
                if remaining <= 0:
                    break
                self.signal.wait(remaining)
        finally:
            if link is not None:
                link.close()
        return worked

    def _attempt(self, link: Link, work: SendWork) -> None:
        with self._held_lock:
            self._held.add(work.send_id)
        try:
            try:
                outcome = link.send(work, lambda f, status: self._delivered(work, f, status))
            except Exception as exc:  # noqa: BLE001 - any network-layer surprise is one failed attempt, recorded
                log.exception("send %d: unexpected error while sending", work.send_id)
                now = utcnow()
                outcome = SendOutcome(False, f"unexpected error: {type(exc).__name__}: {exc}", now, now)
            self._log(work, outcome)
        finally:
            with self._held_lock:
                self._held.discard(work.send_id)

    def _delivered(self, work: SendWork, f: OutgoingFile, status: int) -> None:
        """Note one acknowledged file at once, so that no later attempt sends it again."""
        try:
            record_delivery(self.factory, work.send_id, f.sop_instance_uid, status)
        except OperationalError as exc:  # the attempt's record still lists it; a retry may send it again
            log.warning(
                "send %d: cannot record the delivery of %s yet: %s", work.send_id, f.sop_instance_uid, exc
            )

    def _log(self, work: SendWork, outcome: SendOutcome) -> None:
        ms = (outcome.finished - outcome.started).total_seconds() * 1000.0
        status, next_at = self._record(work, outcome.started, outcome.finished, outcome.ok, outcome.detail)
        where = f"{work.destination} ({work.ae_title}@{work.host}:{work.port})"
        if outcome.ok:
            log.info(
                "send %d job %d -> %s: sent %d instances in %.0f ms (attempt %d)",
                work.send_id,
                work.job_id,
                where,
                len(work.files),
                ms,
                work.attempt,
            )
        elif next_at is not None:
            wait_s = (as_utc(next_at) - outcome.finished).total_seconds()
            log.warning(
                "send %d job %d -> %s: attempt %d failed (%s); retry in %.1f s",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                outcome.detail,
                wait_s,
            )
        else:
            log.error(
                "send %d job %d -> %s: attempt %d failed (%s); giving up (%s)",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                outcome.detail,
                status,
            )

    def _record(
        self, work: SendWork, started: datetime, finished: datetime, ok: bool, detail: str
    ) -> tuple[SendStatus, datetime | None]:
        # The attempt happened whatever the database says; try hard to note it, else the send stays
        # 'sending' until recover() at the next start resumes it.
        for n in range(_RECORD_TRIES):
            try:
                return record_attempt(self.factory, work, started, finished, ok, detail, self.settings.outbox)
            except OperationalError as exc:
                if n == _RECORD_TRIES - 1:
                    raise
                log.warning("send %d: cannot record the attempt yet (%s); retrying", work.send_id, exc)
                time.sleep(_DB_ERROR_PAUSE_S)
        raise AssertionError("unreachable")
