"""Database of the node: associations, received instances, jobs, results, outputs, sends and operations.

The contract is /work/notes/SCHEMA.md. One engine per process (:func:`make_engine`), short sessions from
:func:`session_factory`. Every timestamp is a timezone-aware UTC :class:`~datetime.datetime` whatever the
backend (SQLite stores naive UTC text; :class:`UtcDateTime` puts the zone back on the way out).

SQLite specifics: WAL journal (readers never block the writer), ``busy_timeout`` 30 s,
``synchronous=FULL`` (a C-STORE success is only sent after the commit, so the commit must survive power
loss), foreign keys on, and every transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up
front, so two threads that read then write never dead-end in ``SQLITE_BUSY`` (a deferred transaction that
must upgrade its lock cannot wait for it; an immediate one waits up to the busy timeout). The node's own
threads queue for that lock in the process (:class:`_WriteQueue`) rather than in SQLite's busy handler.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    update,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "UtcDateTime",
    "AssociationStatus",
    "InstanceStatus",
    "JobStatus",
    "SendStatus",
    "Association",
    "Instance",
    "Job",
    "Result",
    "Output",
    "Setting",
    "Send",
    "SendAttempt",
    "Operation",
    "utcnow",
    "make_engine",
    "create_schema",
    "session_factory",
    "recover",
]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
_UID = 64  # DICOM UI VR maximum length
_AE = 16  # DICOM AE VR maximum length


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python.

    Naive values are refused on the way in (they are ambiguous); SQLite gets naive UTC text (it has no
    zone type), other backends a ``TIMESTAMP WITH TIME ZONE``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC (node.db.utcnow())")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class AssociationStatus(enum.StrEnum):
    """Life of an association: ``accepted`` until it ends ``released`` or ``aborted``; or ``rejected``."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


class InstanceStatus(enum.StrEnum):
    """A received instance is durable on disk and in the database once recorded."""

    STORED = "stored"


class JobStatus(enum.StrEnum):
    """``queued`` -> ``running`` -> ``done`` | ``failed`` (or back to ``queued`` for a retry); or ``skipped``
    at reception when triage says the image is not analysable."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class SendStatus(enum.StrEnum):
    """``pending`` -> ``sending`` -> ``sent`` | ``failed`` (or back to ``pending`` with a later due time)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


def _enum(cls: type[enum.StrEnum]) -> SAEnum:
    # Stored as the lower-case values (so raw SQL can say status='queued'), as VARCHAR on every backend.
    return SAEnum(
        cls,
        native_enum=False,
        values_callable=lambda e: [m.value for m in e],
        length=16,
        validate_strings=True,
        name=cls.__name__.lower(),
    )


class Base(DeclarativeBase):
    """Declarative base of the node's tables."""


class Association(Base):
    """One DICOM association a peer opened with us (accepted or not)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(64))
    called_ae: Mapped[str] = mapped_column(String(64))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    status: Mapped[AssociationStatus] = mapped_column(_enum(AssociationStatus), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_received: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)


class Instance(Base):
    """A received SOP instance, kept in the spool at :attr:`path`."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(_UID))
    study_instance_uid: Mapped[str] = mapped_column(String(_UID), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(_UID))
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    transfer_syntax: Mapped[str] = mapped_column(String(_UID))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), nullable=True)
    calling_ae: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus), default=InstanceStatus.STORED)
    # when the spool file was deleted by `gradcam-node purge` or [retention] (the row stays); None: kept
    purged_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="instance", order_by="Job.id")


class Job(Base):
    """One analysis of one instance. Queued jobs are claimable when ``next_attempt_at`` is null or due.

    An instance has one job per analysis: a second one only when it is analysed again with a different
    configuration (``content_key``, see :mod:`node.outputs.identity`), or on an operator's request.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    reply_ae: Mapped[str] = mapped_column(String(64))
    consensus: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    # the configuration the analysis ran with (node.outputs.identity.OutputContext.content_key)
    content_key: Mapped[str | None] = mapped_column(String(64), nullable=True)

    instance: Mapped[Instance] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job", order_by="Result.model")
    outputs: Mapped[list[Output]] = relationship(back_populates="job", order_by="Output.id")
    sends: Mapped[list[Send]] = relationship(back_populates="job", order_by="Send.id")


class Result(Base):
    """One model's decision on one job's image."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("job_id", "model", name="uq_results_job_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))
    builder: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    cam_peak_row: Mapped[int] = mapped_column(Integer)
    cam_peak_col: Mapped[int] = mapped_column(Integer)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class Output(Base):
    """A DICOM object the node made for a job; ``kind`` is one of ``node.config.OUTPUT_KINDS``.

    ``supersedes`` is the SOP Instance UID of the earlier SR of the same source image that this SR lists
    in its Predecessor Documents Sequence (an SR only; None for a first analysis).
    """

    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid", name="uq_outputs_job_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sop_class_uid: Mapped[str] = mapped_column(String(_UID))
    # not unique: an analysis that comes back to an earlier configuration makes the same objects again
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(_UID), index=True)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    supersedes: Mapped[str | None] = mapped_column(String(_UID), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # when the file at path was deleted by `gradcam-node purge` or [retention] (the row stays); None: kept
    purged_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    job: Mapped[Job] = relationship(back_populates="outputs")


class Setting(Base):
    """A value the node generates once and keeps (e.g. its device UID), by name."""

    __tablename__ = "node_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Send(Base):
    """Sending all outputs of one job to one destination (one association per attempt)."""

    __tablename__ = "sends"
    __table_args__ = (UniqueConstraint("job_id", "destination", name="uq_sends_job_destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(_AE))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    status: Mapped[SendStatus] = mapped_column(_enum(SendStatus), index=True, default=SendStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    job: Mapped[Job] = relationship(back_populates="sends")
    attempts_log: Mapped[list[SendAttempt]] = relationship(back_populates="send", order_by="SendAttempt.id")


class SendAttempt(Base):
    """One try of a :class:`Send`, with what happened."""

    __tablename__ = "send_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("sends.id"), index=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")

    send: Mapped[Send] = relationship(back_populates="attempts_log")


class Operation(Base):
    """What an operator command (``resend``, ``reprocess``, ``purge``) or the retention loop did, and who
    asked: ``actor`` is the OS user that ran it. ``summary`` is one line; ``detail`` one line per job,
    instance or file."""

    __tablename__ = "operations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    command: Mapped[str] = mapped_column(String(32))
    arguments: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(64))
    summary: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text, default="")


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

    Runs the Alembic revisions of :mod:`node.migrations` in one transaction: all of them on an empty
    database; on one made before migrations existed (the node's tables, no ``alembic_version``) it stamps
    the baseline revision first, then upgrades; a database at a revision is upgraded, at the latest one
    left alone. A second process that starts meanwhile waits for the write lock, then finds it done.
    """
    from node import migrations  # here, so that importing node.db does not load Alembic

    migrations.upgrade(engine)


def session_factory(engine: Engine) -> sessionmaker:
    """Sessions bound to ``engine``; objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def recover(sessions: sessionmaker) -> tuple[int, int]:
    """Undo what a crash or kill left half done; call once at start, before the worker and sender.

    Jobs left ``running`` are ``queued`` again (due now); sends left ``sending`` are ``pending`` again (due
    now). Attempt counters are kept, so a job that kills the process every time still runs out of attempts.

    Returns
    -------
    tuple[int, int]
        The number of jobs and of sends put back.
    """
    now = utcnow()
    with sessions.begin() as s:
        jobs = s.execute(
            update(Job)
            .where(Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.QUEUED, started_at=None, next_attempt_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        sends = s.execute(
            update(Send)
            .where(Send.status == SendStatus.SENDING)
            .values(status=SendStatus.PENDING, next_attempt_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
    if jobs or sends:
        log.warning(
            "recovered after an unclean stop: %d job(s) re-queued, %d send(s) pending again", jobs, sends
        )
    return int(jobs or 0), int(sends or 0)
