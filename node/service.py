"""``gradcam-node serve``: the node's process, from start to a clean stop.

Start: the checks that are quick (the listening port is free, the spool folder is writable, the database
opens, with its schema and crash recovery), then the worker (loads the models: seconds) and the sender, then
the SCP. Whatever prevents the start is a :class:`StartError` (or the model's own
:class:`~gradcam.errors.CheckpointError`...) whose one-line message says what to do. Stop on SIGTERM/SIGINT:
the SCP first (no new associations), then the worker finishes its batch, then the sender, then the engine is
disposed.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import tempfile
import threading
import time
from types import FrameType
from typing import Any

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gradcam.errors import GradcamError
from node.config import NodeConfig, Settings
from node.db import create_schema, make_engine, recover, session_factory
from node.queue import JobSignal
from node.tls import check_files as check_tls_files

# torch, the models, pynetdicom and the output builders are imported by _run only: they take seconds to
# import, and the start-up checks before them must answer in a moment

__all__ = ["StartError", "serve"]

log = logging.getLogger("node.service")

_ASSOC_DRAIN_S = 10.0  # running associations get this long to finish at shutdown
_JOIN_TIMEOUT_S = 600.0  # a batch of CPU inference can take a while; never hang forever on exit


class StartError(GradcamError):
    """The node cannot start; the message says what is wrong and what to do."""


# --- start-up checks: each fails in a second with one line, not after the models have loaded ---------------


def _listen_error(node: NodeConfig, settings: Settings, exc: OSError) -> StartError:
    where = f"cannot listen on {node.bind}:{node.port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        todo = "another program (another gradcam-node?) holds the port: "
        todo += f"stop it or set [node] port in {settings.path}"
    elif exc.errno == errno.EACCES:
        todo = f"ports below 1024 need privileges: set [node] port in {settings.path} to 1024 or above"
    else:
        todo = f"set [node] bind to an address of this machine in {settings.path}"
    return StartError(f"{where}: {todo}")


def _check_port(settings: Settings) -> None:
    """Bind the listening address once and let it go: the SCP binds it for real once the models are ready."""
    node = settings.node
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            node.bind, node.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # as pynetdicom's server does: a port whose last connections are in TIME_WAIT is free
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:  # socket.gaierror included: a bind name that does not resolve
        raise _listen_error(node, settings, exc) from exc


def _check_spool(settings: Settings) -> None:
    """The spool folder exists (made if need be) and a file can be written in it."""
    folder = settings.node.storage_dir
    todo = f"set [node] storage_dir in {settings.path} to a writable folder"
    if folder.exists() and not folder.is_dir():
        raise StartError(f"spool folder {folder} is a file: {todo}")
    doing = "made"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        doing = "written"
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        detail = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(folder):
            detail += f": {exc.filename}"
        raise StartError(f"spool folder {folder} cannot be {doing} ({detail}): {todo}") from exc


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"  # it may hold a password: do not echo it


def _database_todo(reason: str, settings: Settings) -> str:
    key = f"[node] database_url in {settings.path}"
    lowered = reason.lower()
    if "not a database" in lowered:
        return f"it is not a SQLite database: point {key} at the node's database or a new file"
    if "locked" in lowered:
        return "another program holds it locked (another gradcam-node?): stop it, then start again"
    if "unable to open" in lowered or "readonly" in lowered:
        return f"the file cannot be opened for writing: check its folder and permissions, or {key}"
    if "could not parse" in lowered or "can't load plugin" in lowered:
        return f"fix {key} (e.g. sqlite:////var/lib/gradcam/node.db or postgresql+psycopg://user@host/db)"
    return f"check that the database server runs and accepts the URL's user and database, and {key}"


def _open_database(settings: Settings) -> tuple[Engine, sessionmaker]:
    """The engine and sessions, with the schema up to date and crash leftovers recovered."""
    url = settings.database_url
    shown = _shown_url(url)
    try:
        engine = make_engine(url)
    except ImportError as exc:  # create_engine imports the URL's driver
        raise StartError(
            f"database {shown}: its driver {exc.name or ''} is not installed: install it into the node's "
            f"environment or change [node] database_url in {settings.path}"
        ) from exc
    except OSError as exc:  # SQLite: the file's folder cannot be made
        if isinstance(exc, FileExistsError):
            detail = f"{exc.filename} is a file"
        else:
            detail = f"{exc.strerror or exc}: {exc.filename}"
        raise StartError(
            f"database {shown}: cannot make its folder ({detail}): "
            f"point [node] database_url in {settings.path} into a writable folder"
        ) from exc
    except SQLAlchemyError as exc:
        raise StartError(
            f"database {shown}: {_database_reason(exc, url)}: {_database_todo(str(exc), settings)}"
        ) from exc
    try:
        create_schema(engine)
        sessions = session_factory(engine)
        recover(sessions)
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = _database_reason(exc, url)
        raise StartError(
            f"database {shown} cannot be used: {reason}: {_database_todo(reason, settings)}"
        ) from exc
    return engine, sessions


def _database_reason(exc: SQLAlchemyError, url: str) -> str:
    """The driver's own message, first line, without the password should a driver repeat it."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    reason = lines[0] if lines else type(orig).__name__
    try:
        password = make_url(url).password
    except ArgumentError:
        password = None
    return reason.replace(str(password), "***") if password else reason


def _install_signals(stop: threading.Event) -> dict[int, Any]:
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    return previous


def _start_threads(settings: Settings, sessions: sessionmaker) -> tuple[Any, Any, JobSignal]:
    import torch

    from node.send.sender import Sender
    from node.work.worker import Worker

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

    Raises :class:`StartError` (port in use, spool not writable, database unusable, model process failed)
    or the model's own :class:`~gradcam.errors.CheckpointError` when it cannot start; the command line
    prints it as one line.
    """
    _check_port(settings)  # in a moment, not after the models have loaded
    _check_http_port(settings)
    _check_spool(settings)
    check_tls_files(settings)  # a wrong certificate or key is named now, not after the models load
    stop = threading.Event()
    previous = _install_signals(stop)
    engine = None
    try:
        engine, sessions = _open_database(settings)
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


def _http_error(settings: Settings, exc: OSError) -> StartError:
    return StartError(
        f"cannot serve the status page on {settings.http.bind}:{settings.http.port}: {exc.strerror or exc}: "
        f"set [http] port, or enabled = false, in {settings.path}"
    )


def _check_http_port(settings: Settings) -> None:
    """The status page's address, bound once and let go as :func:`_check_port` does for the SCP's."""
    http = settings.http
    try:
        if http.enabled:
            family, kind, proto, _, address = socket.getaddrinfo(
                http.bind, http.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server's
                probe.bind(address)
    except OSError as exc:
        raise _http_error(settings, exc) from exc


def _start_http(settings: Settings, sessions: sessionmaker, liveness: Any) -> Any:
    """The status page, /metrics and /healthz (node.http); None when ``[http] enabled = false``."""
    from node.http import start_http

    try:
        return start_http(settings, sessions, liveness)
    except OSError as exc:  # taken since the check
        raise _http_error(settings, exc) from exc


def _run(settings: Settings, sessions: sessionmaker, stop: threading.Event) -> None:
    """The models, the worker and the sender, then the SCP, until ``stop``; all stopped on the way out."""
    from node.ops.housekeeping import Housekeeping
    from node.receive.scp import start_scp
    from node.work.inference import ModelStartError

    node = settings.node
    worker = sender = server = http = housekeeping = None
    try:
        try:
            worker, sender, job_signal = _start_threads(settings, sessions)
        except ModelStartError as exc:
            raise StartError(str(exc)) from exc
        if not stop.is_set():  # a signal during model loading: skip listening altogether
            try:
                server = start_scp(
                    node,
                    sessions,
                    job_signal,
                    worker.context.content_key,
                    settings.core.preprocess.min_side,
                )
            except OSError as exc:  # taken since the check: another program was quicker
                raise _listen_error(node, settings, exc) from exc
            host, port = server.server_address[:2]
            log.info("listening on %s:%d as %s", host, port, node.ae_title)
            # [retention], and jobs and sends that other processes queue (gradcam-node reprocess, resend)
            housekeeping = Housekeeping(settings, sessions, (job_signal, sender.signal))
            housekeeping.start()
            http = _start_http(
                settings,
                sessions,
                lambda: {
                    "receiver": server.socket.fileno() >= 0,  # closed by shutdown()
                    "worker": worker.is_alive(),
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
        _stop_part("worker", worker)
        _stop_part("sender", sender)
