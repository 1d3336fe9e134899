"""The database connection of a process: one engine per process (:func:`make_engine`), short sessions
from :func:`session_factory`, the schema brought up to date by :func:`create_schema` (Alembic,
:mod:`node.db.migrations`).

SQLite specifics: WAL journal (readers never block the writer), ``busy_timeout`` 30 s,
``synchronous=FULL`` (a C-STORE success is only sent after the commit, so the commit must survive power
loss), foreign keys on, and every transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up
front, so two threads that read then write never dead-end in ``SQLITE_BUSY`` (a deferred transaction that
must upgrade its lock cannot wait for it; an immediate one waits up to the busy timeout). The node's own
threads queue for that lock in the process (:class:`_WriteQueue`) rather than in SQLite's busy handler.
PostgreSQL (``postgresql+psycopg://``) takes the same code path through SQLAlchemy.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Engine,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


def _switch_to_wal(cur: Any) -> None:
    """``journal_mode = WAL``, waiting for other connections: on a database not yet in WAL mode (new, or
    made by other tools) the switch needs the database to itself, and SQLite answers "database is locked"
    at once, without its busy handler, while another process has it open in the middle of a transaction
    (several node processes starting together)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Driver-level autocommit so that we, not pysqlite, decide where transactions begin (see "begin").
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _switch_to_wal(cur)
        cur.execute("PRAGMA synchronous = FULL")
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


class _WriteQueue:
    """The process's threads take SQLite's write lock one after the other, in a queue of our own.

    Waiting in SQLite's busy handler means sleeping 1, 2, 5, 10 ... 100 ms between tries, and a thread
    that wakes up late loses the lock to one that just arrived: in bench runs a ``BEGIN IMMEDIATE`` waited
    up to 243 ms (bench/node.py) and 432 ms (bench/e2e.py; a C-STORE response held that long) while no
    transaction lasted more than a few milliseconds. Here a thread waits on a :class:`threading.Lock`, is
    woken the moment the transaction before it ends, and then begins; SQLite's busy timeout still applies
    to other processes (``gradcam-node jobs``). The lock is taken before ``BEGIN IMMEDIATE`` and given back
    after the connection's COMMIT or ROLLBACK (the dialect's, so that it is really over). A thread that
    waits longer than the busy timeout gets "database is locked", as from SQLite.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._holder: int | None = None  # the DBAPI connection inside a transaction, by id

    def install(self, engine: Engine) -> None:
        event.listen(engine, "begin", self._begin)
        dialect = engine.dialect
        dialect.do_commit = self._ending(dialect.do_commit)  # type: ignore[method-assign]
        dialect.do_rollback = self._ending(dialect.do_rollback)  # type: ignore[method-assign]
        # a connection dropped inside a transaction (invalidated, closed) gives the lock back too
        event.listen(engine, "invalidate", lambda dbapi_connection, *_: self._release(dbapi_connection))
        event.listen(engine, "close", lambda dbapi_connection, *_: self._release(dbapi_connection))

    def _begin(self, conn: Any) -> None:
        if not self._lock.acquire(timeout=self.timeout_s):
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked (by this process)")
            )
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        self._holder = id(_raw(conn.connection))

    def _ending(self, finish: Any) -> Any:
        def end(dbapi_connection: Any) -> None:
            try:
                finish(dbapi_connection)
            finally:
                self._release(dbapi_connection)

        return end

    def _release(self, dbapi_connection: Any) -> None:
        if self._holder is not None and self._holder == id(_raw(dbapi_connection)):
            self._holder = None
            self._lock.release()


def _raw(connection: Any) -> Any:
    """The sqlite3 connection behind SQLAlchemy's pool proxy (or the connection itself)."""
    return getattr(connection, "dbapi_connection", None) or connection


def missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL that does not exist yet (None for any other URL, or an existing file):
    commands that only read must not create an empty database by opening it."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
        path = Path(u.database)
        return None if path.exists() else path
    return None


def make_engine(url: str) -> Engine:
    """The process's engine for any SQLAlchemy URL; SQLite gets WAL, busy timeout and foreign keys.

    Parameters
    ----------
    url
        SQLAlchemy URL. For a SQLite file the parent folder is created. ``sqlite://`` (memory) shares one
        connection between threads, for tests.
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    kwargs: dict[str, Any] = {
        "connect_args": {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
    }
    database = u.database or ""
    if database in ("", ":memory:"):
        kwargs["poolclass"] = StaticPool
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, **kwargs)
    event.listen(engine, "connect", _sqlite_pragmas)
    _WriteQueue(BUSY_TIMEOUT_MS / 1000).install(engine)
    return engine


def create_schema(engine: Engine) -> None:
    """Bring the database to the latest schema revision (idempotent; safe for concurrent starts).

    Runs the Alembic revisions of :mod:`node.db.migrations` in one transaction: all of them on an empty
    database; on one made before migrations existed (the node's tables, no ``alembic_version``) it stamps
    the baseline revision first, then upgrades; a database at a revision is upgraded, at the latest one
    left alone. A second process that starts meanwhile waits for the write lock, then finds it done.
    """
    from node.db import migrations  # here, so that importing node.db does not load Alembic

    migrations.upgrade(engine)


def session_factory(engine: Engine) -> sessionmaker:
    """Sessions bound to ``engine``; objects stay readable after commit (``expire_on_commit=False``). On
    PostgreSQL they ring the other processes when they queue a job or a send (:mod:`node.db.doorbell`)."""
    from node.db.doorbell import install_rings

    factory = sessionmaker(bind=engine, expire_on_commit=False)
    install_rings(factory)
    return factory
