"""What an operator command did: one row in ``operations`` and one INFO line in the log, each naming the
OS user who ran it."""

from __future__ import annotations

import getpass
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from node.db import Operation, utcnow

__all__ = ["Report", "current_actor", "record_operation", "log_operation", "DETAIL_MAX_LINES"]

log = logging.getLogger("node.ops")

DETAIL_MAX_LINES = 2000  # a purge of years of files lists them all on stdout; the database keeps this many
_ACTOR_MAX = 64


@dataclass
class Report:
    """What one operation did: a line per job, instance or file, and how many were refused."""

    lines: list[str] = field(default_factory=list)
    done: int = 0
    refused: int = 0

    def ok(self, line: str) -> None:
        self.lines.append(line)
        self.done += 1

    def refuse(self, line: str) -> None:
        self.lines.append(line)
        self.refused += 1

    def note(self, line: str) -> None:
        """A line that is neither done nor refused (nothing to do)."""
        self.lines.append(line)


def current_actor() -> str:
    """The OS user running this process (``root (sudo from alice)`` under sudo)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container user without a passwd entry)
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER")
    if sudo and sudo != user:
        user = f"{user} (sudo from {sudo})"
    return user[:_ACTOR_MAX]


def _detail(lines: list[str]) -> str:
    if len(lines) <= DETAIL_MAX_LINES:
        return "\n".join(lines)
    kept = lines[:DETAIL_MAX_LINES]
    return "\n".join([*kept, f"... and {len(lines) - DETAIL_MAX_LINES} more line(s)"])


def record_operation(
    session: Session,
    command: str,
    arguments: str,
    summary: str,
    lines: list[str],
    at: datetime | None = None,
) -> Operation:
    """Add the ``operations`` row of an operation to ``session``, flushed (its ``id`` set); the caller
    commits it with the changes it records, where it can, then calls :func:`log_operation`."""
    row = Operation(
        at=at or utcnow(),
        command=command,
        arguments=arguments,
        actor=current_actor(),
        summary=summary,
        detail=_detail(lines),
    )
    session.add(row)
    session.flush()
    return row


def log_operation(row: Operation) -> None:
    """The operation's INFO line (after its commit: the log never claims what the database does not)."""
    args = f" {row.arguments}" if row.arguments else ""
    log.info("operation %d: %s%s (by %s): %s", row.id, row.command, args, row.actor, row.summary)
