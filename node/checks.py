"""The checks a process of the node makes before it does anything slow: the listening ports are free, the
spool folder is writable, the database opens (schema brought up to date, crash leftovers recovered). Each
fails in a moment with a :class:`StartError` whose one-line message says what to do.
"""

from __future__ import annotations

import errno
import socket
import tempfile

from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gradcam.errors import GradcamError
from node.config import NodeConfig, Settings
from node.db import create_schema, make_engine, recover, session_factory

__all__ = [
    "StartError",
    "check_port",
    "check_http_port",
    "check_spool",
    "open_database",
    "listen_error",
    "http_error",
]


class StartError(GradcamError):
    """The node cannot start; the message says what is wrong and what to do."""


# --- start-up checks: each fails in a second with one line, not after the models have loaded ---------------


def listen_error(node: NodeConfig, settings: Settings, exc: OSError) -> StartError:
    where = f"cannot listen on {node.bind}:{node.port}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        todo = "another program (another gradcam-node?) holds the port: "
        todo += f"stop it or set [node] port in {settings.path}"
    elif exc.errno == errno.EACCES:
        todo = f"ports below 1024 need privileges: set [node] port in {settings.path} to 1024 or above"
    else:
        todo = f"set [node] bind to an address of this machine in {settings.path}"
    return StartError(f"{where}: {todo}")


def _bind_once(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go at once; OSError (socket.gaierror included: a name that does not
    resolve) if the server could not. SO_REUSEADDR as pynetdicom's and http.server's servers set it: a port
    whose last connections are in TIME_WAIT is free."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)


def check_port(settings: Settings) -> None:
    """Bind the listening address once and let it go: the SCP binds it for real once the models are ready."""
    try:
        _bind_once(settings.node.bind, settings.node.port)
    except OSError as exc:
        raise listen_error(settings.node, settings, exc) from exc


def check_spool(settings: Settings) -> None:
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
    if "password" in lowered:  # PostgreSQL: "password authentication failed", "no password supplied"
        return (
            "give the database user's password to the node's user: PGPASSWORD in its environment, a line in"
            f" its ~/.pgpass, or in {key}"
        )
    if "could not parse" in lowered or "can't load plugin" in lowered:
        return f"fix {key} (e.g. sqlite:////var/lib/gradcam/node.db or postgresql+psycopg://user@host/db)"
    return f"check that the database server runs and accepts the URL's user and database, and {key}"


def open_database(settings: Settings) -> tuple[Engine, sessionmaker]:
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


def http_error(settings: Settings, exc: OSError) -> StartError:
    return StartError(
        f"cannot serve the status page on {settings.http.bind}:{settings.http.port}: {exc.strerror or exc}: "
        f"set [http] port, or enabled = false, in {settings.path}"
    )


def check_http_port(settings: Settings) -> None:
    """The status page's address, bound once and let go as :func:`check_port` does for the SCP's."""
    if not settings.http.enabled:
        return
    try:
        _bind_once(settings.http.bind, settings.http.port)
    except OSError as exc:
        raise http_error(settings, exc) from exc
