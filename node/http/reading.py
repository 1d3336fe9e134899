"""Sessions for the HTTP side's reads, which must never hold up the node's writers.

The node's SQLite engine starts every transaction with ``BEGIN IMMEDIATE`` after its in-process write
queue (:mod:`node.db`), reads included: a page or a scrape on that engine would hold the write lock for as
long as its queries run, and a C-STORE's commit would wait behind it (measured on 50,000 jobs: the page's
queries take about 50 ms, a scrape's about 150 ms). So the status page and ``/metrics`` read through an
engine of their own on the same SQLite file: ``query_only``, no write queue, plain statements that WAL
readers run beside the writer without blocking it. For other backends (MVCC), and for an in-memory SQLite
database that only its one connection sees, the node's own sessions are used.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from node.db import BUSY_TIMEOUT_MS, session_factory

__all__ = ["read_only_sessions"]


def _reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA query_only = ON")
    finally:
        cur.close()


def read_only_sessions(sessions: sessionmaker) -> tuple[sessionmaker, Engine | None]:
    """Sessions for reading the database behind ``sessions``, and the engine made for them (None: shared).

    The caller disposes the returned engine when it is done with it.
    """
    engine: Engine = sessions.kw["bind"]
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return sessions, None
    reader = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}, pool_size=4
    )
    event.listen(reader, "connect", _reader_pragmas)
    return session_factory(reader), reader
