"""``gradcam-node reprocess``: analyse received instances again, with the configuration the node runs now.

Each instance gets a new job, ``queued``, which the running node's worker claims like any other. Its
outputs are content-addressed (:mod:`node.outputs.identity`): where the configuration changed since the
last analysis they get new UIDs and the new SR supersedes the old one; where it did not, the same objects
are made and sent again. Refused: an instance that already has a job queued or running, one that was not
analysable (skipped at reception), and one whose spool file was purged or is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from node.db import Instance, Job, JobStatus, utcnow
from node.ops.record import Report

__all__ = ["REPROCESS_REASON", "reprocess"]

REPROCESS_REASON = "reprocess requested by the operator"
_OPEN = (JobStatus.QUEUED, JobStatus.RUNNING)


def _targets_since(session: Session, since: datetime) -> list[tuple[Instance, Job]]:
    """Instances received since ``since`` that were analysable (not every job skipped), oldest first,
    each with its latest job."""
    analysable = exists().where(Job.instance_id == Instance.id, Job.status != JobStatus.SKIPPED)
    instances = session.scalars(
        select(Instance)
        .where(Instance.received_at >= since, analysable)
        .order_by(Instance.received_at, Instance.id)
    ).all()
    return [(inst, _latest_job(session, inst.id)) for inst in instances]


def _latest_job(session: Session, instance_id: int) -> Job:
    return session.scalars(
        select(Job).where(Job.instance_id == instance_id).order_by(Job.id.desc()).limit(1)
    ).one()


def _refusal(session: Session, instance: Instance, job: Job) -> str | None:
    """Why ``instance`` (named through ``job``) cannot be analysed again, or None."""
    open_job = session.scalars(
        select(Job).where(Job.instance_id == instance.id, Job.status.in_(_OPEN)).order_by(Job.id).limit(1)
    ).first()
    if open_job is not None:
        return f"job {open_job.id} is already {open_job.status.value}"
    if job.status is JobStatus.SKIPPED:
        return f"it was not analysable: {job.reason or 'skipped at reception'}"
    if instance.purged_at is not None:
        return f"its spool file was purged on {instance.purged_at:%Y-%m-%d %H:%M} UTC"
    if not Path(instance.path).is_file():
        return f"its spool file is missing: {instance.path}"
    return None


def reprocess(
    session: Session,
    job_ids: Sequence[int] | None = None,
    since: datetime | None = None,
    now: datetime | None = None,
) -> Report:
    """Queue a new job for the instance of each of ``job_ids``, or for each instance received since
    ``since`` (exactly one of them). The caller commits ``session``; one line per instance."""
    if (job_ids is None) == (since is None):
        raise ValueError("give either job_ids or since")
    now = now or utcnow()
    report = Report()
    targets: list[tuple[str, Instance | None, Job | None]] = []
    if job_ids is not None:
        for job_id in dict.fromkeys(job_ids):
            job = session.get(Job, job_id)
            targets.append((f"job {job_id}", None if job is None else job.instance, job))
    else:
        assert since is not None
        found = _targets_since(session, since)
        if not found:
            report.note(f"no analysable instance was received since {since:%Y-%m-%d %H:%M:%S} UTC")
        targets = [(f"job {job.id}", inst, job) for inst, job in found]
    seen: dict[int, str] = {}
    for label, inst, job in targets:
        if inst is None or job is None:
            report.refuse(f"{label}: refused: no such job")
            continue
        where = f"{label} (instance {inst.sop_instance_uid})"
        if inst.id in seen:
            report.note(f"{where}: same instance as {seen[inst.id]}")
            continue
        seen[inst.id] = label
        why = _refusal(session, inst, job)
        if why is not None:
            report.refuse(f"{where}: refused: {why}")
            continue
        new = Job(
            instance_id=inst.id,
            status=JobStatus.QUEUED,
            attempts=0,
            reply_ae=job.reply_ae,
            created_at=now,
            reason=REPROCESS_REASON,
        )
        session.add(new)
        session.flush()
        report.ok(f"{where}: queued as job {new.id}")
    return report
