"""node.db on PostgreSQL (``postgresql+psycopg://``): the migrations, concurrent starts, timestamps, enums.

A real server (tests/postgres.py, the ``postgres_server`` and ``pg_url`` fixtures), no mocks: each test
gets a new empty database. The same checks as test_migrations.py and test_db.py make on SQLite, with
their helpers; the offline ``--sql`` rendering for PostgreSQL is test_migrations.py's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, inspect, select, text, update
from sqlalchemy import Enum as SAEnum
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import sessionmaker

from gradcam.config import CoreConfig
from node.checks import StartError, open_database
from node.config import NodeConfig, Settings
from node.db import (
    Association,
    AssociationStatus,
    Base,
    Instance,
    InstanceStatus,
    Job,
    JobStatus,
    create_schema,
    make_engine,
    migrations,
    session_factory,
    utcnow,
)
from tests.node.test_db import _instance, _job
from tests.node.test_migrations import _START, ROOT, _schema
from tests.postgres import PostgresServer

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)

# test_migrations.ROWS as values (its SQL text is SQLite's: 1/0 for booleans), inserted without ids so
# that the sequences stay right; the rows get ids 1, 2, ... in this order.
ROWS: dict[str, list[dict[str, Any]]] = {
    "associations": [
        dict(calling_ae="SCU", called_ae="NODE", peer_host="127.0.0.1", peer_port=11112, started_at=T0,
             ended_at=None, status="released", reason=None, n_received=1, n_failed=0),
    ],
    "instances": [
        dict(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
             study_instance_uid="1.2", series_instance_uid="1.2.1", patient_id="P", modality="DX",
             transfer_syntax="1.2.840.10008.1.2.1", path="/spool/1.dcm", size_bytes=123, association_id=1,
             calling_ae="SCU", received_at=T0 + timedelta(seconds=1), times_received=1, status="stored"),
    ],
    "jobs": [
        dict(instance_id=1, status="done", reason=None, attempts=1, next_attempt_at=None, reply_ae="SCU",
             consensus=True, created_at=T0 + timedelta(seconds=1), started_at=T0 + timedelta(seconds=2),
             finished_at=T0 + timedelta(seconds=3), duration_ms=812.5),
    ],
    "results": [
        dict(job_id=1, model=model, builder=model, probability=p, threshold=0.5, positive=p > 0.5,
             cam_peak_row=row, cam_peak_col=row + 1, checkpoint_sha256=sha, ms=ms,
             created_at=T0 + timedelta(seconds=3))
        for model, p, row, sha, ms in [("densenet121", 0.8, 3, "ab", 100.0), ("resnet50", 0.3, 5, "cd", 90.0)]
    ],
    "outputs": [
        dict(job_id=1, kind=kind, model=model, sop_class_uid=cls, sop_instance_uid=uid,
             series_instance_uid="9.0", path=f"/out/{uid}.dcm", created_at=T0 + timedelta(seconds=3))
        for kind, model, cls, uid in [
            ("sc", "densenet121", "1.2.840.10008.5.1.4.1.1.7", "9.1"),
            ("sr", None, "1.2.840.10008.5.1.4.1.1.88.22", "9.2"),
        ]
    ],
    "sends": [
        dict(job_id=1, destination="pacs", ae_title="PACS", host="pacs.local", port=104, status="sent",
             attempts=1, next_attempt_at=None, last_error=None, created_at=T0 + timedelta(seconds=3),
             sent_at=T0 + timedelta(seconds=4)),
    ],
    "send_attempts": [
        dict(send_id=1, started_at=T0 + timedelta(seconds=3), finished_at=T0 + timedelta(seconds=4),
             outcome="success", detail=""),
    ],
}  # fmt: skip


@pytest.fixture
def other_pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A second new database, for a reference schema."""
    with postgres_server.fresh_database() as url:
        yield url


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    """The node's engine (make_engine) on the test's empty database."""
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def _version(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return migrations.current(conn)


def _dump(engine: Engine, table: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY 1")]


def _catalog(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """PostgreSQL's own record of the schema, word for word (constraint and index names included),
    alembic_version aside: the analogue of test_migrations._master."""
    public = "'public'::regnamespace"
    queries = {
        "columns": "SELECT table_name, ordinal_position, column_name, data_type, character_maximum_length,"
        " is_nullable, column_default FROM information_schema.columns WHERE table_schema = 'public'",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
        f" FROM pg_constraint WHERE connamespace = {public}",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
        "sequences": f"SELECT relname FROM pg_class WHERE relnamespace = {public} AND relkind = 'S'",
        "types": f"SELECT typname FROM pg_type WHERE typnamespace = {public} AND typtype = 'e'",
    }
    with engine.connect() as conn:
        rows = {what: [tuple(row) for row in conn.exec_driver_sql(sql)] for what, sql in queries.items()}
    return {what: sorted(r for r in found if "alembic_version" not in r[:2]) for what, found in rows.items()}


def _insert_rows(engine: Engine) -> None:
    """test_migrations.ROWS, into the tables as they are (reflected)."""
    meta = MetaData()
    with engine.begin() as conn:
        meta.reflect(conn, only=list(ROWS))
        for table, rows in ROWS.items():
            conn.execute(meta.tables[table].insert(), rows)


def _at_baseline(engine: Engine, *, stamped: bool = True) -> Engine:
    """A database at revision 0001 (stamped), or as the release before migrations left it (not)."""
    migrations.upgrade(engine, migrations.BASELINE)
    if not stamped:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE alembic_version")
    return engine


def _with_schema(url: str, revision: str = "head") -> dict[str, Any]:
    """_schema and _catalog of a new database brought to ``revision`` by the node."""
    engine = make_engine(url)
    try:
        migrations.upgrade(engine, revision)
        return {"schema": _schema(engine), "catalog": _catalog(engine)}
    finally:
        engine.dispose()


# -- migrations -------------------------------------------------------------------------------------


def test_empty_database_gets_every_revision_and_the_models_schema(engine: Engine, other_pg_url: str) -> None:
    create_schema(engine)
    assert _version(engine) == migrations.head()
    assert set(inspect(engine).get_table_names()) == {*Base.metadata.tables, "alembic_version"}
    with engine.connect() as conn:
        opts = {"compare_type": True, "compare_server_default": True}
        assert compare_metadata(MigrationContext.configure(conn, opts=opts), Base.metadata) == []
    # and what create_all makes of the models, as test_migrations does on SQLite
    reference = make_engine(other_pg_url)
    try:
        Base.metadata.create_all(reference)
        migrated, made = _schema(engine), _schema(reference)
    finally:
        reference.dispose()
    # ADD COLUMN appends (outputs.instance_number and supersedes of 0002 come after path and created_at,
    # unlike in the models): column positions aside, as nothing uses them
    for schema in (migrated, made):
        for table in schema.values():
            table["columns"].sort()
    assert migrated == made
    # no native ENUM types: statuses are VARCHAR(16), as on SQLite
    assert _catalog(engine)["types"] == []


def test_create_schema_twice_is_a_no_op(engine: Engine) -> None:
    _insert_rows(_at_baseline(engine, stamped=False))
    create_schema(engine)

    def state() -> tuple[Any, ...]:
        tables = [*Base.metadata.tables, "alembic_version"]
        return _catalog(engine), {table: _dump(engine, table) for table in tables}

    first = state()
    create_schema(engine)
    assert state() == first
    assert _version(engine) == migrations.head()


@pytest.mark.parametrize("stamped", [True, False], ids=["revision-0001", "before-migrations"])
def test_database_at_0001_is_upgraded_in_place(engine: Engine, other_pg_url: str, stamped: bool) -> None:
    _insert_rows(_at_baseline(engine, stamped=stamped))
    before = {table: _dump(engine, table) for table in migrations.BASELINE_TABLES}
    assert _version(engine) == (migrations.BASELINE if stamped else None)
    assert [len(before[table]) for table in ROWS] == [len(rows) for rows in ROWS.values()]

    create_schema(engine)

    assert _version(engine) == migrations.head()
    # send_attempts.send_status (0006) is filled from the sends: the one send is sent after one attempt;
    # instances.revision (0007) is 1
    filled = {"send_attempts": {"sent"}, "instances": {None, 1}}
    for table, rows in before.items():  # every row as it was; the columns added since, empty
        after = _dump(engine, table)
        assert [row[: len(old)] for row, old in zip(after, rows, strict=True)] == rows, table
        added = {v for row, old in zip(after, rows, strict=True) for v in row[len(old) :]}
        assert added == filled[table] if table in filled else added <= {None}, table
    for table in set(Base.metadata.tables) - migrations.BASELINE_TABLES:
        assert _dump(engine, table) == [], table
    fresh = _with_schema(other_pg_url)
    assert _schema(engine) == fresh["schema"]
    assert _catalog(engine) == fresh["catalog"]  # constraint and index names too

    output = (
        "INSERT INTO outputs (job_id, kind, sop_class_uid, sop_instance_uid, series_instance_uid, path,"
        " created_at) VALUES ({job}, 'sr', '1.2.840.10008.5.1.4.1.1.88.22', '9.2', '9.0', '/o', now())"
    )
    with pytest.raises(IntegrityError, match="foreign key"), engine.begin() as conn:
        conn.exec_driver_sql(output.format(job=99))
    with engine.begin() as conn:  # an instance can have a second job (ids go on from the rows')
        job = conn.exec_driver_sql(
            "INSERT INTO jobs (instance_id, status, attempts, reply_ae, created_at, content_key)"
            " VALUES (1, 'queued', 0, 'SCU', '2024-06-01Z', 'k2') RETURNING id"
        ).scalar_one()
        assert job == 2
        conn.exec_driver_sql(output.format(job=job))  # the same object again, for the second job
        conn.exec_driver_sql("INSERT INTO node_settings VALUES ('device_uid', '2.25.1', '2024-06-01Z')")
    with pytest.raises(IntegrityError, match="uq_outputs_job_sop"), engine.begin() as conn:
        conn.exec_driver_sql(output.format(job=job))  # but once per job


def test_downgrade_to_baseline_gives_the_old_schema_back(engine: Engine, other_pg_url: str) -> None:
    _insert_rows(_at_baseline(engine))
    jobs = _dump(engine, "jobs")
    create_schema(engine)
    with migrations.migrating(engine) as conn:
        command.downgrade(migrations.config(conn), migrations.BASELINE)
    assert _version(engine) == migrations.BASELINE
    assert _dump(engine, "jobs") == jobs
    baseline = _with_schema(other_pg_url, migrations.BASELINE)
    assert _schema(engine) == baseline["schema"]
    assert _catalog(engine) == baseline["catalog"]  # jobs_instance_id_key etc. under their old names


_LOGGED_START = "import logging\nlogging.basicConfig(level=logging.INFO)\n" + _START


@pytest.mark.parametrize("old", [True, False], ids=["old-database", "empty-database"])
def test_processes_starting_together_upgrade_once(engine: Engine, pg_url: str, old: bool) -> None:
    """Four processes run create_schema on one database at the same moment: all succeed, and the
    revisions run once, in one of them (the others wait for the advisory lock, then find them done)."""
    if old:
        _insert_rows(_at_baseline(engine, stamped=False))
    engine.dispose()  # no connection of ours meanwhile
    at = str(time.time() + 2.0)  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOGGED_START, pg_url, at], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    logs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, logs

    steps = re.findall(r"Running (upgrade|stamp_revision) +(\S*) -> (\w+)", "".join(logs))
    revisions = reversed(list(ScriptDirectory.from_config(migrations.config()).walk_revisions()))
    expected = [("upgrade", r.down_revision or "", r.revision) for r in revisions]
    if old:  # stamped with the baseline, then upgraded from there
        expected[0] = ("stamp_revision", "", migrations.BASELINE)
    assert steps == expected  # each once, in all four processes together
    done = [line for log in logs for line in log.splitlines() if "database schema" in line]
    assert len(done) == 1, done  # created / upgraded, by one process
    assert ("upgraded from revision" if old else "created") in done[0]

    assert _version(engine) == migrations.head()
    assert len(_dump(engine, "jobs")) == (1 if old else 0)


# -- the node's tables ------------------------------------------------------------------------------


@pytest.fixture
def pg_sessions(pg_url: str) -> Iterator[sessionmaker]:
    """Sessions at the current schema, on a connection whose time zone is not UTC (nor a whole hour)."""
    url = make_url(pg_url).update_query_dict({"options": "-c TimeZone=Pacific/Chatham"})
    engine = make_engine(url.render_as_string(hide_password=False))
    create_schema(engine)
    yield session_factory(engine)
    engine.dispose()


def test_timestamps_are_aware_utc(pg_sessions: sessionmaker) -> None:
    with pg_sessions() as s:
        assert s.execute(text("SHOW TimeZone")).scalar() == "Pacific/Chatham"
    paris = ZoneInfo("Europe/Paris")
    started = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC).astimezone(paris)
    received = datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC).astimezone(paris)  # another offset
    due = datetime(2025, 3, 30, 0, 30, tzinfo=UTC)
    before = utcnow()
    with pg_sessions.begin() as s:
        assoc = Association(
            calling_ae="SCU", called_ae="NODE", peer_host="h", peer_port=1, status=AssociationStatus.ACCEPTED,
            started_at=started, n_received=0, n_failed=0,
        )  # fmt: skip
        s.add(assoc)
        s.flush()
        inst = _instance(s, association_id=assoc.id, received_at=received)
        job = _job(s, inst)  # created_at: the default, utcnow()
        job.next_attempt_at = due
    after = utcnow()

    with pg_sessions() as s:
        got = {
            "associations.started_at": s.get(Association, assoc.id).started_at,
            "instances.received_at": s.get(Instance, inst.id).received_at,
            "jobs.next_attempt_at": s.get(Job, job.id).next_attempt_at,
            "jobs.created_at": s.get(Job, job.id).created_at,
        }
        # the instants the server holds, whatever the session's zone
        epochs = s.execute(
            text(
                "SELECT extract(epoch FROM a.started_at), extract(epoch FROM i.received_at),"
                " extract(epoch FROM j.next_attempt_at) FROM associations a, instances i, jobs j"
            )
        ).one()
        assert s.get(Job, job.id).started_at is None
    for column, value in got.items():
        assert value.tzinfo is UTC, (column, value)
    assert got["associations.started_at"] == started
    assert got["instances.received_at"] == received
    assert (got["instances.received_at"].year, got["instances.received_at"].microsecond) == (2024, 999999)
    assert got["jobs.next_attempt_at"] == due
    assert before <= got["jobs.created_at"] <= after
    assert [float(e) for e in epochs] == [started.timestamp(), received.timestamp(), due.timestamp()]

    with pytest.raises(StatementError, match="naive datetime"), pg_sessions.begin() as s:
        _instance(s, uid="7.7", received_at=datetime(2024, 5, 1, 12, 0))


def test_enums_stored_as_lowercase_strings_and_one_claim_wins(pg_sessions: sessionmaker) -> None:
    with pg_sessions.begin() as s:
        s.add(
            Association(calling_ae="SCU", called_ae="NODE", peer_host="h", peer_port=1,
                        status=AssociationStatus.RELEASED, n_received=1, n_failed=0)
        )  # fmt: skip
        job_id = _job(s, _instance(s)).id
    with pg_sessions() as s:
        raw = s.execute(
            text("SELECT a.status, i.status, j.status FROM associations a, instances i, jobs j")
        ).one()
        assert tuple(raw) == ("released", "stored", "queued")
        assert all(type(v) is str for v in raw)
        assert s.execute(text("SELECT id FROM jobs WHERE status = 'queued'")).scalar() == job_id
        tables = Base.metadata.tables.values()
        enums = [(t.name, c.name) for t in tables for c in t.columns if isinstance(c.type, SAEnum)]
        assert len(enums) >= 4
        columns = s.execute(
            text(
                "SELECT table_name, column_name, data_type, character_maximum_length"
                " FROM information_schema.columns WHERE table_schema = 'public'"
            )
        ).all()
        types = {(table, column): rest for table, column, *rest in columns}
        assert {column: types[column] for column in enums} == dict.fromkeys(enums, ["character varying", 16])
        job = s.get(Job, job_id)
        assert job.status is JobStatus.QUEUED and s.get(Instance, 1).status is InstanceStatus.STORED

    # The contract's claim statement: of eight claims of one job at the same moment, exactly one wins.
    claim = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1)
    )
    won: list[int] = []
    barrier = threading.Barrier(8)

    def claim_it() -> None:
        with pg_sessions.begin() as s:
            barrier.wait(10)
            won.append(s.execute(claim).rowcount)

    threads = [threading.Thread(target=claim_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(won) == [0] * 7 + [1]
    with pg_sessions() as s:
        assert s.scalar(select(Job.status).where(Job.id == job_id)) is JobStatus.RUNNING
        assert s.execute(text("SELECT status, attempts FROM jobs")).one() == ("running", 1)


def test_password_comes_from_the_environment_not_only_the_url(
    postgres_server: PostgresServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database user with a password (scram-sha-256): a URL without it works with PGPASSWORD in the
    node's environment (as docker-compose.scale.yml gives it); without, the node says in one line where the
    password goes, and never shows one."""
    user = f"pw_{uuid.uuid4().hex[:8]}"
    password = "s3cret/with@odd:chars"
    postgres_server.add_password_user(user, password, make_url(pg_url).database)
    url = make_url(pg_url).set(username=user).render_as_string(hide_password=False)
    settings = Settings(
        path=tmp_path / "node.toml",
        core=CoreConfig(path=tmp_path / "node.toml", models=()),
        node=NodeConfig(database_url=url),
    )
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    with pytest.raises(StartError) as refused:
        open_database(settings)
    message = str(refused.value)
    assert "\n" not in message and "PGPASSWORD" in message and str(settings.path) in message, message

    monkeypatch.setenv("PGPASSWORD", "wrong")
    with pytest.raises(StartError, match="password authentication failed") as wrong:
        open_database(settings)
    assert "wrong" not in str(wrong.value).replace("password authentication failed", "")

    monkeypatch.setenv("PGPASSWORD", password)
    engine, sessions = open_database(settings)
    try:
        assert _version(engine) == migrations.head()
        with sessions() as s:
            assert s.scalar(text("SELECT current_user")) == user
    finally:
        engine.dispose()
