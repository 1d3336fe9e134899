"""Wake-ups between the node's threads (the database is the queue; this only says "look now")."""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["JobSignal", "Notifier"]


class Notifier(Protocol):
    """Anything that can be told "look now": a :class:`JobSignal`, or a pipe to another process."""

    def notify(self) -> None: ...


class JobSignal:
    """A sticky wake-up: :meth:`notify` after a commit, :meth:`wait` in the consumer's loop.

    A notification sent while nobody waits is kept, so the next :meth:`wait` returns at once: a job
    committed between the consumer's database poll and its wait is never slept over. The consumer must
    still poll the database after every wake-up (and after a timeout): a signal carries no data.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending = False

    def notify(self) -> None:
        """Wake every waiter (or the next one to wait)."""
        with self._cond:
            self._pending = True
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Return when notified (at once if a notification is pending) or after ``timeout`` seconds."""
        with self._cond:
            if not self._pending:
                self._cond.wait(timeout)
            self._pending = False

    @property
    def pending(self) -> bool:
        """Whether a notification is waiting to be consumed."""
        with self._cond:
            return self._pending
