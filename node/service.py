"""``gradcam-node serve``: the node's process, from start to a clean stop.

Start: database (schema, crash recovery), the worker (loads the models: seconds) and the sender, then the
SCP. Stop on SIGTERM/SIGINT: the SCP first (no new associations), then the worker finishes its batch, then
the sender, then the engine is disposed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import torch
from sqlalchemy.orm import sessionmaker

from node.config import Settings
from node.db import create_schema, make_engine, recover, session_factory
from node.queue import JobSignal
from node.scp import start_scp
from node.sender import Sender
from node.worker import Worker

__all__ = ["serve"]

log = logging.getLogger("node.service")

_ASSOC_DRAIN_S = 10.0  # running associations get this long to finish at shutdown
_JOIN_TIMEOUT_S = 600.0  # a batch of CPU inference can take a while; never hang forever on exit


def _install_signals(stop: threading.Event) -> dict[int, Any]:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    return previous


def _start_threads(settings: Settings, sessions: sessionmaker) -> tuple[Any, Any, JobSignal]:
    # this process only resizes and normalises inputs; the models run in their own process, whose cores
    # torch's idle-spinning thread pool here would only take away
    torch.set_num_threads(1)
    job_signal, send_signal = JobSignal(), JobSignal()
    models = ", ".join(m.name for m in settings.core.enabled_models)
    log.info("loading models (%s); this can take a few seconds", models)
    worker = Worker(settings, sessions, job_signal, send_signal)
    sender = Sender(settings, sessions, send_signal)
    worker.start()
    sender.start()
    return worker, sender, job_signal


def _stop_part(name: str, part: Any) -> None:
    if part is None:
        return
    part.stop()
    part.join(_JOIN_TIMEOUT_S)
    alive = getattr(part, "is_alive", None)
    if alive is not None and alive():
        log.error("%s did not stop within %.0f s", name, _JOIN_TIMEOUT_S)


def _stop_server(server: Any) -> None:
    """Stop accepting, let running associations end (their stores commit), abort what is left."""
    server.shutdown()
    deadline = time.monotonic() + _ASSOC_DRAIN_S
    while server.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.ae.active_associations:
        log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
        assoc.abort()


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM or SIGINT; 0 after a clean stop.

    Raises whatever prevents the start (bad checkpoint, port in use, database unreachable); the command
    line turns it into one error line.
    """
    node = settings.node
    stop = threading.Event()
    previous = _install_signals(stop)
    engine = make_engine(settings.database_url)
    worker = sender = server = None
    try:
        create_schema(engine)
        sessions = session_factory(engine)
        recover(sessions)
        if not node.allowed_calling_aets:
            log.warning("allowed_calling_aets is empty: any calling AE title is accepted")
        node.storage_dir.mkdir(parents=True, exist_ok=True)
        worker, sender, job_signal = _start_threads(settings, sessions)
        if not stop.is_set():  # a signal during model loading: skip listening altogether
            try:
                server = start_scp(node, sessions, job_signal, worker.context.content_key)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {node.bind}:{node.port}: {exc.strerror}") from exc
            host, port = server.server_address[:2]
            log.info("listening on %s:%d as %s", host, port, node.ae_title)
        while not stop.wait(0.5):
            pass
    finally:
        if server is not None:
            _stop_server(server)
        _stop_part("worker", worker)
        _stop_part("sender", sender)
        engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0
