"""``gradcam-node work``: one analysis worker as a process of its own, on this machine or any other.

It opens the database (schema brought up to date, jobs of dead local processes given back), starts its
model process on ``[worker] device``, and runs a :class:`~node.work.worker.Worker` until SIGTERM or SIGINT,
then finishes the batches in flight. It shares nothing with other processes but the database and the spool.

Started by ``serve`` (:mod:`node.work.pool`) it gets two pipes: ``--wake-fd``, on which ``serve`` says
"a job was queued" (so it need not wait for its next poll), and ``--notify-fd``, on which it says ``r``
(ready: models loaded), ``s`` (a send was queued) or ``e`` + a one-line reason (cannot start). The end of
the wake pipe means that ``serve`` is gone: the worker then stops too.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections.abc import Callable

from node.checks import StartError, check_spool, open_database
from node.config import Settings
from node.queue import JobSignal

__all__ = ["run_worker", "READY", "SEND_QUEUED", "START_ERROR", "JOB_QUEUED"]

log = logging.getLogger(__name__)

READY, SEND_QUEUED, START_ERROR, JOB_QUEUED = b"r", b"s", b"e", b"j"
_JOIN_TIMEOUT_S = 600.0


def _listen(fd: int, on_byte: Callable[[], None], on_end: Callable[[], None]) -> threading.Thread:
    """A thread that calls ``on_byte`` whenever bytes arrive on ``fd`` and ``on_end`` when it closes."""

    def run() -> None:
        while True:
            try:
                select.select([fd], [], [])
                data = os.read(fd, 512)
            except OSError:
                data = b""
            if not data:
                on_end()
                return
            on_byte()

    t = threading.Thread(target=run, name="wake", daemon=True)
    t.start()
    return t


class _PipeNotifier:
    """Tells ``serve`` that a send was queued: one byte on the notify pipe (dropped when the pipe is full:
    ``serve`` has plenty to read already and looks at the outbox anyway)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def notify(self) -> None:
        try:
            os.write(self.fd, SEND_QUEUED)
        except OSError:  # full (BlockingIOError), or serve is gone: the wake pipe's end stops this worker
            pass


def run_worker(
    settings: Settings,
    wake_fd: int | None = None,
    notify_fd: int | None = None,
    device: str | None = None,
    slot: int = 0,
) -> int:
    """Run one worker until SIGTERM or SIGINT (or, when started by ``serve``, until ``serve`` is gone)."""
    import torch

    from node.work.inference import ModelStartError
    from node.work.worker import Worker

    # this process only resizes and normalises inputs (the models run in its model process): torch's
    # thread pool here would only spin on the cores the models need (measured: 23 ms per image -> 1 ms)
    torch.set_num_threads(1)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    engine = None
    try:
        try:
            check_spool(settings)
            engine, sessions = open_database(settings)
            job_signal = JobSignal()
            send_signal = JobSignal() if notify_fd is None else _PipeNotifier(notify_fd)
            worker = Worker(settings, sessions, job_signal, send_signal, device, slot)
        except Exception as exc:
            if notify_fd is None:
                if isinstance(exc, ModelStartError):
                    raise StartError(str(exc)) from exc
                raise  # the command line prints it: one line
            # serve reports it, as its own start error: one line, once (the traceback with --debug)
            log.debug("worker cannot start", exc_info=True)
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            os.write(notify_fd, START_ERROR + line.encode("utf-8", "replace")[:4000] + b"\n")
            return 1
        if wake_fd is not None:
            _listen(wake_fd, job_signal.notify, stop.set)
        if notify_fd is not None:
            os.write(notify_fd, READY)
            os.set_blocking(notify_fd, False)
        worker.start()
        code = 0
        while not stop.wait(0.5):
            if not worker.is_alive():
                why = worker.stopped_because or "worker thread ended unexpectedly"
                log.error("%s; stopping the process", why)
                code = 1
                break
        log.info("stopping: finishing the batches in flight")
        worker.stop()
        worker.join(_JOIN_TIMEOUT_S)
        return code
    finally:
        if engine is not None:
            engine.dispose()
        for s, handler in previous.items():
            signal.signal(s, handler)
