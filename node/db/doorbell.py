"""Doorbells between processes on PostgreSQL: ``NOTIFY`` when a job or a send is queued, ``LISTEN`` in the
processes that take them, so that a worker on another machine starts at once instead of at its next look
(``[worker] poll_s``). A ring carries no data: whoever hears it looks at the database, as after a poll.

On SQLite there is nothing to ring with across processes; the workers that ``serve`` starts are rung
through a pipe (:mod:`node.work.pool`), others poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from node.db.tables import Job, JobStatus

__all__ = ["JOBS", "SENDS", "install_rings", "ring", "Listener"]

log = logging.getLogger(__name__)

JOBS = "gradcam_node_jobs"
SENDS = "gradcam_node_sends"
_RECONNECT_S = 5.0


def ring(session: Session, channel: str) -> None:
    """Ring ``channel`` when the session's transaction commits (PostgreSQL delivers NOTIFY at commit);
    nothing on other databases."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"NOTIFY {channel}"))


def _ring_new_jobs(session: Session, _flush_context: Any) -> None:
    if any(isinstance(o, Job) and o.status == JobStatus.QUEUED for o in session.new):
        ring(session, JOBS)


def install_rings(factory: sessionmaker[Session]) -> None:
    """Every session of ``factory`` rings :data:`JOBS` when it adds a queued job as an ORM object
    (PostgreSQL only). The paths that insert rows with plain statements, for every instance and every
    job, ring themselves: the receiving store, and :func:`node.send.outbox.create_send` for sends."""
    bind = factory.kw.get("bind")
    if bind is not None and bind.dialect.name == "postgresql":
        event.listen(factory, "after_flush", _ring_new_jobs)


class Listener:
    """A thread that calls ``on_ring`` whenever ``channel`` is rung on the PostgreSQL database at ``url``
    (its own connection; reconnects after a failure). :meth:`start` does nothing on other databases."""

    def __init__(self, url: str, channel: str, on_ring: Callable[[], None]) -> None:
        self.url = make_url(url)
        self.channel = channel
        self.on_ring = on_ring
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.url.get_backend_name() != "postgresql":
            return
        self._thread = threading.Thread(target=self._run, name=f"listen-{self.channel}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        import psycopg

        conninfo = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.on_ring()  # rings missed while (re)connecting
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.on_ring()
            except psycopg.Error as exc:
                log.warning("cannot listen for %s (%s); polling meanwhile", self.channel, str(exc).strip())
                self._stop.wait(_RECONNECT_S)
