"""The node's tables: associations, received instances, jobs, results, outputs, sends, deliveries and
operations. Their history is in :mod:`node.db.migrations` (one revision per change).

Every timestamp is a timezone-aware UTC :class:`~datetime.datetime` whatever the backend (SQLite stores
naive UTC text; :class:`UtcDateTime` puts the zone back on the way out).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
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
    "Delivery",
    "Operation",
    "WorkerState",
    "utcnow",
]

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
    # 1 as first received; +1 each time the same SOP Instance UID comes with other content (another
    # patient, study or pixels: node.receive.revision), whose file :attr:`path` then names
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # the files of the earlier revisions, one path a line (kept for the record; purged with :attr:`path`)
    earlier_paths: Mapped[str | None] = mapped_column(Text, nullable=True)

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
    # the worker process that holds the job while it runs ("host:pid"), and until when: a job whose lease
    # ran out (its worker vanished) is claimed again (node.work.claim)
    leased_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

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
    # the sending process that holds the send while it is ``sending``, and until when (as for jobs)
    leased_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    job: Mapped[Job] = relationship(back_populates="sends")
    attempts_log: Mapped[list[SendAttempt]] = relationship(back_populates="send", order_by="SendAttempt.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="send", order_by="Delivery.id")


class Delivery(Base):
    """One output instance a destination acknowledged for a :class:`Send`: recorded as each C-STORE
    succeeds, so that a send cut short (a kill, a lost association) goes on with the files not yet
    delivered instead of sending the whole job again."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("send_id", "sop_instance_uid", name="uq_deliveries_send_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("sends.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UID))
    status: Mapped[int] = mapped_column(Integer)  # the C-STORE response status (0x0000 or a warning)
    delivered_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    send: Mapped[Send] = relationship(back_populates="deliveries")


class SendAttempt(Base):
    """One try of a :class:`Send`, with what happened."""

    __tablename__ = "send_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("sends.id"), index=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text, default="")
    # the status this attempt left its send in: "sent" or "failed" when it ended the send, "pending" when
    # another attempt is due. Kept per attempt so that a count of ended sends never falls (a ``resend`` puts
    # the send itself back to pending).
    send_status: Mapped[str | None] = mapped_column(String(16), nullable=True)

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


class WorkerState(Base):
    """An analysis worker process (``serve``'s or ``gradcam-node work``, on any machine), as it last said:
    written when it starts, ``seen_at`` and its job counts every third of ``[worker] lease_s``
    (:mod:`node.work.presence`), ``stopped_at`` when it stops cleanly. One whose ``seen_at`` is older than
    a lease has vanished (killed, out of memory, its machine gone) without saying so."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), unique=True)  # its lease holder id, host:pid
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))  # where its models run: cpu, cuda:0 ...
    models: Mapped[str] = mapped_column(Text)  # the enabled models, comma separated
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
    jobs_failed: Mapped[int] = mapped_column(Integer, default=0)  # jobs it failed for good or queued again
