"""node.db.doorbell: on PostgreSQL a queued job or send rings the processes that listen, at commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from node.config import Destination
from node.db import JobStatus, create_schema, make_engine, session_factory
from node.db.doorbell import JOBS, SENDS, Listener
from node.queue import JobSignal
from node.receive.store import InstanceStore
from node.send.outbox import create_send
from tests.node.test_db import _instance, _job
from tests.node.test_store import _rec


@pytest.fixture
def pg(pg_url: str) -> Iterator[tuple[str, sessionmaker]]:
    engine = make_engine(pg_url)
    create_schema(engine)
    yield pg_url, session_factory(engine)
    engine.dispose()


def _listening(url: str, channel: str) -> tuple[Listener, threading.Event]:
    rung = threading.Event()
    listener = Listener(url, channel, rung.set)
    listener.start()
    assert rung.wait(10), "the listener rings once when it connects (rings missed meanwhile)"
    rung.clear()
    return listener, rung


def test_a_queued_job_and_a_send_ring_at_commit(pg: tuple[str, sessionmaker]) -> None:
    url, sessions = pg
    jobs, job_rung = _listening(url, JOBS)
    sends, send_rung = _listening(url, SENDS)
    try:
        with sessions.begin() as s:
            done = _job(s, _instance(s, "1.1"), JobStatus.DONE)
            assert not job_rung.wait(0.3), "nothing before the commit"
        assert not job_rung.wait(0.5), "a job that is not queued rings nobody"
        with sessions.begin() as s:
            _job(s, _instance(s, "1.2"))
        assert job_rung.wait(5)
        assert not send_rung.is_set()
        with sessions.begin() as s:
            create_send(s, done.id, Destination("pacs", "PACS", "127.0.0.1", 104))
        assert send_rung.wait(5)
    finally:
        jobs.stop()
        sends.stop()


def test_sqlite_has_no_doorbell(tmp_path: Path) -> None:
    listener = Listener(f"sqlite:///{tmp_path / 'node.db'}", JOBS, lambda: None)
    listener.start()
    assert listener._thread is None
    listener.stop()


def test_an_instance_received_rings_the_workers_and_a_skipped_one_does_not(
    pg: tuple[str, sessionmaker], tmp_path: Path
) -> None:
    """The receiving store inserts its rows without the ORM (node.receive.store): it rings itself."""
    url, sessions = pg
    jobs, job_rung = _listening(url, JOBS)
    store = InstanceStore(tmp_path / "spool", sessions, JobSignal(), 0)
    try:
        store.store(_rec("1.2.3.1", analysable=False), b"not analysed")
        assert not job_rung.wait(0.5), "a skipped instance queues no job"
        result = store.store(_rec("1.2.3.2"), b"queued")
        assert result.job_status is JobStatus.QUEUED
        assert job_rung.wait(5)
    finally:
        jobs.stop()
