"""A worker process tells the database that it exists: the ``workers`` table (:class:`~node.db.WorkerState`).

Leases show only the workers that hold a job right now; an idle worker, or one that died between jobs, is
invisible to them. So each worker writes its row when it starts (where its models run, which models),
renews ``seen_at`` with its job counts every third of ``[worker] lease_s``, and writes ``stopped_at`` when it
stops cleanly. A row whose ``seen_at`` is older than a lease, without ``stopped_at``, is a worker that
vanished (killed, out of memory, its machine gone): the status page and ``/metrics`` say so
(:func:`state_of`). Rows not renewed for a week are deleted when a worker starts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node.db import WorkerState, utcnow

__all__ = ["Presence", "WorkerView", "seen_workers", "state_of", "ALIVE", "SILENT", "STOPPED"]

log = logging.getLogger(__name__)

ALIVE, SILENT, STOPPED = "alive", "silent", "stopped"

_KEPT = timedelta(days=7)  # rows of workers not seen for longer are deleted when a worker starts

_HOLDER = bindparam("holder_id")
_FORGET = delete(WorkerState.__table__).where(WorkerState.holder == _HOLDER)
_FORGET_OLD = delete(WorkerState.__table__).where(WorkerState.seen_at < bindparam("before"))
_ENTER = insert(WorkerState.__table__)
_BEAT = (
    update(WorkerState.__table__)
    .where(WorkerState.holder == _HOLDER)
    .values(seen_at=bindparam("now"), jobs_done=bindparam("done"), jobs_failed=bindparam("failed"))
)
_LEAVE = (  # the last beat, and the stop
    update(WorkerState.__table__)
    .where(WorkerState.holder == _HOLDER)
    .values(
        seen_at=bindparam("now"),
        stopped_at=bindparam("now"),
        jobs_done=bindparam("done"),
        jobs_failed=bindparam("failed"),
    )
)


def state_of(row: WorkerState, now: datetime, lease_s: float) -> str:
    """``stopped`` (it said so), ``alive`` (seen within a lease) or ``silent`` (not seen for longer: gone,
    or its database connection is)."""
    if row.stopped_at is not None:
        return STOPPED
    return ALIVE if now - row.seen_at <= timedelta(seconds=lease_s) else SILENT


@dataclass(frozen=True)
class WorkerView:
    """A worker process seen in the last day, as the status page, ``/metrics`` and ``gradcam-node jobs``
    show it: ``state`` is ``alive``, ``silent`` (gone without stopping) or ``stopped``."""

    worker: str  # host:pid, as in the leases it holds
    device: str
    models: str
    state: str
    started_at: datetime
    seen_at: datetime
    jobs_done: int
    jobs_failed: int

    def record(self) -> dict[str, Any]:
        """As JSON values (times in ISO 8601)."""
        out = asdict(self)
        out["started_at"] = self.started_at.isoformat(timespec="seconds")
        out["seen_at"] = self.seen_at.isoformat(timespec="seconds")
        return out


_SHOWN = timedelta(hours=24)
_ORDER = {ALIVE: 0, SILENT: 1, STOPPED: 2}


def seen_workers(session: Session, now: datetime, lease_s: float) -> list[WorkerView]:
    """The worker processes seen in the last 24 h: alive ones first, then silent, then stopped."""
    rows = session.scalars(
        select(WorkerState).where(WorkerState.seen_at >= now - _SHOWN).order_by(WorkerState.holder)
    ).all()
    views = [
        WorkerView(
            r.holder,
            r.device,
            r.models,
            state_of(r, now, lease_s),
            r.started_at,
            r.seen_at,
            r.jobs_done,
            r.jobs_failed,
        )
        for r in rows
    ]
    return sorted(views, key=lambda v: _ORDER[v.state])


class Presence:
    """This worker process's row in ``workers``: :meth:`start` writes it and starts renewing it,
    :meth:`stop` marks it stopped. ``counts`` answers (jobs done, jobs failed) since the start."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        holder: str,
        device: str,
        models: list[str],
        lease_s: float,
        counts: Callable[[], tuple[int, int]],
    ) -> None:
        self.sessions = sessions
        self.holder = holder
        self.device = device
        self.models = models
        self.interval_s = lease_s / 3  # as often as leases are renewed
        self.counts = counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)

    def start(self) -> None:
        now = utcnow()
        row = {
            "holder": self.holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "models": ", ".join(self.models),
            "started_at": now,
            "seen_at": now,
            "stopped_at": None,
            "jobs_done": 0,
            "jobs_failed": 0,
        }
        with self.sessions.begin() as s:
            s.execute(_FORGET, {"holder_id": self.holder})  # an earlier process with this pid, long gone
            s.execute(_FORGET_OLD, {"before": now - _KEPT})
            s.execute(_ENTER, row)
        self._thread.start()

    def beat(self) -> None:
        """Say that this worker is still here, with its job counts."""
        done, failed = self.counts()
        with self.sessions.begin() as s:
            s.execute(_BEAT, {"holder_id": self.holder, "now": utcnow(), "done": done, "failed": failed})

    def stop(self) -> None:
        """Stop renewing and mark the row stopped (a worker that cannot reach the database any more is
        shown silent instead)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        done, failed = self.counts()
        try:
            with self.sessions.begin() as s:
                s.execute(_LEAVE, {"holder_id": self.holder, "now": utcnow(), "done": done, "failed": failed})
        except OperationalError as exc:
            log.warning("cannot record that worker %s stopped: %s", self.holder, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OperationalError as exc:  # the next round tries again
                log.warning("cannot renew worker %s's presence yet: %s", self.holder, exc)
