"""node.db.migrations: the revisions give the models' schema; old databases are upgraded in place, data kept.

Real SQLite files, no mocks. A database of the release before migrations (node/db.py at 0871801, made by
``create_all``, no ``alembic_version``) is built from ``data/schema_0871801.sql``, the DDL that release
emitted, or by running revision 0001 alone.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect
from sqlalchemy.exc import IntegrityError

from node.db import Base, create_schema, make_engine, migrations

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parents[2]

ROWS = [
    "INSERT INTO associations VALUES (1, 'SCU', 'NODE', '127.0.0.1', 11112, '2024-05-01 10:00:00.000000',"
    " NULL, 'released', NULL, 1, 0)",
    "INSERT INTO instances VALUES (1, '1.2.3.4', '1.2.840.10008.5.1.4.1.1.1.1', '1.2', '1.2.1', 'P', 'DX',"
    " '1.2.840.10008.1.2.1', '/spool/1.dcm', 123, 1, 'SCU', '2024-05-01 10:00:01.000000', 1, 'stored')",
    "INSERT INTO jobs VALUES (1, 1, 'done', NULL, 1, NULL, 'SCU', 1, '2024-05-01 10:00:01.000000',"
    " '2024-05-01 10:00:02.000000', '2024-05-01 10:00:03.000000', 812.5)",
    "INSERT INTO results VALUES (1, 1, 'densenet121', 'densenet121', 0.8, 0.5, 1, 3, 4, 'ab', 100.0,"
    " '2024-05-01 10:00:03.000000')",
    "INSERT INTO results VALUES (2, 1, 'resnet50', 'resnet50', 0.3, 0.5, 0, 5, 6, 'cd', 90.0,"
    " '2024-05-01 10:00:03.000000')",
    "INSERT INTO outputs VALUES (1, 1, 'sc', 'densenet121', '1.2.840.10008.5.1.4.1.1.7', '9.1', '9.0',"
    " '/out/9.1.dcm', '2024-05-01 10:00:03.000000')",
    "INSERT INTO outputs VALUES (2, 1, 'sr', NULL, '1.2.840.10008.5.1.4.1.1.88.22', '9.2', '9.0',"
    " '/out/9.2.dcm', '2024-05-01 10:00:03.000000')",
    "INSERT INTO sends VALUES (1, 1, 'pacs', 'PACS', 'pacs.local', 104, 'sent', 1, NULL, NULL,"
    " '2024-05-01 10:00:03.000000', '2024-05-01 10:00:04.000000')",
    "INSERT INTO send_attempts VALUES (1, 1, '2024-05-01 10:00:03.000000', '2024-05-01 10:00:04.000000',"
    " 'success', '')",
]


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@contextmanager
def _sqlite(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection (foreign keys on) whose work is committed, then closed."""
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA foreign_keys = ON")
        with db:
            yield db
    finally:
        db.close()


def _with_rows(path: Path) -> Path:
    with _sqlite(path) as db:
        for row in ROWS:
            db.execute(row)
    return path


def _legacy_from_ddl(path: Path) -> Path:
    """A database as the release before migrations left it: its DDL, no alembic_version."""
    with _sqlite(path) as db:
        db.executescript((DATA / "schema_0871801.sql").read_text())
    return path


def _legacy_from_revision(path: Path) -> Path:
    """The same from revision 0001, without the alembic_version that running it leaves."""
    engine = make_engine(_url(path))
    migrations.upgrade(engine, migrations.BASELINE)
    engine.dispose()
    with _sqlite(path) as db:
        db.execute("DROP TABLE alembic_version")
    return path


def _dump(path: Path, table: str) -> list[tuple[Any, ...]]:
    with _sqlite(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()


def _version(path: Path) -> str | None:
    with _sqlite(path) as db:
        has = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone()
        return db.execute("SELECT version_num FROM alembic_version").fetchone()[0] if has else None


def _schema(engine: Engine) -> dict[str, dict[str, Any]]:
    """Everything the node relies on of each table, as reflected (constraint names aside)."""
    insp = inspect(engine)
    return {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": sorted(
                (tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                for fk in insp.get_foreign_keys(table)
            ),
            "uniques": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), i["unique"]) for i in insp.get_indexes(table)
            ),
        }
        for table in sorted(set(insp.get_table_names()) - {"alembic_version"})
    }


def _schema_of(path: Path) -> dict[str, dict[str, Any]]:
    engine = create_engine(_url(path))
    try:
        return _schema(engine)
    finally:
        engine.dispose()


def _master(path: Path) -> list[tuple[str, ...]]:
    """SQLite's own record of the schema (the DDL text, whitespace normalised), alembic_version aside."""
    with _sqlite(path) as db:
        rows = db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE tbl_name != 'alembic_version' ORDER BY name"
        ).fetchall()
    return [tuple(" ".join((v or "").split()) for v in row) for row in rows]


def test_baseline_revision_is_the_schema_before_migrations(tmp_path: Path) -> None:
    from_ddl, from_revision = (
        _legacy_from_ddl(tmp_path / "ddl.db"),
        _legacy_from_revision(tmp_path / "rev.db"),
    )
    assert set(_schema_of(from_ddl)) == migrations.BASELINE_TABLES
    assert ("instance_id",) in _schema_of(from_ddl)["jobs"]["uniques"]
    assert _schema_of(from_revision) == _schema_of(from_ddl)
    assert _master(from_revision) == _master(from_ddl)  # the same DDL, word for word


def test_migrations_give_the_models_schema(tmp_path: Path) -> None:
    engine = make_engine(_url(tmp_path / "migrated.db"))
    create_schema(engine)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
    # compare_metadata skips unnamed UNIQUE constraints on SQLite (such as the one 0002 drops): compare
    # with what create_all makes of the models as well
    reference = create_engine(_url(tmp_path / "create_all.db"))
    Base.metadata.create_all(reference)
    migrated, made = _schema(engine), _schema(reference)
    # The one difference: ADD COLUMN appends, so outputs.instance_number and supersedes (0002) come after
    # path and created_at in a migrated database (as they will on PostgreSQL), and purged_at (0003) after
    # them; nothing uses column positions.
    added = ["instance_number", "supersedes", "purged_at"]
    assert [c[0] for c in migrated["outputs"]["columns"]][-3:] == added
    for schema in (migrated, made):
        schema["outputs"]["columns"].sort()
    assert migrated == made
    engine.dispose()
    reference.dispose()


@pytest.mark.parametrize("make_legacy", [_legacy_from_ddl, _legacy_from_revision], ids=["ddl", "revision"])
def test_database_before_migrations_is_upgraded_in_place(tmp_path: Path, make_legacy: Any) -> None:
    path = _with_rows(make_legacy(tmp_path / "node.db"))
    before = {table: _dump(path, table) for table in migrations.BASELINE_TABLES}
    assert _version(path) is None

    engine = make_engine(_url(path))
    create_schema(engine)

    assert _version(path) == migrations.head()
    for table in ("associations", "results"):
        assert _dump(path, table) == before[table]
    # + send_status (0006): the send is sent, and this was its last attempt
    assert _dump(path, "send_attempts") == [row + ("sent",) for row in before["send_attempts"]]
    # + purged_at (0003), revision and earlier_paths (0007)
    assert _dump(path, "instances") == [row + (None, 1, None) for row in before["instances"]]
    # + content_key (0002), leased_by and lease_until (0004)
    assert _dump(path, "jobs") == [row + (None, None, None) for row in before["jobs"]]
    assert _dump(path, "sends") == [row + (None, None) for row in before["sends"]]  # + leased_by, lease_until
    assert _dump(path, "deliveries") == []
    # + instance_number, supersedes, purged_at
    assert _dump(path, "outputs") == [row + (None, None, None) for row in before["outputs"]]
    assert _dump(path, "node_settings") == []
    assert _dump(path, "operations") == []
    assert _schema_of(path) == _schema_of(_create_schema_on_empty(tmp_path / "fresh.db"))
    output = (
        "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid, path,"
        " created_at) VALUES ({job}, 'sr', '1.2.840.10008.5.1.4.1.1.88.22', '9.2', '9.0', '/o', '2024-06-01')"
    )
    with engine.begin() as conn:  # foreign keys are back on; an instance can have a second job
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            conn.exec_driver_sql(output.format(job=99))
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, instance_id, status, attempts, reply_ae, created_at, content_key)"
            " VALUES (2, 1, 'queued', 0, 'SCU', '2024-06-01 00:00:00', 'k2')"
        )
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE instance_id = 1").scalar() == 2
        conn.exec_driver_sql(output.format(job=2))  # the same object again, for the second job
        with pytest.raises(IntegrityError, match="UNIQUE"):
            conn.exec_driver_sql(output.format(job=2))  # but once per job
        conn.exec_driver_sql(
            "INSERT INTO node_settings VALUES ('device_uid', '2.25.1', '2024-06-01 00:00:00')"
        )
    engine.dispose()


def _create_schema_on_empty(path: Path) -> Path:
    engine = make_engine(_url(path))
    create_schema(engine)
    engine.dispose()
    return path


def test_empty_database_gets_every_revision(tmp_path: Path) -> None:
    path = _create_schema_on_empty(tmp_path / "node.db")
    assert _version(path) == migrations.head()
    assert set(_schema_of(path)) == set(Base.metadata.tables)


def test_create_schema_twice_is_a_no_op(tmp_path: Path) -> None:
    path = _with_rows(_legacy_from_ddl(tmp_path / "node.db"))
    engine = make_engine(_url(path))
    create_schema(engine)

    def state() -> tuple[Any, ...]:
        with _sqlite(path) as db:
            master = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        return master, {t: _dump(path, t) for t in [*Base.metadata.tables, "alembic_version"]}

    first = state()
    create_schema(engine)
    assert state() == first
    engine.dispose()


def test_partial_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with _sqlite(path) as db:
        db.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY)")
    engine = make_engine(_url(path))
    with pytest.raises(RuntimeError, match="cannot tell its schema"):
        create_schema(engine)
    engine.dispose()
    assert _version(path) is None
    assert set(_schema_of(path)) == {"instances"}


def test_downgrade_to_baseline_gives_the_old_schema_back(tmp_path: Path) -> None:
    path = _with_rows(_legacy_from_ddl(tmp_path / "node.db"))
    jobs = _dump(path, "jobs")
    engine = make_engine(_url(path))
    create_schema(engine)
    with migrations.migrating(engine) as conn:
        command.downgrade(migrations.config(conn), migrations.BASELINE)
    engine.dispose()
    assert _version(path) == migrations.BASELINE
    assert _dump(path, "jobs") == jobs
    assert _schema_of(path) == _schema_of(_legacy_from_ddl(tmp_path / "ddl.db"))


_START = """
import sys, time
from node.db import create_schema, make_engine
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
create_schema(make_engine(sys.argv[1]))
"""


@pytest.mark.parametrize("old", [True, False], ids=["old-database", "no-database"])
def test_processes_starting_together_upgrade_once(tmp_path: Path, old: bool) -> None:
    """Four processes run create_schema on one database (old, or not there yet) at once: all succeed."""
    path = _with_rows(_legacy_from_ddl(tmp_path / "node.db")) if old else tmp_path / "node.db"
    at = str(time.time() + 2.0)  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _START, _url(path), at], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert _version(path) == migrations.head()
    assert len(_dump(path, "jobs")) == (1 if old else 0)
    assert _schema_of(path) == _schema_of(_create_schema_on_empty(tmp_path / "fresh.db"))


def test_postgresql_sql_renders_offline() -> None:
    """``alembic upgrade head --sql`` for PostgreSQL, without a server."""
    cfg = migrations.config()
    cfg.set_main_option("sqlalchemy.url", "postgresql://")
    cfg.output_buffer = io.StringIO()
    command.upgrade(cfg, "head", sql=True)
    sql = cfg.output_buffer.getvalue()
    assert "started_at TIMESTAMP WITH TIME ZONE NOT NULL" in sql
    assert "ALTER TABLE jobs DROP CONSTRAINT jobs_instance_id_key;" in sql
    assert "ALTER TABLE jobs ADD COLUMN content_key VARCHAR(64);" in sql
    assert "ALTER TABLE outputs DROP CONSTRAINT outputs_sop_instance_uid_key;" in sql
    assert "ALTER TABLE outputs ADD CONSTRAINT uq_outputs_job_sop UNIQUE (job_id, sop_instance_uid);" in sql
    assert "CREATE TABLE node_settings" in sql
    assert "UPDATE alembic_version SET version_num='0002'" in sql
    assert "ALTER TABLE instances ADD COLUMN purged_at TIMESTAMP WITH TIME ZONE;" in sql
    assert "ALTER TABLE outputs ADD COLUMN purged_at TIMESTAMP WITH TIME ZONE;" in sql
    assert "CREATE TABLE operations" in sql
    assert "UPDATE alembic_version SET version_num='0003'" in sql
    assert "ALTER TABLE jobs ADD COLUMN lease_until TIMESTAMP WITH TIME ZONE;" in sql
    assert "CREATE TABLE deliveries" in sql
    assert "UPDATE alembic_version SET version_num='0004'" in sql
    assert "CREATE TABLE workers" in sql
    assert "UPDATE alembic_version SET version_num='0005'" in sql
    assert "ALTER TABLE send_attempts ADD COLUMN send_status VARCHAR(16);" in sql
    assert "UPDATE alembic_version SET version_num='0006'" in sql
    assert "ALTER TABLE instances ADD COLUMN revision INTEGER DEFAULT '1' NOT NULL;" in sql
    assert "UPDATE alembic_version SET version_num='0007'" in sql


def test_revision_0002_database_keeps_its_rows_through_0003_and_back(tmp_path: Path) -> None:
    """A database of revision 0002 with rows: 0003 adds empty purge times and the operations table; the
    downgrade gives 0002's schema back, rows included."""
    path = _with_rows(_legacy_from_ddl(tmp_path / "node.db"))
    engine = make_engine(_url(path))
    migrations.upgrade(engine, "0002")
    engine.dispose()
    at_0002 = {table: _dump(path, table) for table in migrations.BASELINE_TABLES}
    schema_0002 = _schema_of(path)

    engine = make_engine(_url(path))
    migrations.upgrade(engine, "0003")
    assert _version(path) == "0003"
    assert _dump(path, "instances") == [row + (None,) for row in at_0002["instances"]]
    assert _dump(path, "outputs") == [row + (None,) for row in at_0002["outputs"]]
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO operations (at, command, arguments, actor, summary, detail)"
            " VALUES ('2024-06-01 00:00:00', 'purge', '--older-than 30', 'ops', '1 file', 'x')"
        )
        conn.exec_driver_sql("UPDATE instances SET purged_at = '2024-06-01 00:00:00'")
    with migrations.migrating(engine) as conn:
        command.downgrade(migrations.config(conn), "0002")
    engine.dispose()
    assert _version(path) == "0002"
    assert _schema_of(path) == schema_0002
    assert {table: _dump(path, table) for table in migrations.BASELINE_TABLES} == at_0002


def test_revision_0006_marks_the_attempts_that_ended_their_sends(tmp_path: Path) -> None:
    """Attempts recorded before 0006: the last attempt of a send that is sent or failed now ended it, every
    other one left it pending; so the count of ended sends goes on from where it was."""
    path = _with_rows(_legacy_from_ddl(tmp_path / "node.db"))  # send 1: sent, after one attempt
    engine = make_engine(_url(path))
    migrations.upgrade(engine, "0005")
    engine.dispose()
    with _sqlite(path) as db:
        for send_id, status in ((2, "failed"), (3, "pending"), (4, "sent")):
            db.execute(
                "INSERT INTO sends (id, job_id, destination, ae_title, host, port, status, attempts,"
                f" created_at) VALUES ({send_id}, 1, 'pacs{send_id}', 'PACS', 'h', 104, '{status}', 2,"
                " '2024-05-01 10:00:00')"
            )
        for send_id, outcome in ((2, "failed"), (4, "failed"), (2, "failed"), (3, "failed"), (4, "sent")):
            db.execute(
                "INSERT INTO send_attempts (send_id, started_at, outcome, detail)"
                f" VALUES ({send_id}, '2024-05-01 10:00:01', '{outcome}', '')"
            )
    engine = make_engine(_url(path))
    migrations.upgrade(engine)
    engine.dispose()
    assert _version(path) == migrations.head()
    with _sqlite(path) as db:
        marked = db.execute("SELECT send_id, outcome, send_status FROM send_attempts ORDER BY id").fetchall()
    assert marked == [
        (1, "success", "sent"),
        (2, "failed", "pending"),
        (4, "failed", "pending"),
        (2, "failed", "failed"),
        (3, "failed", "pending"),
        (4, "sent", "sent"),
    ]
