"""Outbox data access (backoff, due selection, claiming, attempt recording) on a real SQLite file, the
sender thread against a real pynetdicom SCP on loopback, and the worker that fills the outbox (real small
model, real files)."""

from __future__ import annotations

import logging
import os
import signal as signal_module
import socket
import subprocess
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gradcam.config import CoreConfig, ModelConfig, RenderConfig
from gradcam.models import build_model, save_checkpoint
from node.config import Destination, NodeConfig, OutboxConfig, Settings, WorkerConfig
from node.db import (
    Instance,
    Job,
    JobStatus,
    Output,
    Result,
    Send,
    SendAttempt,
    SendStatus,
    create_schema,
    make_engine,
    recover,
    session_factory,
    utcnow,
)
from node.http.metrics import make_registry, render
from node.ops.peers import port_is_free
from node.ops.resend import resend
from node.queue import JobSignal
from node.send.association import SC_SOP_CLASS
from node.send.echo import echo_command
from node.send.link import Link, SendOutcome
from node.send.outbox import (
    OutgoingFile,
    SendWork,
    backoff_delay,
    claim_send,
    create_send,
    due_send_ids,
    next_due_at,
    record_attempt,
    record_delivery,
)
from node.send.sender import Sender
from node.work.claim import claim_jobs
from node.work.worker import Worker

STORESCP = "/usr/bin/storescp"  # DCMTK's, not pynetdicom's script of the same name
CFG = OutboxConfig(max_attempts=4, backoff_initial_s=2.0, backoff_max_s=10.0)


@pytest.fixture
def factory(tmp_path: Path) -> sessionmaker[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    yield session_factory(engine)
    engine.dispose()


def _job(
    factory: sessionmaker[Session],
    status: JobStatus = JobStatus.QUEUED,
    *,
    sop_uid: str | None = None,
    path: Path | None = None,
    reply_ae: str = "MODALITY",
    **job_kw: object,
) -> int:
    uid = sop_uid or generate_uid()
    with factory.begin() as s:
        inst = Instance(
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            study_instance_uid=generate_uid(),
            series_instance_uid=generate_uid(),
            patient_id="PHANTOM",
            modality="DX",
            transfer_syntax=ExplicitVRLittleEndian,
            path=str(path or f"/spool/{uid}.dcm"),
            size_bytes=1,
            calling_ae="MODALITY",
        )
        s.add(inst)
        s.flush()
        job = Job(instance_id=inst.id, status=status, reply_ae=reply_ae, **job_kw)
        s.add(job)
        s.flush()
        return job.id


def _send(factory: sessionmaker[Session], port: int = 104, **send_kw: object) -> int:
    job_id = _job(factory, JobStatus.DONE)
    with factory.begin() as s:
        send_id = create_send(s, job_id, Destination("pacs", "PACS", "127.0.0.1", port))
        send = s.get(Send, send_id)
        for k, v in send_kw.items():
            setattr(send, k, v)
        return send_id


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    assert [backoff_delay(n, CFG) for n in range(1, 7)] == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert backoff_delay(0, CFG) == 0.0
    assert backoff_delay(10_000, CFG) == 10.0  # no overflow for absurd counts


def test_due_selection_only_pending_and_due(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    due_old = _send(factory, next_attempt_at=now - timedelta(seconds=30))
    due_now = _send(factory, next_attempt_at=now)
    future = _send(factory, next_attempt_at=now + timedelta(seconds=60))
    _send(factory, status=SendStatus.SENDING, next_attempt_at=now - timedelta(seconds=5))
    _send(factory, status=SendStatus.SENT, next_attempt_at=None)
    _send(factory, status=SendStatus.FAILED, next_attempt_at=None)
    with factory() as s:
        assert due_send_ids(s, now) == [due_old, due_now]
        assert due_send_ids(s, now + timedelta(seconds=61)) == [due_old, due_now, future]
        assert next_due_at(s) == now - timedelta(seconds=30)
    for send_id in (due_old, due_now):
        assert claim_send(factory, send_id, now) is not None
    with factory() as s:
        # the earliest *pending* due time is what the sender sleeps towards
        assert next_due_at(s) == now + timedelta(seconds=60)


def test_next_due_none_when_nothing_pending(factory: sessionmaker[Session]) -> None:
    _send(factory, status=SendStatus.SENT)
    with factory() as s:
        assert next_due_at(s) is None
        assert due_send_ids(s) == []


def test_claim_send_is_atomic_and_counts_attempt(factory: sessionmaker[Session]) -> None:
    send_id = _send(factory)
    with factory.begin() as s:
        job_id = s.get(Send, send_id).job_id
        s.add(
            Output(
                job_id=job_id,
                kind="sr",
                model=None,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                path="/x/sr.dcm",
            )
        )
    first = claim_send(factory, send_id)
    second = claim_send(factory, send_id)
    assert first is not None and second is None
    assert first.attempt == 1 and [f.kind for f in first.files] == ["sr"]
    with factory() as s:
        assert s.get(Send, send_id).status == SendStatus.SENDING


def test_claim_job_race_only_one_wins(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory)
    barrier = threading.Barrier(2)
    won: list[list[int]] = []

    def claim() -> None:
        barrier.wait()
        won.append([c.job_id for c in claim_jobs(factory, 4)])

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(won) == [[], [job_id]]
    with factory() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.RUNNING and job.attempts == 1 and job.started_at is not None


def test_claim_jobs_respects_due_time_and_batch_size(factory: sessionmaker[Session]) -> None:
    now = utcnow()
    ready = [_job(factory) for _ in range(3)]
    later = _job(factory, next_attempt_at=now + timedelta(seconds=30))
    _job(factory, JobStatus.DONE)
    assert [c.job_id for c in claim_jobs(factory, 2, now, lease_s=600)] == ready[:2]
    assert [c.job_id for c in claim_jobs(factory, 5, now, lease_s=600)] == [ready[2]]
    assert claim_jobs(factory, 5, now) == []
    assert [c.job_id for c in claim_jobs(factory, 5, now + timedelta(seconds=31))] == [later]


def test_record_attempt_backoff_then_failed(factory: sessionmaker[Session]) -> None:
    send_id = _send(factory)
    t = utcnow()
    for n in range(1, CFG.max_attempts + 1):
        work = claim_send(factory, send_id, t)
        assert work is not None and work.attempt == n
        status, next_at = record_attempt(factory, work, t, t, False, f"refused #{n}", CFG)
        if n < CFG.max_attempts:
            assert status == SendStatus.PENDING
            assert next_at == t + timedelta(seconds=backoff_delay(n, CFG))
            with factory() as s:
                assert due_send_ids(s, t) == []  # not due before the backoff has passed
            t = next_at
        else:
            assert status == SendStatus.FAILED and next_at is None
    with factory() as s:
        send = s.get(Send, send_id)
        assert send.status == SendStatus.FAILED and send.last_error == f"refused #{CFG.max_attempts}"
        attempts = s.scalars(select(SendAttempt).where(SendAttempt.send_id == send_id)).all()
        assert [a.outcome for a in attempts] == ["failed"] * CFG.max_attempts
        assert attempts[0].detail == "refused #1"


def test_record_attempt_success(factory: sessionmaker[Session]) -> None:
    send_id = _send(factory)
    work = claim_send(factory, send_id)
    t = utcnow()
    assert record_attempt(factory, work, t, t, True, "1.2.3=0x0000", CFG) == (SendStatus.SENT, None)
    with factory() as s:
        send = s.get(Send, send_id)
        assert (send.status, send.sent_at, send.last_error) == (SendStatus.SENT, t, None)


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_an_orphaned_job_is_claimed_again_after_its_lease(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory)
    now = utcnow()
    (first,) = claim_jobs(factory, 4, now, holder="gone-host:1", lease_s=10)
    assert claim_jobs(factory, 4, now + timedelta(seconds=9), holder="other:2") == []  # still leased
    (second,) = claim_jobs(factory, 4, now + timedelta(seconds=11), holder="other:2", lease_s=10)
    assert (first.job_id, first.attempt, second.job_id, second.attempt) == (job_id, 1, job_id, 2)
    with factory() as s:
        assert s.get(Job, job_id).leased_by == "other:2"


def test_a_job_that_kills_its_worker_every_time_ends_failed(factory: sessionmaker[Session]) -> None:
    job_id = _job(factory)
    t = utcnow()
    for attempt in (1, 2, 3):
        (claimed,) = claim_jobs(factory, 4, t, holder=f"host:{attempt}", lease_s=5, max_attempts=3)
        assert claimed.attempt == attempt
        t += timedelta(seconds=6)  # the worker died with it: its lease runs out
    assert claim_jobs(factory, 4, t, holder="host:4", lease_s=5, max_attempts=3) == []
    with factory() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.FAILED and job.leased_by is None
        assert job.reason.startswith("worker died 3 times while analysing it")


def test_recover_gives_back_only_what_dead_local_processes_held(factory: sessionmaker[Session]) -> None:
    host = socket.gethostname()
    dead, alive, remote = _job(factory), _job(factory), _job(factory)
    for job_id, holder in (
        (dead, f"{host}:{_dead_pid()}"),
        (alive, f"{host}:{os.getpid()}"),
        (remote, "elsewhere:1"),
    ):
        (claimed,) = claim_jobs(factory, 1, holder=holder)
        assert claimed.job_id == job_id
    assert recover(factory) == (1, 0)
    with factory() as s:
        states = {j: (s.get(Job, j).status, s.get(Job, j).leased_by) for j in (dead, alive, remote)}
    assert states[dead] == (JobStatus.QUEUED, None)
    assert states[alive] == (JobStatus.RUNNING, f"{host}:{os.getpid()}")
    assert states[remote] == (JobStatus.RUNNING, "elsewhere:1")


def test_a_send_goes_on_with_the_files_not_yet_delivered(factory: sessionmaker[Session]) -> None:
    send_id = _send(factory)
    with factory.begin() as s:
        job_id = s.get(Send, send_id).job_id
        for uid in ("1.2.3.1", "1.2.3.2"):
            s.add(
                Output(
                    job_id=job_id,
                    kind="sc",
                    model="m",
                    sop_class_uid=SC_SOP_CLASS,
                    sop_instance_uid=uid,
                    series_instance_uid="1.2.3.9",
                    instance_number=1,
                    path=f"/x/{uid}.dcm",
                )
            )
    work = claim_send(factory, send_id, holder="gone:1", lease_s=5)
    assert work is not None and work.delivered == 0
    record_delivery(factory, send_id, work.files[0].sop_instance_uid, 0)
    record_delivery(factory, send_id, work.files[0].sop_instance_uid, 0)  # told twice: one row
    # the sender is killed here; after its lease another takes the send on
    again = claim_send(factory, send_id, utcnow() + timedelta(seconds=6), holder="other:2")
    assert again is not None and again.attempt == 2 and again.delivered == 1
    assert [f.sop_instance_uid for f in again.files] == [f.sop_instance_uid for f in work.files[1:]]


def test_recover_resumes_interrupted_send(factory: sessionmaker[Session]) -> None:
    send_id = _send(factory)
    # then the process "dies": a process of this host that no longer exists
    assert claim_send(factory, send_id, holder=f"{socket.gethostname()}:{_dead_pid()}") is not None
    assert recover(factory) == (0, 1)
    with factory() as s:
        assert due_send_ids(s) == [send_id]
    again = claim_send(factory, send_id)
    assert again is not None and again.attempt == 2


# --- sender thread against a real SCP on loopback ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Scp:
    """A pynetdicom storage SCP that keeps what it receives."""

    def __init__(self, port: int, syntax: str = ExplicitVRLittleEndian) -> None:
        self.received: list[Dataset] = []
        self.syntaxes: list[str] = []
        self.associations = 0
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SC_SOP_CLASS, syntax)
        ae.add_supported_context("1.2.840.10008.1.1")
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _accepted(self, _event: evt.Event) -> None:
        self.associations += 1

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.dataset)
        self.syntaxes.append(str(event.context.transfer_syntax))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _settings(tmp_path: Path, port: int, outbox: OutboxConfig = CFG) -> Settings:
    core = CoreConfig(
        path=tmp_path / "c.toml", models=(ModelConfig("m", "resnet18", tmp_path / "m.pt", "layer4"),)
    )
    node = NodeConfig(ae_title="GRADCAM", acse_timeout_s=5, dimse_timeout_s=5, network_timeout_s=5)
    return Settings(
        path=tmp_path / "c.toml",
        core=core,
        node=node,
        outbox=outbox,
        destinations=(Destination("pacs", "PACS", "127.0.0.1", port),),
        default_destination="pacs",
    )


def _sc_file(path: Path) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SC_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PHANTOM"
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(16)
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


def _add_sc_output(
    factory: sessionmaker[Session], send_id: int, path: Path, ds: Dataset | None = None
) -> None:
    """Record ``path`` as an SC output of the send's job (``ds`` gives its UIDs; new ones otherwise)."""
    with factory.begin() as s:
        s.add(
            Output(
                job_id=s.get(Send, send_id).job_id,
                kind="sc",
                model="m",
                sop_class_uid=SC_SOP_CLASS,
                sop_instance_uid=ds.SOPInstanceUID if ds is not None else generate_uid(),
                series_instance_uid=ds.SeriesInstanceUID if ds is not None else generate_uid(),
                path=str(path),
            )
        )


def _wait_for(pred, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        time.sleep(0.05)


def test_sender_retries_until_destination_is_up(factory: sessionmaker[Session], tmp_path: Path) -> None:
    port = _free_port()
    settings = _settings(
        tmp_path, port, OutboxConfig(max_attempts=20, backoff_initial_s=0.2, backoff_max_s=0.5)
    )
    send_id = _send(factory, port=port)
    files = [_sc_file(tmp_path / f"{i}.dcm") for i in range(2)]
    for i, ds in enumerate(files):
        _add_sc_output(factory, send_id, tmp_path / f"{i}.dcm", ds)
    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    sender.start()
    scp = None
    try:
        signal.notify()

        def failures() -> int:
            with factory() as s:
                return len(s.scalars(select(SendAttempt).where(SendAttempt.outcome == "failed")).all())

        _wait_for(lambda: failures() >= 2)
        scp = _Scp(port)
        _wait_for(lambda: len(scp.received) == 2)
        # short sessions only: a session holds SQLite's write lock (BEGIN IMMEDIATE) until it ends
        _wait_for(lambda: _status(factory, send_id) == SendStatus.SENT)
        with factory() as s:
            send = s.get(Send, send_id)
            attempts = s.scalars(select(SendAttempt).where(SendAttempt.send_id == send_id)).all()
        assert [a.outcome for a in attempts][-1] == "sent"
        assert all(a.outcome == "failed" and "cannot connect" in a.detail for a in attempts[:-1])
        assert all(f"{ds.SOPInstanceUID}=0x0000" in attempts[-1].detail for ds in files)
        assert sorted(d.SOPInstanceUID for d in scp.received) == sorted(d.SOPInstanceUID for d in files)
        assert send.attempts == len(attempts)
    finally:
        sender.stop()
        sender.join(10)
        if scp is not None:
            scp.stop()
    assert not sender.is_alive()


def test_sender_missing_file_is_a_failed_attempt(factory: sessionmaker[Session], tmp_path: Path) -> None:
    port = _free_port()
    scp = _Scp(port)
    settings = _settings(tmp_path, port, replace(CFG, max_attempts=1))
    send_id = _send(factory, port=port)
    _add_sc_output(factory, send_id, tmp_path / "gone.dcm")
    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    sender.start()
    try:
        signal.notify()
        _wait_for(lambda: _status(factory, send_id) == SendStatus.FAILED)
        with factory() as s:
            assert "unreadable" in s.get(Send, send_id).last_error
    finally:
        sender.stop()
        sender.join(10)
        scp.stop()


def _ended_sends(factory: sessionmaker[Session], settings: Settings) -> dict[str, float]:
    """``gradcam_node_sends_total`` by status, as a scrape of ``/metrics`` reads it."""
    text = render(make_registry(factory, settings)).decode()
    return {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gradcam_node_sends_total"
    }


def test_sends_counter_never_falls_when_sends_are_sent_again(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """A resend puts a failed or sent send back to pending; the count of ended sends keeps every ending
    (Prometheus reads a counter that falls as a reset)."""
    port = _free_port()
    outbox = OutboxConfig(max_attempts=2, backoff_initial_s=0.1, backoff_max_s=0.1)
    settings = _settings(tmp_path, port, outbox)
    settings = replace(settings, node=replace(settings.node, storage_dir=tmp_path))
    send_id = _send(factory, port=port)
    _add_sc_output(factory, send_id, tmp_path / "0.dcm", _sc_file(tmp_path / "0.dcm"))
    with factory() as s:
        job_id = s.get(Send, send_id).job_id

    def resend_job() -> None:
        with factory.begin() as s:
            report = resend(s, settings, [job_id])
        assert "pending again" in report.lines[0], report.lines
        signal.notify()

    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    sender.start()
    scp = None
    try:
        signal.notify()
        _wait_for(lambda: _status(factory, send_id) == SendStatus.FAILED)  # nobody listens: 2 attempts
        assert _ended_sends(factory, settings) == {"sent": 0, "failed": 1}
        scp = _Scp(port)
        resend_job()
        assert _ended_sends(factory, settings) == {"sent": 0, "failed": 1}  # pending again: no fall
        _wait_for(lambda: _status(factory, send_id) == SendStatus.SENT)
        assert _ended_sends(factory, settings) == {"sent": 1, "failed": 1}
        resend_job()
        assert _ended_sends(factory, settings) == {"sent": 1, "failed": 1}
        _wait_for(lambda: _status(factory, send_id) == SendStatus.SENT and len(scp.received) == 2)
        assert _ended_sends(factory, settings) == {"sent": 2, "failed": 1}
        with factory() as s:
            attempts = s.scalars(select(SendAttempt).where(SendAttempt.send_id == send_id)).all()
        assert [(a.outcome, a.send_status) for a in attempts] == [
            ("failed", "pending"),
            ("failed", "failed"),
            ("sent", "sent"),
            ("sent", "sent"),
        ]
    finally:
        sender.stop()
        sender.join(10)
        if scp is not None:
            scp.stop()


def _status(factory: sessionmaker[Session], send_id: int) -> SendStatus:
    with factory() as s:
        return s.get(Send, send_id).status


def test_echo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    settings = _settings(tmp_path, port)
    assert echo_command(settings, "pacs") == 1
    assert "cannot connect" in capsys.readouterr().out
    scp = _Scp(port)
    try:
        assert echo_command(settings, "pacs") == 0
        out = capsys.readouterr().out
        assert out.startswith(f"pacs (PACS@127.0.0.1:{port}): OK in ")
        assert echo_command(settings, "nope") == 1
        assert "no destination named 'nope'" in capsys.readouterr().out
    finally:
        scp.stop()


def _echo_settings(tmp_path: Path, host: str, port: int) -> Settings:
    """Destination ``pacs`` at ``host:port``; acse_timeout_s=1 (also the connect timeout): fast failures."""
    settings = _settings(tmp_path, port)
    return replace(
        settings,
        node=replace(settings.node, acse_timeout_s=1),
        destinations=(Destination("pacs", "PACS", host, port),),
    )


def _echo_failure(settings: Settings, capsys: pytest.CaptureFixture[str]) -> str:
    """The reason ``gradcam-node echo pacs`` prints after FAILED (exit code 1, one line)."""
    assert echo_command(settings, "pacs") == 1
    out = capsys.readouterr().out
    dest = settings.destinations[0]
    prefix = f"pacs (PACS@{dest.host}:{dest.port}): FAILED: "
    assert out.startswith(prefix) and out.endswith("\n") and out.count("\n") == 1, out
    return out[len(prefix) : -1]


class _RawPeer:
    """A plain TCP server on loopback that is no DICOM node: each connection gets ``answer`` (then is
    closed), or nothing at all and stays open until :meth:`stop` when ``answer`` is None."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.05)  # accept() does not wake up when another thread closes the socket
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            if self.answer is None:
                self.held.append(conn)  # silent: never answers, never closes
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(1024)  # the A-ASSOCIATE-RQ (or part of it)
                if self.answer:
                    conn.sendall(self.answer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.server.close()
        for conn in self.held:
            conn.close()


def test_echo_to_an_unknown_host_names_the_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _echo_settings(tmp_path, "no-such-host.invalid", 104)
    reason = _echo_failure(settings, capsys)
    assert reason.startswith("cannot resolve host 'no-such-host.invalid': "), reason
    assert reason.endswith(f": check the host of [[destinations]] 'pacs' in {settings.path}"), reason
    assert "Errno" not in reason


@pytest.mark.parametrize(
    "answer", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["closes", "answers garbage"]
)
def test_echo_to_a_peer_that_does_not_speak_dicom(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], answer: bytes
) -> None:
    peer = _RawPeer(answer)
    try:
        t0 = time.monotonic()
        reason = _echo_failure(_echo_settings(tmp_path, "127.0.0.1", peer.port), capsys)
        assert time.monotonic() - t0 < 0.9  # said at once, not after the timeout
    finally:
        peer.stop()
    assert reason == (
        f"connected to 127.0.0.1:{peer.port}, but the association was aborted during negotiation: the peer "
        "closed the connection or does not speak DICOM on this port"
    )


def test_echo_to_a_silent_peer_is_a_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peer = _RawPeer(None)
    try:
        reason = _echo_failure(_echo_settings(tmp_path, "127.0.0.1", peer.port), capsys)
    finally:
        peer.stop()
    assert reason == (
        f"connected to 127.0.0.1:{peer.port}, but no answer to the association request within 1 s "
        "(acse_timeout_s): is it a DICOM node, and is the port the right one?"
    )


def test_echo_to_a_host_that_never_answers_the_handshake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A firewall that drops packets, on loopback: a listening socket whose accept queue (backlog 0) is
    already full, so the kernel drops further SYNs and the connection attempt times out."""
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # connect until one does not get through: then the queue is full
            client = socket.socket()
            client.settimeout(0.3)
            fillers.append(client)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("the kernel does not drop SYNs to a full accept queue here")
        t0 = time.monotonic()
        reason = _echo_failure(_echo_settings(tmp_path, "127.0.0.1", port), capsys)
        assert time.monotonic() - t0 < 5
    finally:
        for client in fillers:
            client.close()
        server.close()
    assert reason == (
        f"cannot connect to 127.0.0.1:{port}: no answer within 1 s (acse_timeout_s): is the host up and "
        "the port open (firewall)?"
    )


# --- the worker: claim -> analyse -> outputs -> results, outputs and send in one transaction ------------


def _dx_file(path: Path, seed: int) -> Dataset:
    """A small synthetic DX image (64x64, 12 bits) written as DICOM."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "PHANTOM^WORKER"
    ds.PatientID = "PHANTOM-W"
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (64, 64), dtype=np.uint16).tobytes()
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


def _worker_settings(tmp_path: Path) -> Settings:
    model = ModelConfig(
        "ResNet18", "resnet18", tmp_path / "resnet18.pt", "layer4", input_size=64, threshold=0.5
    )
    torch.manual_seed(0)
    save_checkpoint(build_model(model), model.checkpoint, {"test": True})
    core = CoreConfig(path=tmp_path / "c.toml", models=(model,), render=RenderConfig(max_side=128))
    return Settings(
        path=tmp_path / "c.toml",
        core=core,
        node=NodeConfig(storage_dir=tmp_path / "spool"),
        worker=WorkerConfig(batch_size=4, max_attempts=2, retry_delay_s=0.2),
        destinations=(Destination("pacs", "PACS", "127.0.0.1", 104),),
        default_destination=None,  # callers other than PACS get no send
    )


def _settled(factory: sessionmaker[Session]) -> bool:
    with factory() as s:
        return all(j.status in (JobStatus.DONE, JobStatus.FAILED) for j in s.scalars(select(Job)))


def test_worker_records_results_and_failures(factory: sessionmaker[Session], tmp_path: Path) -> None:
    settings = _worker_settings(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    good = [_dx_file(spool / f"good{i}.dcm", i) for i in range(3)]
    routed = [
        _job(factory, sop_uid=ds.SOPInstanceUID, path=spool / f"good{i}.dcm", reply_ae="PACS")
        for i, ds in enumerate(good[:2])
    ]
    unrouted = _job(factory, sop_uid=good[2].SOPInstanceUID, path=spool / "good2.dcm", reply_ae="STRANGER")
    (spool / "garbage.dcm").write_bytes(b"not a DICOM file at all" * 10)
    garbage = _job(factory, path=spool / "garbage.dcm", reply_ae="PACS")
    missing = _job(factory, path=spool / "missing.dcm", reply_ae="PACS")

    job_signal, send_signal = JobSignal(), JobSignal()
    worker = Worker(settings, factory, job_signal, send_signal)
    worker.start()
    try:
        job_signal.notify()
        _wait_for(lambda: _settled(factory), timeout=60)
    finally:
        worker.stop()
        worker.join(30)
    assert not worker.is_alive()
    assert send_signal.pending, "the sender is woken once results are committed"

    with factory() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        for job_id in [*routed, unrouted]:
            job = jobs[job_id]
            assert job.status == JobStatus.DONE and job.consensus is not None and job.duration_ms > 0
            results = s.scalars(select(Result).where(Result.job_id == job_id)).all()
            assert [(r.model, r.positive == (r.probability >= 0.5)) for r in results] == [("ResNet18", True)]
            outputs = s.scalars(select(Output).where(Output.job_id == job_id)).all()
            mapped = ["heatmap", "sc"] if results[0].positive else []  # maps for a positive decision only
            assert sorted(o.kind for o in outputs) == sorted(["summary", "sr", *mapped])
            for o in outputs:
                written = dcmread(o.path)
                assert written.SOPInstanceUID == o.sop_instance_uid
                assert Path(o.path).parent.name == job.instance.sop_instance_uid
        sends = s.scalars(select(Send)).all()
        assert sorted(x.job_id for x in sends) == sorted(routed)
        assert all(x.status == SendStatus.PENDING and x.destination == "pacs" for x in sends)
        assert jobs[unrouted].reason == "no destination configured"
        assert jobs[garbage].status == JobStatus.FAILED and jobs[garbage].attempts == 1
        assert "not readable DICOM" in jobs[garbage].reason
        # a missing file is an OSError: retried after retry_delay_s, then given up at max_attempts
        assert jobs[missing].status == JobStatus.FAILED and jobs[missing].attempts == 2
        assert (
            "FileNotFoundError" in jobs[missing].reason and "gave up after 2 attempts" in jobs[missing].reason
        )
        assert s.scalars(select(Output).where(Output.job_id.in_([garbage, missing]))).all() == []
    assert not list(spool.rglob("*.tmp"))


def _work(send_id: int, port: int, files: list[Path]) -> SendWork:
    outgoing = tuple(OutgoingFile(SC_SOP_CLASS, dcmread(f).SOPInstanceUID, f, "sc", "m") for f in files)
    return SendWork(send_id, send_id, "pacs", "PACS", "127.0.0.1", port, 1, outgoing)


def store_many(settings: Settings, works: list[SendWork]) -> list[SendOutcome]:
    """Several sends to one destination over one :class:`Link`, as the sender's threads do."""
    link = Link(settings, works[0])
    try:
        return [link.send(w) for w in works]
    finally:
        link.close()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_store_many_shares_one_association(tmp_path: Path, syntax: str) -> None:
    """Several sends go over one association, each with its own outcome; files the peer takes in their own
    transfer syntax are streamed as they are, others are converted (implicit VR only peer)."""
    port = _free_port()
    scp = _Scp(port, syntax)
    settings = _settings(tmp_path, port)
    paths = [tmp_path / f"{i}.dcm" for i in range(4)]
    written = {ds.SOPInstanceUID: ds for ds in (_sc_file(p) for p in paths)}
    works = [
        _work(1, port, paths[:2]),
        _work(2, port, [paths[2]]),
        _work(3, port, [paths[3]]),
    ]
    paths[3].unlink()  # the third send's file is gone: that send fails, the others do not
    try:
        outcomes = store_many(settings, works)
    finally:
        scp.stop()
    assert [o.ok for o in outcomes] == [True, True, False]
    assert "unreadable" in outcomes[2].detail
    assert scp.associations == 1
    assert scp.syntaxes == [syntax] * 3
    for got in scp.received:
        sent = written[got.SOPInstanceUID]
        assert got.PixelData == sent.PixelData and got.PatientID == sent.PatientID
    assert all(o.started <= o.finished for o in outcomes)


@pytest.mark.skipif(not Path(STORESCP).exists(), reason="DCMTK storescp not installed")
def test_link_to_dcmtk_sets_prompt_tcp(tmp_path: Path) -> None:
    """A link to DCMTK's storescp (a peer that writes its responses in two pieces, as Orthanc does) has
    TCP_NODELAY on and re-arms TCP_QUICKACK before each read (the 40 ms stall per C-STORE is measured in
    bench/node.py, not timed here); the files arrive intact."""
    port = _free_port()
    received = tmp_path / "received"
    received.mkdir()
    scp = subprocess.Popen(
        [STORESCP, "-aet", "PACS", "+uf", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: not port_is_free(port))
        paths = [tmp_path / f"{i}.dcm" for i in range(3)]
        sent = {ds.SOPInstanceUID: ds for ds in (_sc_file(p) for p in paths)}
        work = _work(1, port, paths)
        link = Link(_settings(tmp_path, port), work)
        try:
            assert link.usable, link.error
            transport = link.assoc.dul.socket
            assert transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert "recv" in vars(transport), "the quick-ACK read wrapper is installed"
            outcome = link.send(work)
        finally:
            link.close()
        assert outcome.ok, outcome.detail
    finally:
        scp.terminate()
        scp.wait(10)
    got = [dcmread(f) for f in received.iterdir()]
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(sent)
    for ds in got:
        assert ds.PixelData == sent[ds.SOPInstanceUID].PixelData


def test_store_many_reports_a_refused_association_for_every_send(tmp_path: Path) -> None:
    port = _free_port()  # nobody listens
    paths = [tmp_path / f"{i}.dcm" for i in range(2)]
    for p in paths:
        _sc_file(p)
    outcomes = store_many(_settings(tmp_path, port), [_work(1, port, paths[:1]), _work(2, port, paths[1:])])
    assert [o.ok for o in outcomes] == [False, False]
    assert all("cannot connect" in o.detail for o in outcomes)


def test_worker_replaces_a_dead_model_process(
    factory: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The models run in a child process; if it dies, the next batch starts a new one and jobs still
    complete. Stopping the worker stops the child. (The output warm-up at start works.)"""
    settings = _worker_settings(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    job_signal, send_signal = JobSignal(), JobSignal()
    with caplog.at_level(logging.DEBUG, logger="node.work.worker"):
        worker = Worker(settings, factory, job_signal, send_signal)
    assert any("outputs warmed up" in r.getMessage() for r in caplog.records)
    first = worker.models._proc
    assert first is not None and first.is_alive()
    worker.start()
    try:
        os.kill(first.pid, signal_module.SIGKILL)
        first.join(10)
        ds = _dx_file(spool / "a.dcm", 1)
        job_id = _job(factory, sop_uid=ds.SOPInstanceUID, path=spool / "a.dcm", reply_ae="PACS")
        job_signal.notify()
        _wait_for(lambda: _settled(factory), timeout=120)
        second = worker.models._proc
    finally:
        worker.stop()
        worker.join(60)
    with factory() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.DONE, job.reason
    assert second is not None and second.pid != first.pid
    assert not second.is_alive(), "the model process ends with the worker"


def test_worker_stops_when_a_restarted_model_process_finds_another_checkpoint(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """A checkpoint replaced on disk while the node runs shows only when the model process restarts: the
    worker's outputs would still name the old weights (UIDs, version, threshold), so it never analyses with
    the new ones. Its batch goes back to the queue and it stops; a new worker (as serve's pool starts it)
    analyses the job with the new checkpoint and names it."""
    settings = _worker_settings(tmp_path)
    checkpoint = settings.core.models[0].checkpoint
    spool = tmp_path / "spool"
    spool.mkdir()
    job_signal, send_signal = JobSignal(), JobSignal()
    worker = Worker(settings, factory, job_signal, send_signal)
    (old,) = worker.models.models
    worker.start()
    try:
        first = worker.models._proc
        os.kill(first.pid, signal_module.SIGKILL)
        first.join(10)
        torch.manual_seed(1)  # other weights, the same architecture
        save_checkpoint(build_model(settings.core.models[0]), checkpoint, {"test": "retrained"})
        ds = _dx_file(spool / "a.dcm", 1)
        job_id = _job(factory, sop_uid=ds.SOPInstanceUID, path=spool / "a.dcm", reply_ae="PACS")
        job_signal.notify()
        _wait_for(lambda: not worker.is_alive(), timeout=120)
    finally:
        worker.stop()
        worker.join(60)
    assert worker.stopped_because is not None and "changed on disk" in worker.stopped_because
    assert f"{old.sha256[:12]} -> " in worker.stopped_because
    assert worker.models.models == [old]  # never replaced by the new weights' description
    with factory() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.QUEUED and "changed on disk" in (job.reason or ""), job.reason
        assert not s.scalars(select(Result).where(Result.job_id == job_id)).all()

    again = Worker(settings, factory, job_signal, send_signal)
    (new,) = again.models.models
    assert new.sha256 != old.sha256
    again.start()
    try:
        job_signal.notify()
        _wait_for(lambda: _settled(factory), timeout=120)
    finally:
        again.stop()
        again.join(60)
    with factory() as s:
        assert s.get(Job, job_id).status == JobStatus.DONE
        (result,) = s.scalars(select(Result).where(Result.job_id == job_id)).all()
        assert result.checkpoint_sha256 == new.sha256


def test_results_of_an_image_that_changed_during_its_analysis_are_not_made(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The PACS sends the image again with another patient while a worker analyses it: the worker's
    results would copy the old patient, so it makes none (the job is skipped, saying why); the newer job
    that the new revision got makes them."""
    from node.work.batch import collect, prepare, submit

    settings = _worker_settings(tmp_path)
    spool = tmp_path / "spool"
    spool.mkdir()
    ds = _dx_file(spool / "a.dcm", 1)
    job_id = _job(factory, sop_uid=ds.SOPInstanceUID, path=spool / "a.dcm", reply_ae="PACS")
    worker = Worker(settings, factory, JobSignal(), JobSignal())
    try:
        (claimed,) = claim_jobs(factory, 4, holder=worker.holder)
        batch = prepare([claimed], worker.models, settings.core.preprocess)
        submit(batch, worker.models)
        collect(batch, worker.models)
        assert batch.items[0].analysis is not None
        with factory.begin() as s:  # what the receiver's revision does meanwhile (node.receive.store)
            s.get(Job, job_id).instance.revision = 2
        assert worker.finisher.finish(batch.items[0]) is False
    finally:
        worker.models.stop()
    with factory() as s:
        job = s.get(Job, job_id)
        assert job.status == JobStatus.SKIPPED and "received again with other content" in job.reason
        assert not s.scalars(select(Output).where(Output.job_id == job_id)).all()
        assert not s.scalars(select(Send).where(Send.job_id == job_id)).all()
    assert not (spool / "outputs").exists() or not any((spool / "outputs").rglob("*.dcm"))


def test_model_process_death_mid_batch_is_a_transient_error(tmp_path: Path) -> None:
    """A child killed while it runs a batch: collect() raises RuntimeError (the worker retries the jobs),
    and the next submit starts a new child that answers."""
    from node.work.inference import InferenceProcess

    settings = _worker_settings(tmp_path)
    models = InferenceProcess(settings.core, threads=1)
    models.start()
    try:
        (info,) = models.models
        big = {info.cfg.name: np.zeros((16, 3, 512, 512), np.float32)}  # long enough to be killed inside
        first = models._proc
        request = models.submit(big)
        os.kill(first.pid, signal_module.SIGKILL)
        with pytest.raises(RuntimeError, match="model process died"):
            models.collect(request)
        small = {info.cfg.name: np.zeros((2, 3, 64, 64), np.float32)}
        answers = models.collect(models.submit(small))
        assert models._proc.pid != first.pid
        assert len(answers) == 2 and all(0.0 <= a[info.cfg.name].probability <= 1.0 for a in answers)
    finally:
        models.stop()
    assert models._proc is None


def test_sender_threads_send_each_result_exactly_once(factory: sessionmaker[Session], tmp_path: Path) -> None:
    """Three sending threads drain twelve sends: every instance arrives once, every send is sent with one
    attempt (the claim is atomic), and the threads share associations rather than opening one per send."""
    port = _free_port()
    scp = _Scp(port)
    settings = _settings(tmp_path, port, replace(CFG, associations=3))
    expected, send_ids = [], []
    for n in range(12):
        send_id = _send(factory, port=port)
        send_ids.append(send_id)
        ds = _sc_file(tmp_path / f"{n}.dcm")
        expected.append(ds.SOPInstanceUID)
        _add_sc_output(factory, send_id, tmp_path / f"{n}.dcm", ds)
    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    sender.start()
    try:
        signal.notify()
        _wait_for(lambda: len(scp.received) >= 12)
        _wait_for(lambda: all(_status(factory, i) == SendStatus.SENT for i in send_ids))
    finally:
        sender.stop()
        sender.join(20)
        scp.stop()
    assert not sender.is_alive()
    assert sorted(d.SOPInstanceUID for d in scp.received) == sorted(expected)
    with factory() as s:
        assert [x.attempts for x in s.scalars(select(Send))] == [1] * 12
        assert len(s.scalars(select(SendAttempt)).all()) == 12
    assert 1 <= scp.associations <= 3


def test_send_parks_the_association_thread_before_each_c_store(tmp_path: Path) -> None:
    """pynetdicom's association thread can take a C-STORE response off the queue (the C-STORE then waits
    for the DIMSE timeout, and the retry duplicates instances at the peer); the sender parks that thread
    first. Checked on a real association: parked while we send, running again afterwards, also when the
    send fails before reaching the network."""
    from node.send.link import _pause_reactor, _send_one

    port = _free_port()
    scp = _Scp(port)
    try:
        ae = AE(ae_title="GRADCAM")
        ae.add_requested_context(SC_SOP_CLASS, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
        assert assoc.is_established
        checkpoint = assoc._reactor_checkpoint
        _pause_reactor(assoc)
        assert not checkpoint.is_set() and checkpoint._cond._waiters, "the association thread is parked"
        ds = _sc_file(tmp_path / "a.dcm")
        f = OutgoingFile(SC_SOP_CLASS, ds.SOPInstanceUID, tmp_path / "a.dcm", "sc", "m")
        assert _send_one(assoc, 1, f) == (f"{ds.SOPInstanceUID}=0x0000", 0x0000, True)
        assert checkpoint.is_set(), "running again between sends (peer release or abort are noticed)"
        gone = OutgoingFile(SC_SOP_CLASS, "1.2.3", tmp_path / "missing.dcm", "sc", "m")
        text, status, usable = _send_one(assoc, 2, gone)
        assert (status, usable) == (None, True) and "unreadable" in text
        assert checkpoint.is_set()
        assoc.release()
    finally:
        scp.stop()
    assert [d.SOPInstanceUID for d in scp.received] == [ds.SOPInstanceUID]


def test_a_destination_without_segmentation_still_gets_the_rest(
    factory: sessionmaker[Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SCP accepts Secondary Captures only: the heatmap is skipped with its reason (not retried for
    ever, not blocking the SC), and the log tells the administrator what to change."""
    port = _free_port()
    scp = _Scp(port)  # SC only
    settings = _settings(tmp_path, port)
    send_id = _send(factory, port=port)
    sc = _sc_file(tmp_path / "sc.dcm")
    _add_sc_output(factory, send_id, tmp_path / "sc.dcm", sc)
    seg_uid = generate_uid()
    with factory.begin() as s:
        s.add(
            Output(
                job_id=s.get(Send, send_id).job_id, kind="heatmap", model="m",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", sop_instance_uid=seg_uid,
                series_instance_uid=generate_uid(), path=str(tmp_path / "sc.dcm"),
            )
        )  # fmt: skip
    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    try:
        with caplog.at_level(logging.WARNING, logger="node.send.sender"):
            sender.start()
            signal.notify()
            _wait_for(lambda: _status(factory, send_id) == SendStatus.SENT)
        with factory() as s:
            (attempt,) = s.scalars(select(SendAttempt).where(SendAttempt.send_id == send_id)).all()
        assert f"{sc.SOPInstanceUID}=0x0000" in attempt.detail
        assert f"{seg_uid}=skipped (heatmap: SOP class not accepted)" in attempt.detail
        assert [d.SOPInstanceUID for d in scp.received] == [sc.SOPInstanceUID]
        assert any(
            "does not accept Segmentation Storage" in r.message and "kinds" in r.message
            for r in caplog.records
        )
    finally:
        sender.stop()
        sender.join(10)
        scp.stop()


def test_a_destination_host_that_does_not_resolve_is_a_failed_attempt(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """pynetdicom resolves the host inside associate(): the send is retried with the reason, never left
    'sending' until a restart."""
    port = _free_port()
    settings = _settings(tmp_path, port, OutboxConfig(max_attempts=20, backoff_initial_s=5.0))
    send_id = _send(factory, port=port, host="no-such-host.invalid")
    _add_sc_output(factory, send_id, tmp_path / "sc.dcm", _sc_file(tmp_path / "sc.dcm"))
    signal = JobSignal()
    sender = Sender(settings, factory, signal)
    sender.start()
    try:
        signal.notify()

        def failed() -> list[SendAttempt]:
            with factory() as s:
                return s.scalars(select(SendAttempt).where(SendAttempt.send_id == send_id)).all()

        _wait_for(lambda: len(failed()) >= 1)
        (attempt,) = failed()
        assert attempt.outcome == "failed" and "cannot resolve host 'no-such-host.invalid'" in attempt.detail
        _wait_for(lambda: _status(factory, send_id) == SendStatus.PENDING)
    finally:
        sender.stop()
        sender.join(10)
