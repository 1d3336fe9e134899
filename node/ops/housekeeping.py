"""The thread of ``serve`` that runs ``[retention]``: every ``interval_h`` (first at start) it purges the
files :mod:`node.ops.purge` lets go and records the run (command ``retention``) like an operator's.

(Work that other processes queue, ``gradcam-node reprocess`` or ``resend`` or another machine's worker, is
found by the workers and the sender themselves: they look every ``[worker] poll_s`` when idle.)
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.ops.purge import PurgeReport, Rules, purge
from node.ops.record import log_operation, record_operation

__all__ = ["Housekeeping", "run_retention"]

log = logging.getLogger("node.ops")

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
    """Thread: retention runs (see the module)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
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
        if not self.settings.retention.enabled:
            return
        while not self._stop.is_set():
            self._stop.wait(self._retention())

    def _retention(self) -> float:
        """Run the retention once; seconds until the next run."""
        interval = self.settings.retention.interval_h * 3600.0
        try:
            run_retention(self.settings, self.sessions, self._stop)
        except Exception:  # noqa: BLE001 - the node goes on; the next run tries again
            log.exception("retention run failed; trying again in %.0f s", min(interval, _RETRY_AFTER_ERROR_S))
            return min(interval, _RETRY_AFTER_ERROR_S)
        return interval
