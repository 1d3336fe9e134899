"""``gradcam-node jobs``: what the node received and did, newest first, as a table or JSON, and the worker
processes seen in the last day."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TextIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from gradcam.results import format_pair
from node.config import Settings
from node.db import (
    Association,
    Job,
    JobStatus,
    Send,
    create_schema,
    make_engine,
    missing_sqlite_file,
    session_factory,
    utcnow,
)
from node.work.presence import WorkerView, seen_workers

__all__ = ["print_jobs", "job_records", "job_record", "iso", "consensus_word", "decision_text"]


def iso(t: datetime | None) -> str | None:
    """A stored time as the records print it (ISO 8601, milliseconds), or None."""
    return t.isoformat(timespec="milliseconds") if t is not None else None


def job_record(job: Job) -> dict[str, Any]:
    """One job as ``jobs --json`` prints it (instance, results, outputs and sends loaded or loadable)."""
    inst = job.instance
    return {
        "job_id": job.id,
        "status": job.status.value,
        "reason": job.reason,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "duration_ms": job.duration_ms,
        "consensus": job.consensus,
        "reply_ae": job.reply_ae,
        # while running: the worker process that holds it ("host:pid") and until when, unless renewed
        "leased_by": job.leased_by,
        "lease_until": iso(job.lease_until),
        "instance": {
            "sop_instance_uid": inst.sop_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "study_instance_uid": inst.study_instance_uid,
            "series_instance_uid": inst.series_instance_uid,
            "modality": inst.modality,
            "transfer_syntax": inst.transfer_syntax,
            "calling_ae": inst.calling_ae,
            "received_at": iso(inst.received_at),
            "times_received": inst.times_received,
            "path": inst.path,
            "purged_at": iso(inst.purged_at),
        },
        "results": [
            {
                "model": r.model,
                "probability": r.probability,
                "threshold": r.threshold,
                "positive": r.positive,
                "cam_peak": [r.cam_peak_row, r.cam_peak_col],
                "ms": r.ms,
            }
            for r in job.results
        ],
        "content_key": job.content_key,
        "outputs": [
            {
                "kind": o.kind,
                "model": o.model,
                "sop_class_uid": o.sop_class_uid,
                "sop_instance_uid": o.sop_instance_uid,
                "series_instance_uid": o.series_instance_uid,
                "instance_number": o.instance_number,
                "supersedes": o.supersedes,
                "path": o.path,
                "purged_at": iso(o.purged_at),
            }
            for o in job.outputs
        ],
        "sends": [
            {
                "destination": s.destination,
                "status": s.status.value,
                "attempts": s.attempts,
                "last_error": s.last_error,
                "sent_at": iso(s.sent_at),
                "delivered": len(s.deliveries),  # instances the destination acknowledged
            }
            for s in job.sends
        ],
    }


def job_records(session: Session, limit: int, status: JobStatus | None = None) -> list[dict[str, Any]]:
    """The ``limit`` most recent jobs (optionally in one state) as JSON-ready dicts, newest first."""
    q = (
        select(Job)
        .options(selectinload(Job.instance), selectinload(Job.results), selectinload(Job.outputs))
        .options(selectinload(Job.sends).selectinload(Send.deliveries))
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if status is not None:
        q = q.where(Job.status == status)
    return [job_record(j) for j in session.scalars(q)]


def _association_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Association.status, func.count()).group_by(Association.status)).all()
    return {str(getattr(s, "value", s)): int(n) for s, n in rows}


def _fmt_ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"


def decision_text(m: Mapping[str, Any], decimals: int = 3) -> str:
    """``ResNet18 0.412 >= 0.383``: one model's result as ``jobs`` and the status page show it; the numbers
    never contradict the decision (:func:`gradcam.results.format_pair`)."""
    p, t = format_pair(m["probability"], m["threshold"], decimals, threshold_as_set=True)
    return f"{m['model']} {p} {'>=' if m['positive'] else '<'} {t}"


def consensus_word(c: bool | None) -> str:
    """A job's consensus as the table and the page show it."""
    return "-" if c is None else ("positive" if c else "negative")


def _workers_line(workers: list[WorkerView], now: datetime) -> str:
    """One line: each worker process, its device and state, and its jobs since it started."""
    parts = [
        f"{w.worker} {w.device} {w.state}{' (gone?)' if w.state == 'silent' else ''}, "
        f"seen {max(0, int((now - w.seen_at).total_seconds()))} s ago, "
        f"{w.jobs_done} done, {w.jobs_failed} failed"
        for w in workers
    ]
    return "workers: " + ("; ".join(parts) or "none seen in the last 24 h")


def _table(records: list[dict[str, Any]], assoc: dict[str, int], out: TextIO) -> None:
    print(
        f"{'JOB':>5}  {'RECEIVED (UTC)':19}  {'STATUS':8}  {'MOD':4} {'FROM':16} {'ATT':>3} {'MS':>7}  "
        "CONSENSUS",
        file=out,
    )
    for r in records:
        inst = r["instance"]
        received = (inst["received_at"] or "")[:19].replace("T", " ")
        print(
            f"{r['job_id']:>5}  {received:19}  {r['status']:8}  {inst['modality'] or '-':4} "
            f"{inst['calling_ae']:16} {r['attempts']:>3} {_fmt_ms(r['duration_ms']):>7}  "
            f"{consensus_word(r['consensus'])}",
            file=out,
        )
        purged = f"; file purged {inst['purged_at'][:10]}" if inst["purged_at"] else ""
        print(
            f"       instance {inst['sop_instance_uid']}  (received {inst['times_received']}x{purged})",
            file=out,
        )
        if r["reason"]:
            print(f"       reason: {r['reason']}", file=out)
        if r["status"] == "running" and r["leased_by"]:
            print(f"       worker: {r['leased_by']} (lease until {(r['lease_until'] or '')[:19]})", file=out)
        if r["results"]:
            models = "; ".join(decision_text(m) for m in r["results"])
            print(f"       models: {models}", file=out)
        for o in r["outputs"]:
            what = o["kind"] + (f" {o['model']}" if o["model"] else "")
            supersedes = f" (supersedes {o['supersedes']})" if o["supersedes"] else ""
            purged = f" (purged {o['purged_at'][:10]})" if o["purged_at"] else ""
            print(f"       output {what}: {o['path']}{supersedes}{purged}", file=out)
        if r["sends"]:
            sends = "; ".join(
                f"{s['destination']} {s['status']} ({s['attempts']} attempt(s), {s['delivered']} delivered)"
                + (f": {s['last_error']}" if s["last_error"] and s["status"] != "sent" else "")
                for s in r["sends"]
            )
            print(f"       send: {sends}", file=out)
    if not records:
        print("(no jobs)", file=out)
    summary = ", ".join(f"{n} {s}" for s, n in sorted(assoc.items())) or "none"
    print(f"associations: {summary}", file=out)


def print_jobs(settings: Settings, limit: int, status: str | None, as_json: bool) -> int:
    """Print recent jobs; 0, or 2 for an invalid ``status`` or ``limit`` (the message lists valid values)."""
    if limit < 1:
        print(f"gradcam-node jobs: error: --limit must be at least 1, got {limit}", file=sys.stderr)
        return 2
    wanted: JobStatus | None = None
    if status is not None:
        try:
            wanted = JobStatus(status.strip().lower())
        except ValueError:
            valid = ", ".join(s.value for s in JobStatus)
            print(f"gradcam-node jobs: error: invalid --status {status!r} (valid: {valid})", file=sys.stderr)
            return 2
    missing = missing_sqlite_file(settings.database_url)
    now = utcnow()
    workers: list[WorkerView] = []
    if missing is not None:  # reading must not create an empty database
        records, assoc = [], {}
    else:
        engine = make_engine(settings.database_url)
        try:
            create_schema(engine)  # a database the running (older) node has not upgraded yet
            with session_factory(engine)() as s:
                records = job_records(s, limit, wanted)
                assoc = _association_counts(s)
                workers = seen_workers(s, now, settings.worker.lease_s)
        finally:
            engine.dispose()
    if as_json:
        doc = {"jobs": records, "associations": assoc, "workers": [w.record() for w in workers]}
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        _table(records, assoc, sys.stdout)
        print(_workers_line(workers, now))
    return 0
