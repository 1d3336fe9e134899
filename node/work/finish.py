"""The end of a job on a worker: build and write its outputs and record it ``done`` with its send, or
record the failed attempt.

Failures are sorted in two kinds. *Permanent*: the image cannot be analysed (an :class:`InputError`, a file
that is not DICOM, outputs that cannot be built): the job is ``failed`` with the reason at once.
*Transient*: the disk, the database, torch running out of memory or the model process dying: the job is
queued again after ``worker.retry_delay_s``, up to ``worker.max_attempts`` attempts in all.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pydicom
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.errors import InputError
from gradcam.preprocess import SourceImage
from gradcam.results import AnalysisResult
from node.config import Settings
from node.db import JobStatus, utcnow
from node.outputs import Built, OutputContext, build_outputs, plan_outputs
from node.work.batch import TRANSIENT_ERRORS, Item, describe
from node.work.claim import give_back
from node.work.inference import ModelError
from node.work.results import (
    Done,
    LostLease,
    PermanentError,
    current_revision,
    instance_numbers,
    predecessor_of,
    record_done,
    write_outputs,
)

__all__ = ["Finisher"]

log = logging.getLogger("node.work.worker")


class ImageChanged(Exception):
    """The job's image was received again with other content while the job analysed it: its results
    would copy the old patient and study, so none are made (the newer job makes them)."""


class Finisher:
    """Records the end of each job of a worker whose leases are held as ``holder``."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], context: OutputContext, holder: str
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.context = context
        self.holder = holder
        self.done = 0  # jobs completed, and failed attempts recorded, since the start
        self.failed = 0

    def finish(self, item: Item) -> bool:
        """Complete or fail one job; True if a send was queued."""
        if item.error is None:
            try:
                return self._complete(item)
            except LostLease as exc:
                log.warning("job %d: results dropped: %s", item.job.job_id, exc)
                return False
            except ImageChanged as exc:
                self._drop(item, str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - classified and stored with the job by _fail
                item.error = exc
        self._fail(item)
        return False

    def _complete(self, item: Item) -> bool:
        """Build and write the outputs and record the job as done; True if a send was queued."""
        assert item.source is not None and item.image is not None and item.analysis is not None
        job, analysis = item.job, item.analysis
        ctx = self.context.of_revision(job.revision)  # a source received again with other content
        with self.factory() as s:
            now = current_revision(s, job.job_id)
            if now is not None and now != job.revision:
                raise ImageChanged(
                    f"the image was received again with other content while it was analysed (revision "
                    f"{job.revision}, now {now}): no results from the old content; a newer job analyses it"
                )
            predecessor = predecessor_of(s, job.job_id, ctx.content_key)
            before = None if predecessor is None else str(predecessor.SOPInstanceUID)
            numbers = instance_numbers(s, plan_outputs(item.source, analysis, ctx, before))
        built = self._build(item.source, item.image, analysis, ctx, numbers, predecessor)
        rows = write_outputs(self.settings.node.storage_dir, job.sop_instance_uid, built)
        dest = self.settings.destination_for_caller(job.reply_ae)
        duration_ms = (time.perf_counter() - item.t0) * 1000.0
        done = Done(job.job_id, analysis, ctx.content_key, rows, dest, duration_ms, self.holder)
        record_done(self.factory, done)
        self.done += 1
        probs = ", ".join(
            f"{m}={r.probability:.3f}{'+' if r.positive else '-'}" for m, r in analysis.models.items()
        )
        log.info(
            "job %d (%s) done in %.0f ms: consensus %s [%s], %d output(s)%s%s",
            job.job_id,
            job.sop_instance_uid,
            duration_ms,
            "POSITIVE" if analysis.consensus else "negative",
            probs,
            len(rows),
            f", supersedes SR {before}" if before else "",
            f" -> {dest.name}" if dest else "; no destination configured",
        )
        return dest is not None

    def _build(
        self,
        source: pydicom.Dataset,
        image: SourceImage,
        analysis: AnalysisResult,
        ctx: OutputContext,
        numbers: dict[str, int],
        predecessor: pydicom.Dataset | None,
    ) -> list[Built]:
        """The outputs of one image; PermanentError if they cannot be made from it."""
        try:
            return build_outputs(source, image, analysis, ctx, numbers, predecessor)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PermanentError(f"cannot build outputs: {describe(exc)}") from exc

    def _drop(self, item: Item, reason: str) -> None:
        """End a job whose image changed under it: ``skipped``, nothing written or sent."""
        values = {
            "status": JobStatus.SKIPPED,
            "reason": reason,
            "finished_at": utcnow(),
            "next_attempt_at": None,
        }
        try:
            if give_back(self.factory, self.holder, item.job.job_id, values):
                log.warning("job %d (%s): %s", item.job.job_id, item.job.sop_instance_uid, reason)
        except OperationalError as exc:  # the lease runs out and the job is claimed again: same outcome
            log.error("job %d: cannot record that its image changed: %s", item.job.job_id, exc)

    def _fail(self, item: Item) -> None:
        """Store a failed attempt: retry later if transient and attempts remain, else ``failed``."""
        exc = item.error
        assert exc is not None
        job = item.job
        if isinstance(exc, InputError | PermanentError | ModelError):
            reason, transient = describe(exc), False
        elif isinstance(exc, TRANSIENT_ERRORS):
            reason, transient = f"{type(exc).__name__}: {describe(exc)}", True
        else:
            # a bug or an unforeseen input: keep the traceback in the log, the reason with the job
            log.error("job %d: unexpected error", job.job_id, exc_info=exc)
            reason, transient = f"unexpected error: {type(exc).__name__}: {describe(exc)}", False
        worker = self.settings.worker
        retry = transient and job.attempt < worker.max_attempts
        now = utcnow()
        values: dict[str, object] = {
            "reason": reason,
            "duration_ms": (time.perf_counter() - item.t0) * 1000.0,
        }
        if retry:
            due = now + timedelta(seconds=worker.retry_delay_s)
            values.update(status=JobStatus.QUEUED, next_attempt_at=due, started_at=None)
        else:
            if transient:
                reason = f"{reason} (gave up after {job.attempt} attempts)"
            values.update(status=JobStatus.FAILED, reason=reason, finished_at=now, next_attempt_at=None)
        try:
            if not give_back(self.factory, self.holder, job.job_id, values):
                log.warning(
                    "job %d: failure not recorded (%s): the job is no longer this worker's",
                    job.job_id,
                    reason,
                )
                return
        except OperationalError as db_exc:
            # the job stays 'running' under this worker's lease; once it runs out, the job is claimed again
            log.error("job %d: cannot record failure (%s): %s", job.job_id, reason, db_exc)
            return
        self.failed += 1
        if retry:
            log.warning(
                "job %d (%s): attempt %d failed: %s; retry in %.1f s",
                job.job_id,
                job.sop_instance_uid,
                job.attempt,
                reason,
                worker.retry_delay_s,
            )
        else:
            log.error("job %d (%s) failed: %s", job.job_id, job.sop_instance_uid, reason)
