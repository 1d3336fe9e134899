"""node.db: SQLite settings, constraints of the contract, UTC timestamps, recover()."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import sessionmaker

from node.db import (
    Association,
    AssociationStatus,
    Instance,
    Job,
    JobStatus,
    Output,
    Result,
    Send,
    SendStatus,
    create_schema,
    make_engine,
    recover,
    session_factory,
    utcnow,
)


@pytest.fixture
def db(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'node.db'}")
    create_schema(engine)
    yield session_factory(engine)
    engine.dispose()


def _instance(s, uid: str = "1.2.3", **kw) -> Instance:
    inst = Instance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2",
        series_instance_uid="1.2.1",
        patient_id="P",
        modality="DX",
        transfer_syntax="1.2.840.10008.1.2.1",
        path="/x",
        size_bytes=1,
        calling_ae="SCU",
        **kw,
    )
    s.add(inst)
    s.flush()
    return inst


def _job(s, inst: Instance, status: JobStatus = JobStatus.QUEUED) -> Job:
    job = Job(instance_id=inst.id, status=status, attempts=0, reply_ae="SCU")
    s.add(job)
    s.flush()
    return job


def test_sqlite_pragmas_and_parent_dir(tmp_path: Path, db: sessionmaker) -> None:
    assert (tmp_path / "sub" / "node.db").is_file()
    with db() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_schema_is_idempotent_and_complete(db: sessionmaker) -> None:
    engine = db.kw["bind"]
    create_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert {"associations", "instances", "jobs", "results", "outputs", "sends", "send_attempts"} <= tables


def test_unique_sop_instance_uid(db: sessionmaker) -> None:
    with db.begin() as s:
        _instance(s)
    with pytest.raises(IntegrityError), db.begin() as s:
        _instance(s)


def test_an_instance_keeps_every_analysis(db: sessionmaker) -> None:
    # one job per analysis: a re-analysis with another configuration is a second job, the first stays
    with db.begin() as s:
        inst = _instance(s)
        _job(s, inst)
    with db.begin() as s:
        _job(s, s.merge(inst))
    with db() as s:
        assert [j.id for j in s.get(Instance, inst.id).jobs] == [1, 2]


def test_unique_result_per_model_output_uid_per_job_and_send_per_destination(db: sessionmaker) -> None:
    def result(job_id: int, model: str) -> Result:
        return Result(
            job_id=job_id, model=model, builder="resnet18", probability=0.5, threshold=0.5, positive=True,
            cam_peak_row=1, cam_peak_col=2, checkpoint_sha256="0" * 64, ms=1.0,
        )  # fmt: skip

    def output(job_id: int, uid: str) -> Output:
        return Output(
            job_id=job_id, kind="sc", model="M", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
            sop_instance_uid=uid, series_instance_uid="9.9", path="/o",
        )  # fmt: skip

    def send(job_id: int, dest: str) -> Send:
        return Send(job_id=job_id, destination=dest, ae_title="ORTHANC", host="127.0.0.1", port=4242)

    with db.begin() as s:
        job_id = _job(s, _instance(s)).id
        s.add_all([result(job_id, "A"), result(job_id, "B"), output(job_id, "5.1"), send(job_id, "orthanc")])
    for bad in (result(job_id, "A"), output(job_id, "5.1"), send(job_id, "orthanc")):
        with pytest.raises(IntegrityError), db.begin() as s:
            s.add(bad)
    # the same object made again by another analysis of the image (a configuration it had before)
    with db.begin() as s:
        other = _job(s, s.get(Job, job_id).instance).id
        s.add(output(other, "5.1"))


def test_foreign_keys_enforced(db: sessionmaker) -> None:
    with pytest.raises(IntegrityError), db.begin() as s:
        s.add(Job(instance_id=999, status=JobStatus.QUEUED, attempts=0, reply_ae="X"))


def test_timestamps_are_aware_utc_and_naive_refused(db: sessionmaker) -> None:
    paris = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Paris")
    )
    with db.begin() as s:
        inst = _instance(s, received_at=paris)
    with db() as s:
        got = s.get(Instance, inst.id).received_at
    assert got.tzinfo is not None and got.utcoffset() == timedelta(0)
    assert got == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    with pytest.raises(StatementError, match="naive datetime"), db.begin() as s:
        _instance(s, uid="7.7", received_at=datetime(2024, 5, 1, 12, 0))


def test_enums_stored_as_lowercase_values_and_atomic_claim(db: sessionmaker) -> None:
    with db.begin() as s:
        job_id = _job(s, _instance(s)).id
    with db() as s:
        assert s.execute(text("SELECT status FROM jobs")).scalar() == "queued"
    # The contract's claim statement: only one of two claims of the same job wins.
    claim = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=utcnow(), attempts=Job.attempts + 1)
    )
    with db.begin() as s:
        assert s.execute(claim).rowcount == 1
    with db.begin() as s:
        assert s.execute(claim).rowcount == 0
    with db() as s:
        job = s.get(Job, job_id)
        assert job.status is JobStatus.RUNNING and job.attempts == 1


def test_recover_requeues_running_jobs_and_sending_sends(db: sessionmaker) -> None:
    with db.begin() as s:
        running = _job(s, _instance(s, "1.1"), JobStatus.RUNNING)
        running.started_at = utcnow()
        running.attempts = 2
        done = _job(s, _instance(s, "1.2"), JobStatus.DONE)
        queued = _job(s, _instance(s, "1.3"), JobStatus.QUEUED)
        sending = Send(
            job_id=done.id, destination="a", ae_title="A", host="h", port=1, status=SendStatus.SENDING,
            next_attempt_at=utcnow() + timedelta(hours=1),
        )  # fmt: skip
        sent = Send(job_id=done.id, destination="b", ae_title="B", host="h", port=1, status=SendStatus.SENT)
        s.add_all([sending, sent])
    before = utcnow()
    assert recover(db) == (1, 1)
    with db() as s:
        r = s.get(Job, running.id)
        assert (r.status, r.started_at, r.attempts) == (JobStatus.QUEUED, None, 2)
        assert s.get(Job, done.id).status is JobStatus.DONE
        assert s.get(Job, queued.id).status is JobStatus.QUEUED
        snd = s.get(Send, sending.id)
        assert snd.status is SendStatus.PENDING and before <= snd.next_attempt_at <= utcnow()
        assert s.get(Send, sent.id).status is SendStatus.SENT
    assert recover(db) == (0, 0)


def test_concurrent_read_then_write_transactions_do_not_fail(db: sessionmaker) -> None:
    """BEGIN IMMEDIATE + busy timeout: threads that read then write wait for each other, never error."""
    with db.begin() as s:
        assoc = Association(
            calling_ae="A", called_ae="B", peer_host="h", peer_port=1, status=AssociationStatus.ACCEPTED,
            n_received=0, n_failed=0,
        )  # fmt: skip
        s.add(assoc)
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(20):
                with db.begin() as s:
                    n = s.scalar(select(Association.n_received).where(Association.id == assoc.id))
                    s.execute(update(Association).where(Association.id == assoc.id).values(n_received=n + 1))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with db() as s:
        # Read-modify-write without lost updates proves the transactions were serialised.
        assert s.get(Association, assoc.id).n_received == 80


def test_memory_database_for_tests() -> None:
    engine = make_engine("sqlite://")
    create_schema(engine)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        _instance(s)
    with sessions() as s:
        assert s.scalar(select(Instance.sop_instance_uid)) == "1.2.3"
    engine.dispose()


def _in_thread(fn, timeout: float = 10.0) -> None:  # noqa: ANN001
    """Run ``fn`` in a thread; fail (instead of hanging for the busy timeout) if it does not finish."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "a transaction could not begin: the write lock was not given back"
    if errors:
        raise errors[0]


def test_threads_queue_for_the_write_lock(tmp_path: Path) -> None:
    """Eight threads each run 25 read-modify-write transactions on one row: none is refused ("database is
    locked") and no update is lost."""
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        with engine.begin() as c:
            c.execute(text("CREATE TABLE counter (n INTEGER)"))
            c.execute(text("INSERT INTO counter VALUES (0)"))

        def work() -> None:
            for _ in range(25):
                with engine.begin() as c:
                    n = c.execute(text("SELECT n FROM counter")).scalar_one()
                    c.execute(text("UPDATE counter SET n = :n"), {"n": n + 1})

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with engine.begin() as c:
            assert c.execute(text("SELECT n FROM counter")).scalar_one() == 200
    finally:
        engine.dispose()


def test_write_lock_is_given_back_after_rollback_and_a_dropped_connection(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        with engine.begin() as c:
            c.execute(text("CREATE TABLE t (n INTEGER)"))
        with pytest.raises(ZeroDivisionError), engine.begin() as c:
            c.execute(text("INSERT INTO t VALUES (1)"))
            _ = 1 / 0  # rolled back
        conn = engine.connect()
        conn.begin()
        conn.execute(text("INSERT INTO t VALUES (2)"))
        conn.invalidate()  # dropped inside its transaction, never committed nor rolled back by us
        conn.close()

        def count() -> None:
            with engine.begin() as c:
                assert c.execute(text("SELECT count(*) FROM t")).scalar_one() == 0

        _in_thread(count)
    finally:
        engine.dispose()
