"""Schema migrations of the node's database (Alembic); the node upgrades its database itself at start.

:func:`upgrade` brings any database to the latest revision (``versions/``): an empty one gets every
revision; one made by the release before migrations existed (the node's tables, no ``alembic_version``)
is stamped :data:`BASELINE`, the schema it has, and then upgraded; one at a revision is upgraded.

A new revision, from the repository root (``[tool.alembic]`` in pyproject.toml)::

    alembic revision -m "what changes"            # then write upgrade()/downgrade() by hand
    alembic -x url=sqlite:///var/node.db upgrade head
    alembic -x url=postgresql://host/db upgrade head --sql   # the SQL, without a database

Revisions must work on SQLite and PostgreSQL: on SQLite, whatever ``ALTER TABLE`` cannot do (drop or
change a constraint or a column) goes through ``op.batch_alter_table`` (copy the table, drop it, rename
the copy); :func:`migrating` turns foreign keys off for that, and checks them before the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

__all__ = ["BASELINE", "BASELINE_TABLES", "config", "head", "current", "migrating", "upgrade"]

BASELINE = "0001"
"""The revision whose schema the node's ``create_all`` made before migrations existed."""

BASELINE_TABLES = frozenset(
    {"associations", "instances", "jobs", "results", "outputs", "sends", "send_attempts"}
)
"""The tables of :data:`BASELINE`."""

log = logging.getLogger(__name__)

_PG_LOCK_KEY = 0x6E6F6465  # pg_advisory_xact_lock key of the upgrade ("node")


def config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for this package's revisions, without any ini file.

    Parameters
    ----------
    connection
        The connection the revisions run on (``env.py`` takes it from ``config.attributes``); it must
        already be inside the transaction that the upgrade is to commit (see :func:`migrating`).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The latest revision."""
    rev = ScriptDirectory.from_config(config()).get_current_head()
    assert rev is not None
    return rev


def current(connection: Connection) -> str | None:
    """The revision a database is at; None when it has no ``alembic_version`` (empty, or pre-migrations)."""
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def migrating(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction, in which concurrent upgrades of one database queue.

    The transaction takes the write lock up front (SQLite: ``BEGIN IMMEDIATE``, which
    :func:`node.db.make_engine`'s engines emit; PostgreSQL: a transaction-level advisory lock), so a
    second process that starts at the same time waits, then finds the database upgraded. On SQLite,
    foreign keys are off meanwhile (a table that others reference cannot be dropped and recreated
    otherwise; the pragma only takes effect outside a transaction) and ``PRAGMA foreign_key_check`` must
    come back empty before the commit. Everything, DDL included, commits or rolls back together.

    Parameters
    ----------
    engine
        The node's engine (:func:`node.db.make_engine`).
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
        try:
            with conn.begin():
                if sqlite and not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # an engine not from make_engine
                elif conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                yield conn
                if sqlite and (bad := conn.exec_driver_sql("PRAGMA foreign_key_check").all()):
                    raise RuntimeError(f"schema upgrade broke foreign keys (table, rowid, parent, fk): {bad}")
        finally:
            if sqlite and not conn.invalidated:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys = ON")  # type: ignore[union-attr]


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the latest), in one transaction.

    Parameters
    ----------
    engine
        The node's engine (:func:`node.db.make_engine`).
    revision
        Target revision.

    Raises
    ------
    RuntimeError
        The database has some of the node's tables but not all of them, and no ``alembic_version``:
        not a database this node made, and not one it can tell the schema of.
    """
    with migrating(engine) as conn:
        cfg = config(conn)
        if current(conn) is None:
            present = BASELINE_TABLES & set(inspect(conn).get_table_names())
            if present == BASELINE_TABLES:  # made by create_all before migrations existed
                command.stamp(cfg, BASELINE)
            elif present:
                raise RuntimeError(
                    f"database has the node's tables {sorted(present)} but not "
                    f"{sorted(BASELINE_TABLES - present)}, and no alembic_version: cannot tell its schema"
                )
        before = current(conn)
        command.upgrade(cfg, revision)
        after = current(conn)
    if before is None:
        log.info("database schema created (revision %s)", after)
    elif after != before:
        log.info("database schema upgraded from revision %s to %s", before, after)
