"""``/healthz``: the node is healthy when its receiver, worker and sender run and the database answers.

The parts are the serving process's own threads, so ``serve`` hands in a :data:`Liveness` callable that
looks at them; the database is asked ``SELECT 1`` in a short session of the node's own engine, whose
transactions begin by taking SQLite's write lock: the check fails, as the node would, on a file that cannot
be opened or written, or that another program keeps locked (after the busy timeout). The answer names what
is down and nothing else (no paths, no UIDs): it is served without a token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

__all__ = ["Liveness", "Health", "check_health"]

log = logging.getLogger(__name__)

Liveness = Callable[[], Mapping[str, bool]]
"""Returns ``{part name: alive}`` for the parts of the serving process (receiver, worker, sender)."""


@dataclass(frozen=True)
class Health:
    """The verdict of one check; ``problems`` lists what is down, in words."""

    parts: dict[str, bool]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def database_answers(sessions: sessionmaker) -> str | None:
    """None when ``SELECT 1`` succeeds, else the kind of error (logged with its message)."""
    try:
        with sessions() as s:
            s.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log.warning("health check: the database does not answer: %s", exc)
        return type(getattr(exc, "orig", None) or exc).__name__
    return None


def check_health(liveness: Liveness, sessions: sessionmaker) -> Health:
    """Ask every part; a part whose probe raises counts as down."""
    problems: list[str] = []
    try:
        parts = {name: bool(alive) for name, alive in liveness().items()}
    except Exception as exc:  # a probe that fails must still give an answer, and a 503
        log.exception("health check: the liveness probe failed")
        parts = {}
        problems.append(f"liveness probe failed ({type(exc).__name__})")
    problems += [f"{name} is not running" for name, alive in parts.items() if not alive]
    error = database_answers(sessions)
    parts["database"] = error is None
    if error is not None:
        problems.append(f"database does not answer ({error})")
    return Health(parts, tuple(problems))
