"""The worker processes ``serve`` starts on its own machine (``[worker] processes``), and keeps running.

Each is ``gradcam-node work`` (:mod:`node.work.process`) with two pipes: ``serve`` rings the first when
the SCP has queued a job, and the worker writes on the second when it is ready and after each job that
queued a send (which rings the sender). A worker that exits while the node runs is logged and started
again; the jobs it held go back to the queue (its leases run out, or the new process gives them back at
start). At stop, every worker gets SIGTERM and finishes the batches it has in flight.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from node.checks import StartError
from node.config import Settings
from node.queue import Notifier
from node.work.process import JOB_QUEUED, READY, SEND_QUEUED, START_ERROR

__all__ = ["WorkerPool"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 600.0  # importing torch and loading the checkpoints, per worker, in parallel
_RESTART_DELAY_S = 2.0


@dataclass(eq=False)
class _Child:
    slot: int
    proc: subprocess.Popen[bytes]
    wake_w: int  # serve writes JOB_QUEUED here
    notify_r: int  # the worker writes READY / SEND_QUEUED / START_ERROR here
    ready: bool = False
    error: str = ""


class WorkerPool:
    """``settings.worker.processes`` local worker processes; :meth:`notify` rings all of them."""

    def __init__(self, settings: Settings, send_signal: Notifier) -> None:
        self.settings = settings
        self.send_signal = send_signal
        self.children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker and wait until each has loaded its models; :class:`StartError` with the
        worker's own one-line reason if one cannot start."""
        n = self.settings.worker.processes
        self.children = [self._spawn(slot) for slot in range(n)]
        deadline = time.monotonic() + _START_TIMEOUT_S
        try:
            for child in self.children:
                self._await_ready(child, deadline)
        except BaseException:
            self.stop(timeout=10.0)
            raise
        if n:
            log.info("%d worker process(es) ready: %s", n, ", ".join(str(c.proc.pid) for c in self.children))
        self._thread = threading.Thread(target=self._watch, name="workers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 600.0) -> None:
        """SIGTERM every worker, wait for them to finish their batches; kill what is left after ``timeout``
        seconds."""
        self._stopping.set()
        with self._lock:
            children = list(self.children)
        for c in children:
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker process %d did not stop within %.0f s: killed", c.proc.pid, timeout)
                c.proc.kill()
                c.proc.wait(5)
            self._close(c)
        if self._thread is not None:
            self._thread.join(5)

    def is_alive(self) -> bool:
        """Every worker process runs (True when there are none to run)."""
        with self._lock:
            return all(c.proc.poll() is None for c in self.children)

    def notify(self) -> None:
        """A job was queued: ring every worker (a full pipe already rings)."""
        with self._lock:  # not while a pipe is being closed: its number could be another file's next
            for c in self.children:
                if c.wake_w < 0:
                    continue
                try:
                    os.write(c.wake_w, JOB_QUEUED)
                except OSError:
                    pass  # full, or the worker is gone (the watcher restarts it)

    # --- children ---------------------------------------------------------------------------------------

    def _spawn(self, slot: int) -> _Child:
        wake_r, wake_w = os.pipe()
        notify_r, notify_w = os.pipe()
        os.set_blocking(wake_w, False)
        argv = [
            sys.executable,
            "-m",
            "node.cli",
            "--config",
            str(self.settings.path),
            "work",
            "--slot",
            str(slot),
            "--wake-fd",
            str(wake_r),
            "--notify-fd",
            str(notify_w),
        ]
        if log.isEnabledFor(logging.DEBUG):
            argv.append("--debug")
        proc = subprocess.Popen(argv, pass_fds=(wake_r, notify_w), stdin=subprocess.DEVNULL)
        os.close(wake_r)
        os.close(notify_w)
        return _Child(slot, proc, wake_w, notify_r)

    def _await_ready(self, child: _Child, deadline: float) -> None:
        buf = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([child.notify_r], [], [], 0.5)
            if not ready:
                if child.proc.poll() is not None:
                    break
                continue
            data = os.read(child.notify_r, 4096)
            if not data:
                break
            buf += data
            if buf.startswith(READY):
                child.ready = True
                return
            if buf.startswith(START_ERROR) and buf.endswith(b"\n"):
                raise StartError(buf[1:].decode("utf-8", "replace").strip())
        code = child.proc.poll()
        if buf.startswith(START_ERROR):
            raise StartError(buf[1:].decode("utf-8", "replace").strip())
        if code is None:
            raise StartError(f"worker process {child.proc.pid} not ready after {_START_TIMEOUT_S:.0f} s")
        raise StartError(
            f"worker process {child.proc.pid} exited during start-up (exit code {code}): see its log"
        )

    def _close(self, child: _Child) -> None:
        with self._lock:
            fds, child.wake_w, child.notify_r = (child.wake_w, child.notify_r), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _watch(self) -> None:
        """Read what the workers say (wake the sender); start a worker again when one exits."""
        while not self._stopping.is_set():
            with self._lock:
                by_fd = {c.notify_r: c for c in self.children if c.notify_r >= 0}
            try:
                readable, _, _ = select.select(list(by_fd), [], [], 0.5)
            except OSError:
                continue
            for fd in readable:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    data = b""
                if data:
                    if SEND_QUEUED in data:
                        self.send_signal.notify()
                    continue
                self._ended(by_fd[fd])
            for child in list(by_fd.values()):
                if child.proc.poll() is not None and child.notify_r not in readable:
                    self._ended(child)

    def _ended(self, child: _Child) -> None:
        with self._lock:
            replaced = child not in self.children  # seen ended already (pipe closed and process gone)
        if self._stopping.is_set() or replaced:
            return
        code = child.proc.wait()
        self._close(child)
        log.error(
            "worker process %d exited (code %s); its jobs return to the queue; starting another in %.0f s",
            child.proc.pid,
            code,
            _RESTART_DELAY_S,
        )
        if self._stopping.wait(_RESTART_DELAY_S):
            return
        new = self._spawn(child.slot)
        with self._lock:
            self.children = [new if c is child else c for c in self.children]
        try:
            self._await_ready(new, time.monotonic() + _START_TIMEOUT_S)
        except StartError as exc:
            log.error("worker process for slot %d cannot start again: %s", child.slot, exc)
