"""``gradcam-node serve``: the node's process, from start to a clean stop.

``serve`` receives (:mod:`node.receive`) and sends (:mod:`node.send`); it starts ``[worker] processes``
worker processes (:mod:`node.work.pool`) that analyse, and serves the status page (:mod:`node.http`).

Start: the checks that are quick (:mod:`node.checks`: the listening port is free, the spool folder is
writable, the database opens, with its schema and crash recovery), then the workers (each loads the models:
seconds) and the sender, then the SCP. Whatever prevents the start is a :class:`StartError` whose one-line
message says what to do (a worker's own, such as a missing checkpoint, included). Stop on SIGTERM/SIGINT:
the SCP first (no new associations), then the workers finish their batches, then the sender, then the
engine is disposed.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from sqlalchemy.orm import sessionmaker

from node.checks import (
    StartError,
    check_http_port,
    check_port,
    check_spool,
    http_error,
    listen_error,
    open_database,
)
from node.config import Settings
from node.queue import JobSignal
from node.tls import check_files as check_tls_files

# torch, the models, pynetdicom and the output builders are imported by _run only: they take seconds to
# import, and the start-up checks before them must answer in a moment

__all__ = ["StartError", "serve"]

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


def _content_key(settings: Settings, sessions: sessionmaker) -> str | None:
    """The configuration's content key (:class:`node.outputs.identity.OutputContext`), which tells the
    receiver whether an image sent again must be analysed again; None when this machine has not got the
    checkpoints (a receiver whose workers run elsewhere): then an image sent again is not re-analysed."""
    from gradcam.models import file_sha256
    from node.db.device import device_uid
    from node.outputs import OutputContext

    try:
        models = [(m, file_sha256(m.checkpoint)) for m in settings.core.enabled_models]
    except OSError as exc:
        log.warning(
            "checkpoint %s cannot be read here (%s): images sent again are not analysed again after a "
            "configuration change",
            exc.filename,
            exc.strerror or exc,
        )
        return None
    device = device_uid(sessions, settings.node.device_uid)  # no part of the key; the context needs one
    return OutputContext.of(models, settings.core.render, settings.outputs, device).content_key


def _start_work(settings: Settings, sessions: sessionmaker) -> tuple[Any, Any]:
    """The sender, and the worker processes (each loads its models: seconds)."""
    from node.send.sender import Sender
    from node.work.pool import WorkerPool

    send_signal = JobSignal()
    sender = Sender(settings, sessions, send_signal)
    workers = WorkerPool(settings, send_signal)
    if settings.worker.processes:
        models = ", ".join(m.name for m in settings.core.enabled_models)
        log.info(
            "starting %d worker process(es) (models: %s); this can take a few seconds",
            settings.worker.processes,
            models,
        )
    else:
        log.info("[worker] processes = 0: no local workers; `gradcam-node work` processes analyse")
    workers.start()
    sender.start()
    return workers, sender


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

    Raises :class:`StartError` (port in use, spool not writable, database unusable, model process failed)
    or the model's own :class:`~gradcam.errors.CheckpointError` when it cannot start; the command line
    prints it as one line.
    """
    check_port(settings)  # in a moment, not after the models have loaded
    check_http_port(settings)
    check_spool(settings)
    check_tls_files(settings)  # a wrong certificate or key is named now, not after the models load
    stop = threading.Event()
    previous = _install_signals(stop)
    engine = None
    try:
        engine, sessions = open_database(settings)
        if not settings.node.allowed_calling_aets:
            log.warning("allowed_calling_aets is empty: any calling AE title is accepted")
        _run(settings, sessions, stop)
    finally:
        if engine is not None:
            engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _start_http(settings: Settings, sessions: sessionmaker, liveness: Any) -> Any:
    """The status page, /metrics and /healthz (node.http); None when ``[http] enabled = false``."""
    from node.http import start_http

    try:
        return start_http(settings, sessions, liveness)
    except OSError as exc:  # taken since the check
        raise http_error(settings, exc) from exc


def _run(settings: Settings, sessions: sessionmaker, stop: threading.Event) -> None:
    """The worker processes and the sender, then the SCP, until ``stop``; all stopped on the way out."""
    from node.ops.housekeeping import Housekeeping
    from node.receive.scp import start_scp

    node = settings.node
    workers = sender = server = http = housekeeping = None
    try:
        workers, sender = _start_work(settings, sessions)
        if not stop.is_set():  # a signal during model loading: skip listening altogether
            try:
                server = start_scp(
                    node,
                    sessions,
                    workers,
                    _content_key(settings, sessions),
                    settings.core.preprocess.min_side,
                )
            except OSError as exc:  # taken since the check: another program was quicker
                raise listen_error(node, settings, exc) from exc
            host, port = server.server_address[:2]
            log.info("listening on %s:%d as %s", host, port, node.ae_title)
            housekeeping = Housekeeping(settings, sessions)  # [retention]
            housekeeping.start()
            http = _start_http(
                settings,
                sessions,
                lambda: {
                    "receiver": server.socket.fileno() >= 0,  # closed by shutdown()
                    "worker": workers.is_alive(),
                    "sender": sender.is_alive(),
                },
            )
        while not stop.wait(0.5):
            pass
    finally:
        if housekeeping is not None:
            housekeeping.stop()
            housekeeping.join(_JOIN_TIMEOUT_S)
        if http is not None:
            http.stop()
        if server is not None:
            _stop_server(server)
        if workers is not None:
            workers.stop(_JOIN_TIMEOUT_S)
        _stop_part("sender", sender)
