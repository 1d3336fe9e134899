"""Recording what the SCP receives: instances with their jobs, and associations.

:meth:`InstanceStore.store` is the durability point of the node: the file is in the spool (fsynced) and
the instance and its job are committed in ONE transaction before it returns; only then does the SCP
answer success. Anything that prevents that raises :class:`OutOfResourcesError` and nothing is
acknowledged.
"""

from __future__ import annotations

import enum
import logging
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Row, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from gradcam.errors import GradcamError
from node.db import Association, AssociationStatus, Instance, Job, JobStatus, utcnow
from node.db.doorbell import JOBS, ring
from node.outputs.identity import revised_key
from node.queue import JobSignal
from node.receive.revision import differences
from node.receive.spool import free_bytes, instance_path, write_atomic

__all__ = [
    "StoreError",
    "OutOfResourcesError",
    "Received",
    "StoreOutcome",
    "StoreResult",
    "InstanceStore",
    "AssociationLog",
]

log = logging.getLogger(__name__)

_N_LOCKS = 64
CONN_CLOSED_REASON = "connection closed without A-RELEASE"


class StoreError(GradcamError):
    """A received instance could not be recorded."""


class OutOfResourcesError(StoreError):
    """Disk space, disk or database failure: the peer gets 0xA700 and may retry later."""


@dataclass(frozen=True)
class Received:
    """What the SCP learnt from one C-STORE request's header (UIDs already validated)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str | None
    transfer_syntax: str
    calling_ae: str
    association_id: int | None
    analysable: bool
    skip_reason: str | None


class StoreOutcome(enum.StrEnum):
    """What :meth:`InstanceStore.store` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REVISED = "revised"  # a known SOP Instance UID with other content: a new revision of the instance


@dataclass(frozen=True)
class StoreResult:
    """Outcome of one store: the instance (and, when new, its job) as recorded."""

    outcome: StoreOutcome
    instance_id: int
    path: Path
    job_id: int | None = None
    job_status: JobStatus | None = None


# Statements that run for every instance received, built once (SQLAlchemy then finds their compiled form
# without walking a new statement each time).
_KNOWN_INSTANCE = select(
    Instance.id,
    Instance.path,
    Instance.revision,
    Instance.sop_class_uid,
    Instance.study_instance_uid,
    Instance.series_instance_uid,
    Instance.patient_id,
    Instance.earlier_paths,
).where(Instance.sop_instance_uid == bindparam("uid"))
_RECEIVED_AGAIN = (
    update(Instance)
    .where(Instance.id == bindparam("instance_id"))
    .values(times_received=Instance.times_received + 1)
)
_INSERT_INSTANCE = insert(Instance.__table__)
_INSERT_JOB = insert(Job.__table__)
_BUMP_ASSOCIATION = (
    update(Association)
    .where(Association.id == bindparam("association_id"))
    .values(
        n_received=Association.n_received + bindparam("received"),
        n_failed=Association.n_failed + bindparam("failed"),
    )
)


class InstanceStore:
    """Writes received instances to the spool and records them with their job.

    Parameters
    ----------
    storage_dir
        Spool root.
    sessions
        Session factory of the node's engine.
    job_signal
        Notified after a queued job is committed.
    min_free_bytes
        Refuse new data when less than this (plus the instance) would stay free under ``storage_dir``.
    content_key
        The configuration the node's outputs are made with now
        (:attr:`node.outputs.identity.OutputContext.content_key`): an image received again whose results
        were made with another one is analysed again. None: a received-again image is only counted.
    """

    def __init__(
        self,
        storage_dir: Path,
        sessions: sessionmaker,
        job_signal: JobSignal,
        min_free_bytes: int,
        content_key: str | None = None,
    ) -> None:
        self.content_key = content_key
        self.storage_dir = Path(storage_dir)
        self.sessions = sessions
        self.job_signal = job_signal
        self.min_free_bytes = min_free_bytes
        # Striped per-UID locks: the same instance arriving twice at once (two associations) is stored once.
        self._locks = [threading.Lock() for _ in range(_N_LOCKS)]

    def _lock_for(self, uid: str) -> threading.Lock:
        return self._locks[zlib.crc32(uid.encode()) % _N_LOCKS]

    def check_space(self, size: int = 0) -> None:
        """Raise :class:`OutOfResourcesError` if storing ``size`` more bytes would go below the minimum."""
        try:
            free = free_bytes(self.storage_dir)
        except OSError as exc:
            raise OutOfResourcesError(f"cannot read free space under {self.storage_dir}: {exc}") from exc
        if free - size < self.min_free_bytes:
            raise OutOfResourcesError(
                f"free space under {self.storage_dir} is {free // 2**20} MiB, "
                f"below the minimum of {self.min_free_bytes // 2**20} MiB"
            )

    def store(self, rec: Received, data: bytes) -> StoreResult:
        """Make one received instance durable and queue (or skip) its job.

        An instance already recorded is not written again: its ``times_received`` goes up (outcome
        ``duplicate``), and it gets a new job only if its latest results were made with another
        configuration than the node's current one (the new results then supersede the old). If it comes
        with other content (another patient, study or pixels: :func:`node.receive.revision.differences`)
        it is a new revision (outcome ``revised``): written next to the old file, which stays, recorded as
        the instance's content now, and analysed again; its results get UIDs of their own and supersede
        the old ones.

        Raises
        ------
        OutOfResourcesError
            Too little disk space, or the disk or the database failed; nothing was recorded.
        """
        path = instance_path(self.storage_dir, rec.study_instance_uid, rec.sop_instance_uid)
        with self._lock_for(rec.sop_instance_uid):
            dup = self._count_duplicate(rec)
            if dup is not None:
                changed = _changes(dup, rec, data)
                if changed:
                    return self._revise(dup, rec, data, changed)
                self._restore_purged(dup.id, Path(dup.path), data)
                again = self._reanalyse(dup.id, rec, dup.revision)
                if again is not None:
                    self.job_signal.notify()
                return StoreResult(
                    StoreOutcome.DUPLICATE, dup.id, Path(dup.path), again, again and JobStatus.QUEUED
                )
            self.check_space(len(data))
            try:
                write_atomic(path, data)
            except OSError as exc:
                raise OutOfResourcesError(f"cannot write {path}: {exc}") from exc
            try:
                result = self._record(rec, path, len(data))
            except IntegrityError:
                # Another process recorded it meanwhile; it owns the file now (same bytes by UID).
                dup = self._count_duplicate(rec)
                if dup is None:
                    raise OutOfResourcesError("database refused the instance and holds no copy") from None
                return StoreResult(StoreOutcome.DUPLICATE, dup.id, Path(dup.path))
            except SQLAlchemyError as exc:
                path.unlink(missing_ok=True)  # no row points at it; a retry writes it again
                raise OutOfResourcesError(f"database error: {exc.__class__.__name__}: {exc}") from exc
        if result.job_status is JobStatus.QUEUED:
            self.job_signal.notify()
        return result

    def _count_duplicate(self, rec: Received) -> Row[Any] | None:
        """If the instance is known, count this reception and return its row (:data:`_KNOWN_INSTANCE`)."""
        try:
            with self.sessions.begin() as s:
                # select then update (no UPDATE ... RETURNING: not every backend has it); the increment
                # itself is done by the database, so concurrent duplicates are all counted.
                row = s.execute(_KNOWN_INSTANCE, {"uid": rec.sop_instance_uid}).first()
                if row is None:
                    return None
                s.execute(_RECEIVED_AGAIN, {"instance_id": row.id})
                _bump_association(s, rec.association_id, received=1)
                return row
        except SQLAlchemyError as exc:
            raise OutOfResourcesError(f"database error: {exc.__class__.__name__}: {exc}") from exc

    def _restore_purged(self, instance_id: int, path: Path, data: bytes) -> None:
        """An instance received again whose spool file was purged (retention) gets its file back, so that
        it can be analysed (and reprocessed) again; same UID, same bytes."""
        if path.exists():
            return
        self.check_space(len(data))
        try:
            write_atomic(path, data)
            with self.sessions.begin() as s:
                s.execute(update(Instance).where(Instance.id == instance_id).values(purged_at=None))
        except (OSError, SQLAlchemyError) as exc:
            raise OutOfResourcesError(f"cannot restore {path}: {exc.__class__.__name__}: {exc}") from exc
        log.info("instance file %s was purged and is written again (received again)", path)

    def _reanalyse(self, instance_id: int, rec: Received, revision: int) -> int | None:
        """Queue a new job for a received-again instance whose latest results are stale; its id, or None."""
        if self.content_key is None or not rec.analysable:
            return None
        current = revised_key(self.content_key, revision)
        try:
            with self.sessions.begin() as s:
                latest = s.scalars(
                    select(Job).where(Job.instance_id == instance_id).order_by(Job.id.desc()).limit(1)
                ).first()
                if latest is None or latest.status != JobStatus.DONE or latest.content_key == current:
                    return None
                now = utcnow()
                job = Job(
                    instance_id=instance_id,
                    status=JobStatus.QUEUED,
                    attempts=0,
                    reply_ae=rec.calling_ae,
                    created_at=now,
                    reason=f"received again; results of job {latest.id} were made with another configuration",
                )
                s.add(job)
                s.flush()
                log.info(
                    "instance %s received again: job %d re-analyses it with the current configuration",
                    rec.sop_instance_uid,
                    job.id,
                )
                return int(job.id)
        except SQLAlchemyError as exc:
            raise OutOfResourcesError(f"database error: {exc.__class__.__name__}: {exc}") from exc

    def _revise(self, known: Row[Any], rec: Received, data: bytes, changed: list[str]) -> StoreResult:
        """Record other content received for a known instance as its next revision, with a job for it (none
        when its latest job is still queued: that one reads the new file when a worker claims it)."""
        revision = int(known.revision) + 1
        first = instance_path(self.storage_dir, rec.study_instance_uid, rec.sop_instance_uid)
        path = first.with_name(f"{rec.sop_instance_uid}.r{revision}.dcm")
        n = 1
        while path.exists() or str(path) == known.path:  # never over a file a row may name
            n += 1
            path = first.with_name(f"{rec.sop_instance_uid}.r{revision}-{n}.dcm")
        self.check_space(len(data))
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise OutOfResourcesError(f"cannot write {path}: {exc}") from exc
        what = ", ".join(changed)
        now = utcnow()
        try:
            with self.sessions.begin() as s:
                # the latest job first, locked (PostgreSQL): a worker that claims it meanwhile would read
                # the instance as it was; a worker that claimed it before makes this one see it running
                latest = s.execute(
                    select(Job.id, Job.status)
                    .where(Job.instance_id == known.id)
                    .order_by(Job.id.desc())
                    .limit(1)
                    .with_for_update()
                ).first()
                s.execute(
                    update(Instance)
                    .where(Instance.id == known.id)
                    .values(
                        sop_class_uid=rec.sop_class_uid,
                        study_instance_uid=rec.study_instance_uid,
                        series_instance_uid=rec.series_instance_uid,
                        patient_id=rec.patient_id,
                        modality=rec.modality,
                        transfer_syntax=rec.transfer_syntax,
                        path=str(path),
                        size_bytes=len(data),
                        revision=revision,
                        earlier_paths="\n".join(filter(None, (known.earlier_paths, known.path))),
                        purged_at=None,
                    )
                )
                if latest is not None and latest.status is JobStatus.QUEUED:
                    job_id, status = int(latest.id), JobStatus.QUEUED
                else:
                    why = f"received again with other content ({what}): revision {revision}, analysed again"
                    job = _job_row(known.id, rec, now, why)
                    status = job["status"]
                    (job_id,) = s.execute(_INSERT_JOB, job).inserted_primary_key
                    if status is JobStatus.QUEUED:
                        ring(s, JOBS)
        except SQLAlchemyError as exc:
            path.unlink(missing_ok=True)  # the row still names the file before; a retry writes it again
            raise OutOfResourcesError(f"database error: {exc.__class__.__name__}: {exc}") from exc
        log.warning(
            "instance %s received again with other content (%s): revision %d kept as %s, job %s %s; the "
            "file before stays",
            rec.sop_instance_uid,
            what,
            revision,
            path.name,
            job_id,
            status.value,
        )
        if status is JobStatus.QUEUED:
            self.job_signal.notify()
        return StoreResult(StoreOutcome.REVISED, int(known.id), path, int(job_id), status)

    def _record(self, rec: Received, path: Path, size: int) -> StoreResult:
        now = utcnow()
        instance = {
            "sop_instance_uid": rec.sop_instance_uid,
            "sop_class_uid": rec.sop_class_uid,
            "study_instance_uid": rec.study_instance_uid,
            "series_instance_uid": rec.series_instance_uid,
            "patient_id": rec.patient_id,
            "modality": rec.modality,
            "transfer_syntax": rec.transfer_syntax,
            "path": str(path),
            "size_bytes": size,
            "association_id": rec.association_id,
            "calling_ae": rec.calling_ae,
            "received_at": now,
            "times_received": 1,
        }
        with self.sessions.begin() as s:
            (instance_id,) = s.execute(_INSERT_INSTANCE, instance).inserted_primary_key
            job = _job_row(instance_id, rec, now)
            status = job["status"]
            (job_id,) = s.execute(_INSERT_JOB, job).inserted_primary_key
            _bump_association(s, rec.association_id, received=1)
            if status is JobStatus.QUEUED:
                ring(s, JOBS)  # workers on other machines (PostgreSQL)
            return StoreResult(StoreOutcome.STORED, instance_id, path, job_id, status)


def _job_row(instance_id: int, rec: Received, now: datetime, why: str | None = None) -> dict[str, Any]:
    """The new job of a received instance: queued (``why``: its reason), or skipped with the triage's."""
    return {
        "instance_id": instance_id,
        "status": JobStatus.QUEUED if rec.analysable else JobStatus.SKIPPED,
        "reason": why if rec.analysable else rec.skip_reason,
        "attempts": 0,
        "reply_ae": rec.calling_ae,
        "created_at": now,
        "finished_at": None if rec.analysable else now,
    }


def _changes(known: Row[Any], rec: Received, data: bytes) -> list[str]:
    """What differs between the instance as the node has it and as received now ([] when the same)."""
    path = Path(known.path)
    if path.is_file():
        return differences(path, data)
    # the file was purged: what the row says of it is all there is to compare
    pairs = (
        ("SOPClassUID", known.sop_class_uid, rec.sop_class_uid),
        ("StudyInstanceUID", known.study_instance_uid, rec.study_instance_uid),
        ("SeriesInstanceUID", known.series_instance_uid, rec.series_instance_uid),
        ("PatientID", known.patient_id, rec.patient_id),
    )
    return [name for name, before, now in pairs if (before or "") != (now or "")]


def _bump_association(s: object, association_id: int | None, received: int = 0, failed: int = 0) -> None:
    if association_id is None:
        return
    s.execute(_BUMP_ASSOCIATION, {"association_id": association_id, "received": received, "failed": failed})  # type: ignore[attr-defined]


class AssociationLog:
    """Records associations in the ``associations`` table; every method is safe to call from any thread.

    Database errors are logged, never raised: bookkeeping must not break an association.
    """

    def __init__(self, sessions: sessionmaker) -> None:
        self.sessions = sessions

    def open(
        self,
        calling_ae: str,
        called_ae: str,
        peer_host: str,
        peer_port: int,
        status: AssociationStatus,
        reason: str | None = None,
        started_at: datetime | None = None,
    ) -> int | None:
        """Insert an association row (``accepted``, or ``rejected`` which is also ended); its id or None."""
        now = utcnow()
        try:
            with self.sessions.begin() as s:
                row = Association(
                    calling_ae=calling_ae,
                    called_ae=called_ae,
                    peer_host=peer_host,
                    peer_port=peer_port,
                    started_at=started_at or now,
                    ended_at=None if status is AssociationStatus.ACCEPTED else now,
                    status=status,
                    reason=reason,
                    n_received=0,
                    n_failed=0,
                )
                s.add(row)
                s.flush()
                return row.id
        except SQLAlchemyError:
            log.exception("cannot record association from %s", calling_ae)
            return None

    def close(self, association_id: int | None, status: AssociationStatus, reason: str | None = None) -> None:
        """End an association; a real release/abort wins over an earlier "connection closed" guess."""
        if association_id is None:
            return
        open_or_guessed = (Association.status == AssociationStatus.ACCEPTED) | (
            (Association.status == AssociationStatus.ABORTED) & (Association.reason == CONN_CLOSED_REASON)
        )
        if reason == CONN_CLOSED_REASON:
            open_or_guessed = Association.status == AssociationStatus.ACCEPTED
        try:
            with self.sessions.begin() as s:
                s.execute(
                    update(Association)
                    .where(Association.id == association_id, open_or_guessed)
                    .values(status=status, reason=reason, ended_at=utcnow())
                )
        except SQLAlchemyError:
            log.exception("cannot record the end of association %s", association_id)

    def count_failure(self, association_id: int | None) -> None:
        """Count one refused C-STORE on the association."""
        try:
            with self.sessions.begin() as s:
                _bump_association(s, association_id, failed=1)
        except SQLAlchemyError:
            log.exception("cannot count a failure on association %s", association_id)
