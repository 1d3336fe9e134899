"""The thread of ``serve`` that keeps it going without anyone: ``[retention]``, and work from elsewhere.

- Every ``[retention] interval_h`` (first at start) it purges the files :mod:`node.ops.purge` lets go and
  records the run (command ``retention``) like an operator's.
- Every :data:`POLL_S` it wakes the worker and the sender. They are woken in-process when this node queues
  work, and otherwise sleep until their next scheduled retry; a job or a send that another process queued
  (``gradcam-node reprocess``, ``resend``, another node on the same database) would wait for the next
  reception. A wake-up costs each one query when there is nothing to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.ops.purge import PurgeReport, Rules, purge
from node.ops.record import log_operation, record_operation
from node.queue import JobSignal

__all__ = ["POLL_S", "Housekeeping", "run_retention"]

log = logging.getLogger("node.ops")

POLL_S = 2.0
_RETRY_AFTER_ERROR_S = 600.0


def run_retention(
    settings: Settings, sessions: sessionmaker[Session], stop: threading.Event | None = None
) -> PurgeReport:
    """One retention run with ``[retention]``'s days, recorded as operation ``retention``; ``stop``
    ends it early (between transactions)."""
    cfg = settings.retention
    rules = Rules(cfg.received_days, cfg.outputs_days)
    report = purge(sessions, settings.node.storage_dir, rules, stop=stop)
    summary = report.summary(rules)
    with sessions.begin() as s:
        row = record_operation(s, "retention", rules.describe(), summary, report.lines)
    log_operation(row)
    for line in report.lines:
        if line.startswith("kept"):
            log.warning("retention: %s", line)
    return report


class Housekeeping:
    """Thread: retention runs and wake-ups (see the module)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        wake: Sequence[JobSignal],
        poll_s: float = POLL_S,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.wake = tuple(wake)
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="housekeeping", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        cfg = self.settings.retention
        if cfg.enabled:
            rules = Rules(cfg.received_days, cfg.outputs_days)
            log.info("retention: %s; looked at every %g h", rules.describe(), cfg.interval_h)
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit (a retention run in progress finishes its transaction first)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        next_purge = time.monotonic() if self.settings.retention.enabled else None
        while not self._stop.is_set():
            if next_purge is not None and time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self._retention()
            for signal in self.wake:
                signal.notify()
            self._stop.wait(self.poll_s)

    def _retention(self) -> float:
        """Run the retention once; seconds until the next run."""
        interval = self.settings.retention.interval_h * 3600.0
        try:
            run_retention(self.settings, self.sessions, self._stop)
        except Exception:  # noqa: BLE001 - the node goes on; the next run tries again
            log.exception("retention run failed; trying again in %.0f s", min(interval, _RETRY_AFTER_ERROR_S))
            return min(interval, _RETRY_AFTER_ERROR_S)
        return interval
