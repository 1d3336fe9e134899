"""The analysis thread: claims queued jobs in batches, has the model process (:mod:`node.work.inference`) run
every enabled model with Grad-CAM on them, builds the outputs (:mod:`node.outputs.build`) and has
:mod:`node.work.results` write them and record everything (results, outputs, the send) in one transaction.
Two batches are in flight: while the model process runs one, this thread writes the outputs of the one
before.

Failures are sorted in two kinds. *Permanent*: the image cannot be analysed (an :class:`InputError`, a file
that is not DICOM, outputs that cannot be built): the job is ``failed`` with the reason at once.
*Transient*: the disk, the database, torch running out of memory or the model process dying: the job is
queued again after ``worker.retry_delay_s``, up to ``worker.max_attempts`` attempts in all. One bad image
never fails the rest of its batch.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.analysis import RawOutput, assemble, model_inputs
from gradcam.errors import InputError
from gradcam.preprocess import SourceImage, load_dataset_image
from gradcam.results import AnalysisResult
from node.config import Settings
from node.db import Instance, Job, JobStatus, utcnow
from node.outputs import Built, OutputContext, build_outputs, plan_outputs
from node.queue import JobSignal
from node.work.inference import ChildError, InferenceProcess, ModelError
from node.work.results import (
    Done,
    PermanentError,
    device_uid,
    instance_numbers,
    predecessor_of,
    record_done,
    write_outputs,
)
from node.work.warmup import warm_up_source

__all__ = [
    "ClaimedJob",
    "PermanentError",
    "TRANSIENT_ERRORS",
    "Worker",
    "claim_jobs",
    "next_job_due",
]

log = logging.getLogger(__name__)

# Worth another try later: disk full or I/O trouble, database locked, torch out of memory (a RuntimeError).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, OperationalError, RuntimeError)
_DB_ERROR_PAUSE_S = 1.0


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns (status ``running``)."""

    job_id: int
    attempt: int
    reply_ae: str
    sop_instance_uid: str
    path: Path
    started_at: datetime


@dataclass
class _Item:
    """One job moving through a batch."""

    job: ClaimedJob
    t0: float
    image: SourceImage | None = None
    source: pydicom.Dataset | None = None
    inputs: dict[str, np.ndarray] | None = None
    analysis: AnalysisResult | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    """Jobs analysed together; ``sent`` are those handed to the model process as ``request_id``."""

    items: list[_Item]
    sent: list[_Item] = field(default_factory=list)
    request_id: int | None = None


def _due(now: datetime):  # noqa: ANN202 - an SQLAlchemy boolean clause
    return (Job.status == JobStatus.QUEUED) & or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)


def claim_jobs(factory: sessionmaker[Session], limit: int, now: datetime | None = None) -> list[ClaimedJob]:
    """Atomically take up to ``limit`` due queued jobs (oldest first) and mark them ``running``.

    Each job is claimed with a guarded ``UPDATE ... WHERE status='queued'``; a job another worker took in
    the meantime updates no row and is left out.
    """
    now = now or utcnow()
    claimed: list[ClaimedJob] = []
    with factory.begin() as s:
        ids = list(s.scalars(select(Job.id).where(_due(now)).order_by(Job.id).limit(limit)))
        for job_id in ids:
            rows = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(status=JobStatus.RUNNING, started_at=now, attempts=Job.attempts + 1)
                .execution_options(synchronize_session=False)
            ).rowcount
            if rows != 1:
                continue
            attempts, reply_ae, uid, path = s.execute(
                select(Job.attempts, Job.reply_ae, Instance.sop_instance_uid, Instance.path)
                .join(Instance, Instance.id == Job.instance_id)
                .where(Job.id == job_id)
            ).one()
            claimed.append(ClaimedJob(job_id, attempts, reply_ae, uid, Path(path), now))
    return claimed


def next_job_due(session: Session) -> datetime | None:
    """The earliest scheduled retry among queued jobs (None if none is scheduled)."""
    return session.scalar(
        select(func.min(Job.next_attempt_at)).where(
            Job.status == JobStatus.QUEUED, Job.next_attempt_at.is_not(None)
        )
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _fail_all(items: list[_Item], exc: Exception) -> None:
    """The model process failed for all of ``items``: a transient error each (their jobs are retried)."""
    for i in items:
        i.error = exc if isinstance(exc, TRANSIENT_ERRORS) else RuntimeError(_describe(exc))


class Worker:
    """Thread that analyses queued jobs in batches; the models live in a child process (see
    :mod:`node.work.inference`), started and loaded here."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        job_signal: JobSignal,
        send_signal: JobSignal,
    ) -> None:
        self.settings = settings
        self.factory = sessionmaker
        self.job_signal = job_signal
        self.send_signal = send_signal
        self.models = InferenceProcess(settings.core, settings.worker.inference_threads)
        self.models.start()  # raises if a checkpoint cannot be loaded: the node does not start half-able
        self.context = OutputContext.of(
            ((m.cfg, m.sha256) for m in self.models.models),
            settings.core.render,
            settings.outputs,
            device_uid(sessionmaker, settings.node.device_uid),
        )
        self._warm_up_outputs()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit after the batches in progress."""
        self._stop.set()
        self.job_signal.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to exit."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.models.stop()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _warm_up_outputs(self) -> None:
        """Make (and discard) every kind of output for a small synthetic image once, so that the first study
        after a start does not pay for first-use costs (about 0.3 s measured: highdicom's IOD tables,
        encoders)."""
        t0 = time.perf_counter()
        try:
            ds = warm_up_source()
            image = load_dataset_image(ds, self.settings.core.preprocess.max_pixels, "warm-up", min_side=1)
            peaked = np.zeros((2, 2), np.float32)
            peaked[0, 0] = 1.0
            raw = {m.cfg.name: [RawOutput(1.0, peaked, 0.0)] for m in self.models.models}
            (analysis,) = assemble([image], self.models.models, raw)
            numbers = {p.sop_uid: 1 for p in plan_outputs(ds, analysis, self.context)}
            for built in build_outputs(ds, image, analysis, self.context, numbers):
                built.dataset.save_as(io.BytesIO(), enforce_file_format=True)
        except Exception:  # noqa: BLE001 - only a speed-up; a real job reports any real problem
            log.warning("output warm-up failed", exc_info=True)
            return
        log.debug("outputs warmed up in %.0f ms", (time.perf_counter() - t0) * 1000)

    # --- loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Two batches in flight: while the model process runs batch N+1, this thread writes the outputs
        of batch N (and claims and decodes batch N+2)."""
        log.info(
            "worker started (models: %s; batch size %d)",
            ", ".join(m.cfg.name for m in self.models.models),
            self.settings.worker.batch_size,
        )
        inflight: _Batch | None = None
        while True:
            stopping = self._stop.is_set()
            timeout: float | None = None
            try:
                new = None if stopping else self._claim()
                if inflight is not None:
                    self._collect(inflight)
                if new is not None:
                    self._submit(new)
                if inflight is not None:
                    self._finish(inflight)
                inflight = new
                if inflight is not None:
                    continue
                if stopping:
                    break
                timeout = self._wait_time()
            except OperationalError as exc:
                log.error("worker: database error, retrying in %.0f s: %s", _DB_ERROR_PAUSE_S, exc)
                timeout = _DB_ERROR_PAUSE_S
            except Exception:
                # a bug must not silently end analysis for the life of the process; jobs left 'running'
                # by it are re-queued by recover() at the next start
                log.exception("worker: unexpected error; continuing in %.0f s", _DB_ERROR_PAUSE_S)
                timeout = _DB_ERROR_PAUSE_S
            if not self._stop.is_set():
                self.job_signal.wait(timeout)
        log.info("worker stopped")

    def _wait_time(self) -> float | None:
        with self.factory() as s:
            due = next_job_due(s)
        return None if due is None else max(0.0, (due - utcnow()).total_seconds())

    # --- one batch --------------------------------------------------------------------------------------

    def _claim(self) -> _Batch | None:
        claimed = claim_jobs(self.factory, self.settings.worker.batch_size)
        return self._prepare(claimed) if claimed else None

    def _prepare(self, claimed: list[ClaimedJob]) -> _Batch:
        """Read and decode each image and make its model inputs; a failure stays with its item."""
        items = [_Item(job, time.perf_counter()) for job in claimed]
        cfgs = [m.cfg for m in self.models.models]
        for item in items:
            self._load(item)
            if item.error is None:
                try:
                    assert item.image is not None
                    item.inputs = {k: v.numpy() for k, v in model_inputs([item.image], cfgs).items()}
                except Exception as exc:  # noqa: BLE001 - classified and stored with the job by _fail
                    item.error = exc
        return _Batch(items)

    def _submit(self, batch: _Batch) -> None:
        """Hand the batch's good items to the model process (it starts at once; this returns)."""
        batch.sent = [i for i in batch.items if i.error is None and i.inputs is not None]
        if not batch.sent:
            return
        names = list(batch.sent[0].inputs or {})
        try:
            stacked = {n: np.concatenate([i.inputs[n] for i in batch.sent if i.inputs]) for n in names}
            batch.request_id = self.models.submit(stacked)
        except Exception as exc:  # noqa: BLE001 - the model process could not be (re)started
            _fail_all(batch.sent, exc)
            batch.sent = []
        for i in batch.items:
            i.inputs = None

    def _collect(self, batch: _Batch) -> None:
        """Wait for the model process's answer and map each image's CAMs to the source."""
        if batch.request_id is None or not batch.sent:
            return
        try:
            answers = self.models.collect(batch.request_id)
        except Exception as exc:  # noqa: BLE001 - the child died: transient, the jobs are retried
            _fail_all(batch.sent, exc)
            return
        for item, answer in zip(batch.sent, answers, strict=True):
            if isinstance(answer, ChildError):
                item.error = answer.exception()
                continue
            try:
                assert item.image is not None
                raw = {name: [out] for name, out in answer.items()}
                (item.analysis,) = assemble([item.image], self.models.models, raw)
            except Exception as exc:  # noqa: BLE001 - classified and stored with the job by _fail
                item.error = exc

    def _finish(self, batch: _Batch) -> None:
        """Write outputs and record each job (done, retry or failed); the sender is woken after each job
        with results, so that its sending overlaps the rest of the batch."""
        for item in batch.items:
            if item.error is None:
                try:
                    if self._complete(item):
                        self.send_signal.notify()
                    continue
                except Exception as exc:  # noqa: BLE001 - classified and stored with the job by _fail
                    item.error = exc
            self._fail(item)

    def _load(self, item: _Item) -> None:
        try:
            ds = pydicom.dcmread(item.job.path)
            pre = self.settings.core.preprocess
            item.image = load_dataset_image(ds, pre.max_pixels, str(item.job.path), min_side=pre.min_side)
            item.source = ds
        except InvalidDicomError as exc:
            item.error = PermanentError(f"spool file is not readable DICOM: {_describe(exc)}")
        except Exception as exc:  # noqa: BLE001 - classified and stored with the job by _fail
            item.error = exc

    def _complete(self, item: _Item) -> bool:
        """Build and write the outputs and record the job as done; True if a send was queued."""
        assert item.source is not None and item.image is not None and item.analysis is not None
        job, analysis, ctx = item.job, item.analysis, self.context
        with self.factory() as s:
            predecessor = predecessor_of(s, job.job_id, ctx.content_key)
            before = None if predecessor is None else str(predecessor.SOPInstanceUID)
            numbers = instance_numbers(s, plan_outputs(item.source, analysis, ctx, before))
        built = self._build(item.source, item.image, analysis, numbers, predecessor)
        rows = write_outputs(self.settings.node.storage_dir, job.sop_instance_uid, built)
        dest = self.settings.destination_for_caller(job.reply_ae)
        duration_ms = (time.perf_counter() - item.t0) * 1000.0
        record_done(self.factory, Done(job.job_id, analysis, ctx.content_key, rows, dest, duration_ms))
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
        numbers: dict[str, int],
        predecessor: pydicom.Dataset | None,
    ) -> list[Built]:
        """The outputs of one image; PermanentError if they cannot be made from it."""
        try:
            return build_outputs(source, image, analysis, self.context, numbers, predecessor)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PermanentError(f"cannot build outputs: {_describe(exc)}") from exc

    def _fail(self, item: _Item) -> None:
        """Store a failed attempt: retry later if transient and attempts remain, else ``failed``."""
        exc = item.error
        assert exc is not None
        job = item.job
        if isinstance(exc, InputError | PermanentError | ModelError):
            reason, transient = _describe(exc), False
        elif isinstance(exc, TRANSIENT_ERRORS):
            reason, transient = f"{type(exc).__name__}: {_describe(exc)}", True
        else:
            # a bug or an unforeseen input: keep the traceback in the log, the reason with the job
            log.error("job %d: unexpected error", job.job_id, exc_info=exc)
            reason, transient = f"unexpected error: {type(exc).__name__}: {_describe(exc)}", False
        retry = transient and job.attempt < self.settings.worker.max_attempts
        now = utcnow()
        duration_ms = (time.perf_counter() - item.t0) * 1000.0
        try:
            with self.factory.begin() as s:
                values: dict[str, object] = {"reason": reason, "duration_ms": duration_ms}
                if retry:
                    due = now + timedelta(seconds=self.settings.worker.retry_delay_s)
                    values.update(status=JobStatus.QUEUED, next_attempt_at=due, started_at=None)
                else:
                    if transient:
                        reason = f"{reason} (gave up after {job.attempt} attempts)"
                    values.update(
                        status=JobStatus.FAILED, reason=reason, finished_at=now, next_attempt_at=None
                    )
                s.execute(
                    update(Job)
                    .where(Job.id == job.job_id, Job.status == JobStatus.RUNNING)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
        except OperationalError as db_exc:
            # the job stays 'running'; recover() re-queues it at the next start
            log.error("job %d: cannot record failure (%s): %s", job.job_id, reason, db_exc)
            return
        if retry:
            log.warning(
                "job %d (%s): attempt %d failed: %s; retry in %.1f s",
                job.job_id,
                job.sop_instance_uid,
                job.attempt,
                reason,
                self.settings.worker.retry_delay_s,
            )
        else:
            log.error("job %d (%s) failed: %s", job.job_id, job.sop_instance_uid, reason)
