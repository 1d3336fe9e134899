"""``gradcam-node purge`` and ``[retention]``: delete old spool files, keep every database row.

Two kinds of file go, each after its own number of days (0: never):

- a *received* instance's file (and those of its earlier revisions, :mod:`node.receive.revision`), once
  every job of the instance is finished (done, failed or skipped) and the instance was received, and its
  last job made and finished, that long ago;
- an *output* file, once every send of its job is finished (sent or failed, or the job has none), nothing
  was sent or attempted since, it was made that long ago and no job of its source image is queued or
  running (a re-analysis writes to the same folder). Identical outputs of two analyses share one file: it
  goes only when every row that names it may go.

Never a file whose job is queued or running or whose send is pending or sending, and never one outside
``[node] storage_dir``. The rows stay, with ``purged_at`` set, so ``jobs`` and the history keep working;
``reprocess`` and ``resend`` refuse purged files. Work is done in small transactions that re-check every
condition under the database's write lock, so an image received again or a job queued meanwhile is never
caught half-way; a file is deleted before its row is marked, so a crash in between leaves a row that the
next run marks (the file being gone already).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from node.db import Instance, Job, JobStatus, Output, Send, SendAttempt, SendStatus, utcnow
from node.ops.record import Report

__all__ = ["Rules", "PurgeReport", "purge"]

_OPEN_JOBS = (JobStatus.QUEUED, JobStatus.RUNNING)
_OPEN_SENDS = (SendStatus.PENDING, SendStatus.SENDING)
_CHUNK = 100  # files per transaction: the node's own writes wait for the lock no longer than that


@dataclass(frozen=True)
class Rules:
    """How many days each kind of file is kept (0: for ever)."""

    received_days: float = 0.0
    outputs_days: float = 0.0

    def __post_init__(self) -> None:
        for name in ("received_days", "outputs_days"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (keep) or a number of days, got {getattr(self, name)}")

    def describe(self) -> str:
        def days(d: float) -> str:
            return "kept" if d == 0 else f"{d:g} days"

        return f"received {days(self.received_days)}, outputs {days(self.outputs_days)}"


@dataclass
class PurgeReport(Report):
    """A :class:`~node.ops.record.Report` with what was (or, in a dry run, would be) deleted."""

    dry_run: bool = False
    received_files: int = 0
    received_bytes: int = 0
    output_files: int = 0
    output_bytes: int = 0
    kept_in_use: int = 0

    def summary(self, rules: Rules) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        parts = []
        if rules.received_days:
            parts.append(
                f"{self.received_files} received file(s) ({_size(self.received_bytes)}) older than "
                f"{rules.received_days:g} days"
            )
        if rules.outputs_days:
            parts.append(
                f"{self.output_files} output file(s) ({_size(self.output_bytes)}) older than "
                f"{rules.outputs_days:g} days"
            )
        text = f"{verb} {' and '.join(parts)}"
        if self.kept_in_use:
            text += f"; kept {self.kept_in_use} as old whose job or send is open or was active since"
        if self.refused:
            text += f"; {self.refused} refused"
        return text


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# --- which rows may go -----------------------------------------------------------------------------------


def _instance_may_go(cutoff: datetime) -> ColumnElement[bool]:
    busy = exists().where(
        Job.instance_id == Instance.id,
        or_(Job.status.in_(_OPEN_JOBS), Job.created_at >= cutoff, Job.finished_at >= cutoff),
    )
    return and_(Instance.purged_at.is_(None), Instance.received_at < cutoff, ~busy)


def _output_busy(o: Any, cutoff: datetime) -> ColumnElement[bool]:
    """Output row ``o`` (an alias of Output) must stay: made recently, a send open or recently active, or
    a job of its source image queued or running."""
    own, sibling = aliased(Job), aliased(Job)
    return or_(
        o.created_at >= cutoff,
        exists().where(
            Send.job_id == o.job_id,
            or_(Send.status.in_(_OPEN_SENDS), Send.created_at >= cutoff, Send.sent_at >= cutoff),
        ),
        exists().where(
            SendAttempt.send_id == Send.id, Send.job_id == o.job_id, SendAttempt.started_at >= cutoff
        ),
        exists().where(
            own.id == o.job_id, sibling.instance_id == own.instance_id, sibling.status.in_(_OPEN_JOBS)
        ),
    )


def _output_may_go(cutoff: datetime) -> ColumnElement[bool]:
    other = aliased(Output)
    shared_and_busy = exists().where(
        other.path == Output.path, other.purged_at.is_(None), _output_busy(other, cutoff)
    )
    return and_(Output.purged_at.is_(None), ~_output_busy(Output, cutoff), ~shared_and_busy)


# --- deleting --------------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def _delete(path: Path, dry_run: bool) -> int | None:
    """Delete one file; its size, or None if it was gone already."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if not dry_run:
        path.unlink(missing_ok=True)
    return size


def _prune_dirs(folders: set[Path], root: Path) -> None:
    """Remove the folders that deleting files left empty (a study's, an image's outputs'), never ``root``
    or ``root/outputs``."""
    keep = {root, root / "outputs"}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.resolve() in keep or not _inside(folder, root):
            continue
        try:
            folder.rmdir()
        except OSError:
            pass  # not empty (other files, a file written meanwhile) or gone: fine either way


class _Purger:
    def __init__(
        self, sessions: sessionmaker[Session], storage_dir: Path, dry_run: bool, now: datetime
    ) -> None:
        self.sessions = sessions
        self.root = Path(storage_dir).resolve()
        self.dry_run = dry_run
        self.now = now
        self.report = PurgeReport(dry_run=dry_run)
        self.folders: set[Path] = set()
        self.verb = "would delete" if dry_run else "deleted"
        self.stop: threading.Event | None = None

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _file(self, path: Path, what: str) -> tuple[bool, int, str]:
        """Delete one file of the spool: whether its row may be marked purged, the bytes freed, and the
        line's verb and path."""
        if not _inside(path, self.root):
            self.report.refuse(f"kept {what} {path}: not under [node] storage_dir {self.root}")
            return False, 0, ""
        try:
            size = _delete(path, self.dry_run)
        except OSError as exc:
            self.report.refuse(f"kept {what} {path}: cannot delete it: {exc.strerror or exc}")
            return False, 0, ""
        self.folders.add(path.parent)
        if size is None:
            return (
                True,
                0,
                f"{'would mark' if self.dry_run else 'marked'} {what} {path} purged (gone already)",
            )
        return True, size, f"{self.verb} {what} {path}"

    def received(self, cutoff: datetime) -> None:
        last = 0
        while True:
            with self.sessions.begin() as s:
                rows = s.execute(
                    select(Instance.id, Instance.path, Instance.sop_instance_uid, Instance.received_at)
                    .add_columns(Instance.earlier_paths)
                    .where(_instance_may_go(cutoff), Instance.id > last)
                    .order_by(Instance.id)
                    .limit(_CHUNK)
                    .with_for_update()
                ).all()
                gone = []
                still: dict[int, str] = {}  # earlier revisions' files that could not be deleted
                for row_id, path, uid, received_at, earlier in rows:
                    last = row_id
                    ok, size, done = self._file(Path(path), "received file")
                    if not ok:
                        continue
                    gone.append(row_id)
                    self.report.received_files += 1
                    self.report.received_bytes += size
                    self.report.ok(f"{done} (instance {uid}, received {received_at:%Y-%m-%d}, {_size(size)})")
                    kept = []
                    for old in (earlier or "").splitlines():  # its earlier revisions' files go with it
                        old_ok, old_size, old_done = self._file(Path(old), "earlier revision file")
                        if not old_ok:
                            kept.append(old)  # refused (said why): named still, for the next run
                        elif old_size:
                            self.report.received_files += 1
                            self.report.received_bytes += old_size
                            self.report.ok(f"{old_done} (instance {uid}, {_size(old_size)})")
                    if kept:
                        still[row_id] = "\n".join(kept)
                if gone and not self.dry_run:
                    s.execute(
                        update(Instance)
                        .where(Instance.id.in_(gone))
                        .values(purged_at=self.now, earlier_paths=None)
                        .execution_options(synchronize_session=False)
                    )
                    for row_id, paths in still.items():
                        s.execute(
                            update(Instance)
                            .where(Instance.id == row_id)
                            .values(earlier_paths=paths)
                            .execution_options(synchronize_session=False)
                        )
            if len(rows) < _CHUNK or self.stopping():
                break

    def outputs(self, cutoff: datetime) -> None:
        last = 0
        paths: dict[str, bool] = {}  # over all chunks: a dry run marks nothing, so later ones see them again
        while True:
            with self.sessions.begin() as s:
                rows = s.execute(
                    select(Output.id, Output.path, Output.job_id, Output.kind, Output.created_at)
                    .where(_output_may_go(cutoff), Output.id > last)
                    .order_by(Output.id)
                    .limit(_CHUNK)
                ).all()
                for row_id, path, job_id, kind, created_at in rows:
                    last = row_id
                    if path in paths:
                        continue  # the same object made by another analysis: one file
                    ok, size, done = self._file(Path(path), "output file")
                    paths[path] = ok
                    if ok:
                        self.report.output_files += 1
                        self.report.output_bytes += size
                        when = f"made {created_at:%Y-%m-%d}"
                        self.report.ok(f"{done} (job {job_id} {kind}, {when}, {_size(size)})")
                gone = [p for p, ok in paths.items() if ok]
                if gone and not self.dry_run:
                    s.execute(
                        update(Output)
                        .where(Output.path.in_(gone), Output.purged_at.is_(None))
                        .values(purged_at=self.now)
                        .execution_options(synchronize_session=False)
                    )
            if len(rows) < _CHUNK or self.stopping():
                break

    def count_old(self, received_cutoff: datetime | None, outputs_cutoff: datetime | None) -> int:
        """Rows older than their cutoff that are still not purged (after a run: those kept in use)."""
        n = 0
        with self.sessions() as s:
            if received_cutoff is not None:
                n += (
                    s.scalar(
                        select(func.count()).where(
                            Instance.purged_at.is_(None), Instance.received_at < received_cutoff
                        )
                    )
                    or 0
                )
            if outputs_cutoff is not None:
                n += (
                    s.scalar(
                        select(func.count(func.distinct(Output.path))).where(
                            Output.purged_at.is_(None), Output.created_at < outputs_cutoff
                        )
                    )
                    or 0
                )
        return int(n)


def purge(
    sessions: sessionmaker[Session],
    storage_dir: Path,
    rules: Rules,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> PurgeReport:
    """Delete the received and output files ``rules`` let go (see the module); mark their rows purged.

    Parameters
    ----------
    sessions
        Sessions of the node's database (at the current schema).
    storage_dir
        ``[node] storage_dir``: no file outside it is ever deleted.
    rules
        Days per kind of file; a kind with 0 days is left alone.
    dry_run
        Only list what would go (nothing deleted, nothing marked).
    stop
        Set: end after the transaction in progress (``serve`` is stopping); the next run goes on.
    """
    now = now or utcnow()
    purger = _Purger(sessions, storage_dir, dry_run, now)
    purger.stop = stop
    received = now - timedelta(days=rules.received_days) if rules.received_days else None
    outputs = now - timedelta(days=rules.outputs_days) if rules.outputs_days else None
    old_before = purger.count_old(received, outputs) if dry_run else 0  # a real run counts after
    if received is not None:
        purger.received(received)
    if outputs is not None and not purger.stopping():
        purger.outputs(outputs)
    report = purger.report
    if dry_run:
        report.kept_in_use = old_before - report.received_files - report.output_files - report.refused
    else:
        report.kept_in_use = purger.count_old(received, outputs) - report.refused
        _prune_dirs(purger.folders, purger.root)
    report.kept_in_use = max(report.kept_in_use, 0)
    return report
