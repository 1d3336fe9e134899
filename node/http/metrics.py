"""``/metrics``: the node's figures in Prometheus text format, computed from the database at each scrape.

Counters are totals over the tables, not increments kept in memory: they are right across several node
processes on one database, across restarts, and for what ``gradcam-node`` commands did. The histograms
are over all rows too, with fixed buckets summed in SQL in one pass per histogram (a window, e.g. the last
24 h, would make a "counter" that falls as rows leave it, which ``rate()`` reads as resets). Free-text
reasons become a small fixed set of label values (:func:`skip_reason`, :func:`reject_reason`), so that no
peer can create a label value per request.

Families (all prefixed ``gradcam_node_``):

====================================  =========  ==========================================================
``instances_received_total``          counter    C-STOREs stored (a duplicate counts again)
``instances_refused_total``           counter    C-STOREs answered with a failure status
``associations_total``                counter    associations, any outcome
``associations_rejected_total``       counter    A-ASSOCIATE-RJ sent, by ``reason``
``associations_open``                 gauge      associations accepted and not ended
``jobs_total``                        counter    jobs ended ``done``/``failed``/``skipped``, by ``status``
``jobs_skipped_total``                counter    skipped jobs by ``reason``
``queue_depth``                       gauge      jobs queued
``jobs_running``                      gauge      jobs being analysed
``queue_oldest_age_seconds``          gauge      age of the oldest queued job (0: none)
``decisions_total``                   counter    per ``model`` and ``decision`` (positive/negative)
``job_duration_seconds``              histogram  claim to results committed, done jobs
``analysis_seconds``                  histogram  per ``model``: its share of a batch's inference
``sends_total``                       counter    sends ended ``sent``/``failed`` (again after a resend)
``outbox_sends``                      gauge      sends ``pending``/``sending``, by ``status``
``send_attempts_total``               counter    C-STORE associations tried, by ``outcome``
``outbox_oldest_age_seconds``         gauge      age of the oldest send not yet sent (0: none)
``disk_free_bytes``                   gauge      free space under ``[node] storage_dir``
``disk_reserve_bytes``                gauge      ``min_free_disk_mb``: below it stores are refused
``workers``                           gauge      worker processes seen in 24 h, by ``state``
``component_up``                      gauge      per ``component`` of this process (receiver, worker...)
``database_up``                       gauge      1 when the tables could be read for this scrape
====================================  =========  ==========================================================
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.db import (
    Association,
    AssociationStatus,
    Instance,
    Job,
    JobStatus,
    Result,
    Send,
    SendAttempt,
    SendStatus,
    utcnow,
)
from node.http.health import Liveness
from node.http.status import disk
from node.work.presence import ALIVE, SILENT, STOPPED, seen_workers

__all__ = [
    "JOB_BUCKETS_S",
    "ANALYSIS_BUCKETS_S",
    "NodeCollector",
    "make_registry",
    "render",
    "skip_reason",
    "reject_reason",
]

log = logging.getLogger(__name__)

P = "gradcam_node_"
JOB_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ANALYSIS_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Triage and eligibility reasons (node/receive/triage.py, gradcam/eligibility.py) carry header values;
# the first pattern that matches names the label. Anything new is "other" until it gets a line here.
_SKIP_REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("own_output", r"^own output"),
        ("missing_attribute", r"^missing "),
        ("no_pixel_data", r"has no pixel data"),
        ("not_for_presentation", r"raw detector data"),
        ("sop_class_mismatch", r"is not a CR or DX image"),
        ("not_cr_dx", r"^modality "),
        ("invalid_uid", r"not a DICOM UID"),
        ("pixel_encoding", r"^Bits Allocated|radiographs store integers"),
        ("colour", r"^colour image"),
        ("multi_frame", r"Number of Frames|^multi-frame"),
        ("not_chest", r"^body part "),
        ("not_frontal", r"^view "),
        ("too_small", r"too small"),
        ("blank", r"^blank image"),
    )
)


def skip_reason(reason: str | None) -> str:
    """The label value of a skipped job's reason: one of a fixed set, "other" when none fits."""
    for label, pattern in _SKIP_REASONS:
        if reason and pattern.search(reason):
            return label
    return "other"


def reject_reason(reason: str | None) -> str:
    """The label value of a rejected association's reason (see ``node.receive.scp.handle_rejected``)."""
    text = (reason or "").lower()
    if text.startswith("called ae title") or "called ae title not recognised" in text:
        return "called_ae_title"
    if "calling ae title not recognised" in text:
        return "calling_ae_title"
    if "local limit exceeded" in text:
        return "too_many_associations"
    if "congestion" in text:
        return "congestion"
    if "application context" in text or "protocol version" in text:
        return "protocol"
    return "other"


def _age_s(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


def _counts(s: Session, column: Any, *where: ColumnElement[bool]) -> dict[str, int]:
    rows = s.execute(select(column, func.count()).where(*where).group_by(column)).all()
    return {str(getattr(k, "value", k)): int(n) for k, n in rows}


def _histogram(
    s: Session, value_ms: Any, buckets_s: Sequence[float], group: Any | None, *where: ColumnElement[bool]
) -> list[tuple[str | None, list[tuple[str, float]], float]]:
    """``(group value, [(le, cumulative count)...], sum in seconds)`` per group, in one pass."""
    cols = [func.sum(case((value_ms <= b * 1000.0, 1), else_=0)) for b in buckets_s]
    keys = [group] if group is not None else []
    q = select(*keys, func.count(), func.coalesce(func.sum(value_ms), 0.0), *cols)
    q = q.where(value_ms.is_not(None), *where)
    if group is not None:
        q = q.group_by(group).order_by(group)
    out = []
    for row in s.execute(q).all():
        values = list(row)
        key = values.pop(0) if group is not None else None
        n, total_ms, *cum = values
        if not n:
            continue
        le = [(repr(float(b)), float(c or 0)) for b, c in zip(buckets_s, cum, strict=True)]
        out.append((key, [*le, ("+Inf", float(n))], float(total_ms) / 1000.0))
    return out


def _add_by_label(family: Any, rows: Any, label_of: Any) -> None:
    """Add ``(reason, count)`` rows to ``family`` summed by the fixed label each reason maps to."""
    by_label: dict[str, int] = {}
    for reason, n in rows:
        label = label_of(reason)
        by_label[label] = by_label.get(label, 0) + int(n)
    for label, n in sorted(by_label.items()):
        family.add_metric([label], n)


class NodeCollector:
    """A ``prometheus_client`` collector that reads every figure from the database at scrape time."""

    def __init__(self, sessions: sessionmaker, settings: Settings, liveness: Liveness | None = None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.liveness = liveness

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(P + "database_up", "1 when the node's tables could be read for this scrape")
        try:
            with self.sessions() as s:
                families = list(self._from_database(s, utcnow()))
        except SQLAlchemyError as exc:
            log.warning("metrics: the database could not be read: %s", exc)
            families = []
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield up
        yield from families
        yield from self._disk()
        yield from self._components()

    def _from_database(self, s: Session, now: datetime) -> Iterator[Metric]:
        yield from self._reception(s)
        yield from self._jobs(s, now)
        yield from self._analysis(s)
        yield from self._outbox(s, now)
        yield from self._workers(s, now)

    def _workers(self, s: Session, now: datetime) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            P + "workers",
            "Analysis worker processes seen in the last 24 h, by state (silent: not seen for longer than "
            "a lease, gone without stopping)",
            labels=["state"],
        )
        seen = seen_workers(s, now, self.settings.worker.lease_s)
        for state in (ALIVE, SILENT, STOPPED):
            family.add_metric([state], sum(w.state == state for w in seen))
        yield family

    def _reception(self, s: Session) -> Iterator[Metric]:
        received = s.scalar(select(func.coalesce(func.sum(Instance.times_received), 0)))
        refused, total = s.execute(
            select(func.coalesce(func.sum(Association.n_failed), 0), func.count()).select_from(Association)
        ).one()
        yield CounterMetricFamily(
            P + "instances_received", "C-STOREs stored (an instance received again counts again)", received
        )
        yield CounterMetricFamily(
            P + "instances_refused",
            "C-STOREs answered with a failure status (disk, database, decoding)",
            refused,
        )
        yield CounterMetricFamily(P + "associations", "Associations requested by peers, any outcome", total)
        rejected = CounterMetricFamily(
            P + "associations_rejected",
            "Associations refused with A-ASSOCIATE-RJ, by reason",
            labels=["reason"],
        )
        rows = s.execute(
            select(Association.reason, func.count())
            .where(Association.status == AssociationStatus.REJECTED)
            .group_by(Association.reason)
        ).all()
        _add_by_label(rejected, rows, reject_reason)
        yield rejected
        open_now = s.scalar(
            select(func.count())
            .select_from(Association)
            .where(Association.status == AssociationStatus.ACCEPTED, Association.ended_at.is_(None))
        )
        yield GaugeMetricFamily(P + "associations_open", "Associations accepted and not yet ended", open_now)

    def _jobs(self, s: Session, now: datetime) -> Iterator[Metric]:
        counts = _counts(s, Job.status)
        ended = CounterMetricFamily(P + "jobs", "Jobs that ended, by final status", labels=["status"])
        for status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED):
            ended.add_metric([status.value], counts.get(status.value, 0))
        yield ended
        skipped = CounterMetricFamily(
            P + "jobs_skipped", "Instances not analysed (triage), by reason", labels=["reason"]
        )
        rows = s.execute(
            select(Job.reason, func.count()).where(Job.status == JobStatus.SKIPPED).group_by(Job.reason)
        ).all()
        _add_by_label(skipped, rows, skip_reason)
        yield skipped
        yield GaugeMetricFamily(P + "queue_depth", "Jobs queued", counts.get(JobStatus.QUEUED.value, 0))
        yield GaugeMetricFamily(
            P + "jobs_running", "Jobs being analysed", counts.get(JobStatus.RUNNING.value, 0)
        )
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.QUEUED))
        yield GaugeMetricFamily(
            P + "queue_oldest_age_seconds", "Age of the oldest queued job (0 when none)", _age_s(now, oldest)
        )

    def _analysis(self, s: Session) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            P + "decisions", "Model decisions, by model and decision", labels=["model", "decision"]
        )
        rows = s.execute(
            select(Result.model, Result.positive, func.count())
            .group_by(Result.model, Result.positive)
            .order_by(Result.model, Result.positive)
        ).all()
        counts = {(model, "positive" if positive else "negative"): int(n) for model, positive, n in rows}
        for model in sorted({model for model, _ in counts}):
            for decision in ("negative", "positive"):  # both, so that a rate has its denominator at once
                decisions.add_metric([model, decision], counts.get((model, decision), 0))
        yield decisions
        jobs = HistogramMetricFamily(
            P + "job_duration_seconds", "Time from claim to results committed, per done job"
        )
        done = Job.status == JobStatus.DONE  # failed and retried jobs have a duration too
        for _, buckets, total in _histogram(s, Job.duration_ms, JOB_BUCKETS_S, None, done):
            jobs.add_metric([], buckets, total)
        yield jobs
        per_model = HistogramMetricFamily(
            P + "analysis_seconds",
            "Inference and Grad-CAM time per image and model (its share of the batch)",
            labels=["model"],
        )
        for model, buckets, total in _histogram(s, Result.ms, ANALYSIS_BUCKETS_S, Result.model):
            per_model.add_metric([str(model)], buckets, total)
        yield per_model

    def _outbox(self, s: Session, now: datetime) -> Iterator[Metric]:
        # counted from the attempts that ended a send, not from the sends' status now: a ``resend`` puts a
        # send back to pending, and a counter must not fall
        ends = _counts(s, SendAttempt.send_status)
        ended = CounterMetricFamily(P + "sends", "Sends that ended, by status", labels=["status"])
        for status in (SendStatus.SENT, SendStatus.FAILED):
            ended.add_metric([status.value], ends.get(status.value, 0))
        yield ended
        counts = _counts(s, Send.status)
        waiting = GaugeMetricFamily(P + "outbox_sends", "Sends not yet ended, by status", labels=["status"])
        for status in (SendStatus.PENDING, SendStatus.SENDING):
            waiting.add_metric([status.value], counts.get(status.value, 0))
        yield waiting
        attempts = CounterMetricFamily(
            P + "send_attempts", "Attempts to send a job's outputs, by outcome", labels=["outcome"]
        )
        by_outcome = _counts(s, SendAttempt.outcome)
        for outcome in sorted({"sent", "failed", *by_outcome}):
            attempts.add_metric([outcome], by_outcome.get(outcome, 0))
        yield attempts
        oldest = s.scalar(
            select(func.min(Send.created_at)).where(Send.status.in_((SendStatus.PENDING, SendStatus.SENDING)))
        )
        yield GaugeMetricFamily(
            P + "outbox_oldest_age_seconds",
            "Age of the oldest send not yet sent (0 when none)",
            _age_s(now, oldest),
        )

    def _disk(self) -> Iterator[Metric]:
        d = disk(self.settings)
        if d.free_bytes is not None:
            yield GaugeMetricFamily(
                P + "disk_free_bytes", "Free space under [node] storage_dir", d.free_bytes
            )
        yield GaugeMetricFamily(
            P + "disk_reserve_bytes",
            "[node] min_free_disk_mb: below it C-STOREs are refused",
            d.reserve_bytes,
        )

    def _components(self) -> Iterator[Metric]:
        if self.liveness is None:
            return
        family = GaugeMetricFamily(
            P + "component_up", "1 while a part of the serving process runs", labels=["component"]
        )
        try:
            parts = dict(self.liveness())
        except Exception:  # the metrics still come; /healthz says what failed
            log.exception("metrics: the liveness probe failed")
            return
        for name, alive in sorted(parts.items()):
            family.add_metric([name], 1 if alive else 0)
        yield family


def make_registry(
    sessions: sessionmaker, settings: Settings, liveness: Liveness | None = None
) -> CollectorRegistry:
    """A registry of its own holding only the node's collector (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(sessions, settings, liveness))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (``prometheus_client.CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)
