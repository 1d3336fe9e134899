"""The command-line side of the operator's commands: open the node's database, run the operation, record
it, print one line per job, instance or file and a summary, and choose the exit code (1 when anything was
refused, so that scripts notice)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from gradcam.errors import GradcamError
from node.config import Settings
from node.db import create_schema, make_engine, missing_sqlite_file, session_factory
from node.ops.purge import Rules, purge
from node.ops.record import Report, log_operation, record_operation
from node.ops.reprocess import reprocess
from node.ops.resend import resend

__all__ = [
    "OperationError",
    "parse_since",
    "resend_command",
    "reprocess_command",
    "purge_command",
]


class OperationError(GradcamError):
    """An operator command cannot run at all; the message says what to do."""


def parse_since(text: str) -> datetime:
    """An ISO date or date and time (``2024-06-01``, ``2024-06-01T08:30``, ``...+02:00``); UTC unless it
    names its zone, as ``gradcam-node jobs`` shows times in UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected an ISO date or date and time (2024-06-01, 2024-06-01T08:30), got {text!r}"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@contextmanager
def _database(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the node's database, upgraded to the current schema like ``serve`` does; never a new
    empty SQLite file (a wrong ``database_url`` is reported instead)."""
    missing = missing_sqlite_file(settings.database_url)
    if missing is not None:
        raise OperationError(
            f"no database at {missing}: the node has not run with this configuration yet, or [node] "
            f"database_url in {settings.path} names the wrong file"
        )
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
        yield session_factory(engine)
    finally:
        engine.dispose()


def _print(report: Report, summary: str) -> None:
    for line in report.lines:
        print(line)
    print(summary)
    sys.stdout.flush()


def _run_recorded(
    settings: Settings,
    command: str,
    arguments: str,
    run: Callable[[Session], Report],
    summarise: Callable[[Report], str],
) -> int:
    """Run ``run`` and record it in the same transaction: the database holds both or neither."""
    with _database(settings) as sessions:
        with sessions.begin() as s:
            report = run(s)
            summary = summarise(report)
            row = record_operation(s, command, arguments, summary, report.lines)
        log_operation(row)
    _print(report, summary)
    return 1 if report.refused else 0


def resend_command(settings: Settings, job_ids: Sequence[int] | None, arguments: str) -> int:
    """``gradcam-node resend JOB... | --failed`` (``job_ids`` None: every job with a failed send)."""
    return _run_recorded(
        settings,
        "resend",
        arguments,
        lambda s: resend(s, settings, job_ids),
        lambda r: f"{r.done} send(s) queued, {r.refused} job(s) refused",
    )


def reprocess_command(
    settings: Settings, job_ids: Sequence[int] | None, since: datetime | None, arguments: str
) -> int:
    """``gradcam-node reprocess JOB... | --since DATE``."""
    return _run_recorded(
        settings,
        "reprocess",
        arguments,
        lambda s: reprocess(s, job_ids, since),
        lambda r: f"{r.done} job(s) queued for analysis, {r.refused} refused",
    )


def purge_command(settings: Settings, older_than: float | None, dry_run: bool, arguments: str) -> int:
    """``gradcam-node purge [--older-than DAYS] [--dry-run]``: without ``--older-than``, ``[retention]``'s
    days (each kind its own)."""
    if older_than is not None:
        rules = Rules(older_than, older_than)
    else:
        rules = Rules(settings.retention.received_days, settings.retention.outputs_days)
        if not settings.retention.enabled:
            raise OperationError(
                f"nothing to purge: give --older-than DAYS, or set received_days or outputs_days under "
                f"[retention] in {settings.path}"
            )
    with _database(settings) as sessions:
        report = purge(sessions, settings.node.storage_dir, rules, dry_run=dry_run)
        summary = report.summary(rules)
        if not dry_run:
            with sessions.begin() as s:
                row = record_operation(s, "purge", arguments, summary, report.lines)
            log_operation(row)
    _print(report, summary)
    return 1 if report.refused else 0
