"""The analysis loop of a worker: claims queued jobs in batches under a lease, has the model process
(:mod:`node.work.inference`) run every enabled model with Grad-CAM on them (:mod:`node.work.batch`), and has
:mod:`node.work.finish` build, write and record the outputs. Two batches are in flight: while the model
process runs one, this thread writes the outputs of the one before.

It runs as a thread of a worker process (:mod:`node.work.process`, ``gradcam-node work``), which ``serve``
starts ``[worker] processes`` of; or of any program that wants one (tests).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.analysis import RawOutput, assemble
from gradcam.preprocess import load_dataset_image
from node.config import Settings
from node.db import LeaseKeeper, holder_id, utcnow
from node.db.device import device_uid
from node.db.doorbell import JOBS, Listener
from node.outputs import OutputContext, build_outputs, plan_outputs
from node.outputs.encoding import file_bytes
from node.queue import JobSignal, Notifier
from node.work.batch import Batch, collect, prepare, submit
from node.work.claim import claim_jobs, next_job_due
from node.work.finish import Finisher
from node.work.inference import InferenceProcess, ModelsChangedError
from node.work.presence import Presence
from node.work.warmup import warm_up_source

__all__ = ["Worker"]

log = logging.getLogger(__name__)

_DB_ERROR_PAUSE_S = 1.0


class Worker:
    """Thread that analyses queued jobs in batches; the models live in a child process (see
    :mod:`node.work.inference`), started and loaded here.

    ``job_signal`` wakes it when a job may be waiting (rung by ``serve``'s pipe, or on PostgreSQL by a
    NOTIFY; it also looks every ``[worker] poll_s``); it notifies ``send_signal`` after each job that
    queued a send.
    """

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        job_signal: JobSignal,
        send_signal: Notifier,
        device: str | None = None,
        slot: int = 0,
    ) -> None:
        self.settings = settings
        self.factory = sessionmaker
        self.job_signal = job_signal
        self.send_signal = send_signal
        self.holder = holder_id()
        cfg = settings.worker
        self.models = InferenceProcess(settings.core, cfg.threads(), device or cfg.device, slot)
        self.models.start()  # raises if a checkpoint cannot be loaded: the worker does not start half-able
        self.context = OutputContext.of(
            ((m.cfg, m.sha256) for m in self.models.models),
            settings.core.render,
            settings.outputs,
            device_uid(sessionmaker, settings.node.device_uid),
        )
        self.finisher = Finisher(settings, sessionmaker, self.context, self.holder)
        self.presence = Presence(
            sessionmaker,
            self.holder,
            self.models.device,
            [m.cfg.name for m in self.models.models],
            cfg.lease_s,
            lambda: (self.finisher.done, self.finisher.failed),
        )
        self._warm_up_outputs()
        self._inflight: list[Batch] = []
        self.leases = LeaseKeeper(sessionmaker, self.holder, cfg.lease_s, self._held)
        self.doorbell = Listener(settings.database_url, JOBS, job_signal.notify)  # PostgreSQL only
        self._stop = threading.Event()
        self.stopped_because: str | None = None  # why the worker stopped on its own, if it did
        self._thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self.presence.start()
        self.leases.start()
        self.doorbell.start()
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit after the batches in progress."""
        self._stop.set()
        self.job_signal.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to exit."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.doorbell.stop()
            self.leases.stop()
            self.models.stop()
            self.presence.stop()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _held(self) -> tuple[list[int], list[int]]:
        return [i.job.job_id for b in list(self._inflight) for i in b.items], []

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
                file_bytes(built.dataset)
        except Exception:  # noqa: BLE001 - only a speed-up; a real job reports any real problem
            log.warning("output warm-up failed", exc_info=True)
            return
        log.debug("outputs warmed up in %.0f ms", (time.perf_counter() - t0) * 1000)

    # --- loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Two batches in flight: while the model process runs batch N+1, this thread writes the outputs
        of batch N (and claims and decodes batch N+2)."""
        log.info(
            "worker %s started (models: %s on %s; batch size %d)",
            self.holder,
            ", ".join(m.cfg.name for m in self.models.models),
            self.models.device,
            self.settings.worker.batch_size,
        )
        inflight: Batch | None = None
        while True:
            stopping = self._stop.is_set()
            timeout: float | None = None
            try:
                new = None if stopping else self._claim()
                if inflight is not None:
                    collect(inflight, self.models)
                if new is not None:
                    submit(new, self.models)
                    self._stop_if_models_changed(new)
                if inflight is not None:
                    self._finish(inflight)
                inflight = new
                self._inflight = [inflight] if inflight is not None else []
                if inflight is not None:
                    continue
                if stopping:
                    break
                timeout = self._wait_time()
            except OperationalError as exc:
                log.error("worker: database error, retrying in %.0f s: %s", _DB_ERROR_PAUSE_S, exc)
                timeout = _DB_ERROR_PAUSE_S
            except Exception:
                # a bug must not silently end analysis for the life of the process; jobs it held are
                # claimed again when their leases run out
                log.exception("worker: unexpected error; continuing in %.0f s", _DB_ERROR_PAUSE_S)
                timeout = _DB_ERROR_PAUSE_S
            if not self._stop.is_set():
                self.job_signal.wait(timeout)
        log.info("worker stopped")

    def _stop_if_models_changed(self, batch: Batch) -> None:
        """A checkpoint replaced on disk showed when the model process restarted: this worker's outputs
        would name the old one, so it finishes this batch (its jobs are retried) and stops."""
        changed = next((i.error for i in batch.items if isinstance(i.error, ModelsChangedError)), None)
        if changed is not None and not self._stop.is_set():
            self.stopped_because = str(changed)
            log.error("worker %s stops: %s", self.holder, changed)
            self._stop.set()

    def _wait_time(self) -> float:
        """Until the next scheduled retry or lease expiry, at most ``[worker] poll_s``."""
        with self.factory() as s:
            due = next_job_due(s)
        poll = self.settings.worker.poll_s
        return poll if due is None else min(poll, max(0.0, (due - utcnow()).total_seconds()))

    def _claim(self) -> Batch | None:
        cfg = self.settings.worker
        claimed = claim_jobs(
            self.factory,
            cfg.batch_size,
            holder=self.holder,
            lease_s=cfg.lease_s,
            max_attempts=cfg.max_attempts,
        )
        if not claimed:
            return None
        batch = prepare(claimed, self.models, self.settings.core.preprocess)
        self._inflight = [*self._inflight, batch]
        return batch

    def _finish(self, batch: Batch) -> None:
        """Write outputs and record each job (done, retry or failed); the sender is woken after each job
        with results, so that its sending overlaps the rest of the batch."""
        for item in batch.items:
            if self.finisher.finish(item):
                self.send_signal.notify()
