"""node.ops: resend, reprocess, purge and [retention], their record, [logging], on real SQLite files and real
spool files; the command line in a subprocess, as an operator runs it.

The running node's side (the worker and sender picking up what these commands queue) is in
tests/integration/test_ops.py.
"""

from __future__ import annotations

import getpass
import logging
import logging.handlers
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from gradcam.errors import ConfigError
from node.config import LoggingConfig, Settings, load_settings
from node.db import (
    Instance,
    Job,
    JobStatus,
    Operation,
    Output,
    Send,
    SendAttempt,
    SendStatus,
    create_schema,
    make_engine,
    session_factory,
    utcnow,
)
from node.ops.commands import parse_since
from node.ops.housekeeping import Housekeeping, run_retention
from node.ops.logs import setup_logging
from node.ops.purge import Rules, purge
from node.ops.record import current_actor, log_operation, record_operation
from node.ops.reprocess import REPROCESS_REASON, reprocess
from node.ops.resend import resend
from node.receive.spool import instance_path, output_path
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113}
OTHER = {"name": "other", "ae_title": "OTHER", "host": "127.0.0.1", "port": 11114}


def _ago(days: float) -> datetime:
    return utcnow() - timedelta(days=days)


@dataclass
class World:
    """A node's configuration, database and spool, without the node: rows and files made by hand."""

    tmp: Path
    config: Path
    settings: Settings
    sessions: sessionmaker
    n: int = 0

    @property
    def spool(self) -> Path:
        return self.settings.node.storage_dir

    def image(
        self,
        *,
        status: JobStatus = JobStatus.DONE,
        days: float = 40.0,
        reply_ae: str = "PACS",
        reason: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> tuple[int, int, str]:
        """A received instance (its file in the spool) with one job; (instance id, job id, SOP UID)."""
        self.n += 1
        uid, study = f"1.2.826.0.1.{self.n}", f"1.2.826.0.2.{self.n}"
        path = instance_path(self.spool, study, uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"received" * 100)
        finished = status in (JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED)
        with self.sessions.begin() as s:
            inst = Instance(
                sop_instance_uid=uid,
                sop_class_uid=helpers.DX_SOP_CLASS,
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                modality="DX",
                transfer_syntax="1.2.840.10008.1.2.1",
                path=str(path),
                size_bytes=800,
                calling_ae=reply_ae,
                received_at=_ago(days),
            )
            s.add(inst)
            s.flush()
            job = Job(
                instance_id=inst.id,
                status=status,
                reason=reason,
                attempts=1,
                reply_ae=reply_ae,
                created_at=_ago(days),
                finished_at=_ago(days) if finished else None,
                next_attempt_at=next_attempt_at,
                content_key="k1" if status is JobStatus.DONE else None,
            )
            s.add(job)
            s.flush()
            return inst.id, job.id, uid

    def job(self, instance_id: int, status: JobStatus, days: float = 0.0) -> int:
        """Another job of an instance."""
        with self.sessions.begin() as s:
            job = Job(
                instance_id=instance_id,
                status=status,
                attempts=0,
                reply_ae="PACS",
                created_at=_ago(days),
                finished_at=_ago(days) if status is JobStatus.DONE else None,
            )
            s.add(job)
            s.flush()
            return job.id

    def outputs(
        self, job_id: int, source_uid: str, n: int = 2, days: float = 40.0, first: int = 1
    ) -> list[Path]:
        """``n`` output files of a job (UIDs ``<source>.9.<first..>``), with their rows."""
        paths = []
        with self.sessions.begin() as s:
            for i in range(first, first + n):
                sop = f"{source_uid}.9.{i}"
                path = output_path(self.spool, source_uid, sop)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"output" * 1000)
                s.add(
                    Output(
                        job_id=job_id,
                        kind="sr" if i == first else "summary",
                        sop_class_uid=SR_CLASS,
                        sop_instance_uid=sop,
                        series_instance_uid=f"{source_uid}.8",
                        instance_number=i,
                        path=str(path),
                        created_at=_ago(days),
                    )
                )
                paths.append(path)
        return paths

    def send(
        self,
        job_id: int,
        status: SendStatus,
        *,
        dest: dict[str, Any] = PACS,
        days: float = 40.0,
        attempts: int = 3,
        last_error: str | None = None,
        host: str | None = None,
    ) -> int:
        """A send of a job, with one attempt ``days`` ago."""
        with self.sessions.begin() as s:
            send = Send(
                job_id=job_id,
                destination=dest["name"],
                ae_title=dest["ae_title"],
                host=host or dest["host"],
                port=dest["port"],
                status=status,
                attempts=attempts,
                next_attempt_at=_ago(days) if status is SendStatus.PENDING else None,
                last_error=last_error,
                created_at=_ago(days),
                sent_at=_ago(days) if status is SendStatus.SENT else None,
            )
            s.add(send)
            s.flush()
            s.add(
                SendAttempt(
                    send_id=send.id,
                    started_at=_ago(days),
                    finished_at=_ago(days),
                    outcome="sent" if status is SendStatus.SENT else "failed",
                    detail=last_error or "",
                    send_status=status.value,
                )
            )
            return send.id

    def get(self, model: type, row_id: int) -> Any:
        with self.sessions() as s:
            return s.get(model, row_id)

    def operations(self) -> list[Operation]:
        with self.sessions() as s:
            return list(s.scalars(select(Operation).order_by(Operation.id)))

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``gradcam-node --config CONFIG ARGS`` in a subprocess, as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(self.config), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **(env or {})},
        )


def _write_config(tmp: Path, **sections: Any) -> Path:
    return helpers.write_test_config(
        tmp / "node.toml",
        checkpoints={"ResNet18": tmp / "unused.pt"},  # never loaded here
        port=helpers.free_port(),
        storage_dir=tmp / "spool",
        database_url=f"sqlite:///{tmp / 'node.db'}",
        destinations=[PACS, OTHER],
        default_destination="pacs",
        **sections,
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config = _write_config(tmp_path, logging={"file": str(tmp_path / "log" / "node.log")})
    settings = load_settings(config)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    yield World(tmp_path, config, settings, session_factory(engine))
    engine.dispose()


def _recorded(world: World, command: str, run: Any) -> tuple[Any, Operation]:
    """Run an operation in a transaction with its record, as the command line does."""
    with world.sessions.begin() as s:
        report = run(s)
        row = record_operation(s, command, "args", f"{report.done} done", report.lines)
    log_operation(row)
    return report, row


# --- resend ----------------------------------------------------------------------------------------------


def test_resend_resets_a_failed_send_to_the_destination_as_configured_now(world: World) -> None:
    _, job, uid = world.image()
    world.outputs(job, uid)
    send = world.send(job, SendStatus.FAILED, attempts=12, last_error="connection refused", host="10.9.9.9")
    before = utcnow()

    with world.sessions.begin() as s:
        report = resend(s, world.settings, [job])

    assert (report.done, report.refused) == (1, 0)
    assert report.lines == [
        f"job {job} -> pacs (PACS@127.0.0.1:11113): send {send} pending again "
        "(was failed after 12 attempt(s): connection refused)"
    ]
    row = world.get(Send, send)
    assert (row.status, row.attempts, row.host, row.port) == (SendStatus.PENDING, 0, "127.0.0.1", 11113)
    assert before <= row.next_attempt_at <= utcnow()
    assert row.last_error == "connection refused"  # until the next attempt says otherwise
    with world.sessions() as s:  # the history stays
        assert len(s.scalars(select(SendAttempt).where(SendAttempt.send_id == send)).all()) == 1


def test_resend_of_a_sent_job_sends_it_again(world: World) -> None:
    _, job, uid = world.image()
    world.outputs(job, uid)
    send = world.send(job, SendStatus.SENT)
    with world.sessions.begin() as s:
        report = resend(s, world.settings, [job])
    assert report.done == 1 and "was sent after 3 attempt(s))" in report.lines[0]
    row = world.get(Send, send)
    assert (row.status, row.sent_at) == (SendStatus.PENDING, None)


def test_resend_makes_a_send_to_the_reply_destination_when_the_job_has_none(world: World) -> None:
    _, to_pacs, uid = world.image(reply_ae="SOMEONE")  # unknown caller: the default destination
    world.outputs(to_pacs, uid)
    _, to_other, uid2 = world.image(reply_ae="OTHER")  # a caller that is a destination: back to it
    world.outputs(to_other, uid2)

    with world.sessions.begin() as s:
        report = resend(s, world.settings, [to_pacs, to_other])

    assert report.done == 2
    with world.sessions() as s:
        sends = {j: s.scalars(select(Send).where(Send.job_id == j)).one() for j in (to_pacs, to_other)}
    assert (sends[to_pacs].destination, sends[to_pacs].status) == ("pacs", SendStatus.PENDING)
    assert (sends[to_other].destination, sends[to_other].ae_title) == ("other", "OTHER")
    assert report.lines[1].endswith(f"send {sends[to_other].id} queued (new)")


def test_resend_failed_takes_every_job_with_a_failed_send_and_only_those(world: World) -> None:
    jobs = {}
    for status in (SendStatus.FAILED, SendStatus.SENT, SendStatus.PENDING, SendStatus.FAILED):
        _, job, uid = world.image()
        world.outputs(job, uid)
        jobs[job] = (world.send(job, status), status)

    with world.sessions.begin() as s:
        report = resend(s, world.settings, None)

    failed = [j for j, (_, st) in jobs.items() if st is SendStatus.FAILED]
    assert report.done == 2 and [line.split()[1] for line in report.lines] == [str(j) for j in failed]
    for _job, (send, status) in jobs.items():
        expected = SendStatus.PENDING if status is SendStatus.FAILED else status
        assert world.get(Send, send).status is expected


def test_resend_failed_with_nothing_failed_says_so(world: World) -> None:
    with world.sessions.begin() as s:
        report = resend(s, world.settings, None)
    assert (report.lines, report.done, report.refused) == (["no job has a failed send"], 0, 0)


def test_resend_refuses_jobs_it_cannot_send_and_leaves_open_sends_alone(world: World) -> None:
    _, no_outputs, _ = world.image(status=JobStatus.FAILED, reason="not DICOM")
    _, purged, uid = world.image()
    world.outputs(purged, uid)
    with world.sessions.begin() as s:
        for o in s.scalars(select(Output).where(Output.job_id == purged)):
            o.purged_at = utcnow()
    _, missing, uid = world.image()
    world.outputs(missing, uid)[1].unlink()
    _, pending, uid = world.image()
    world.outputs(pending, uid)
    pending_send = world.send(pending, SendStatus.PENDING, attempts=2)
    _, sending, uid = world.image()
    world.outputs(sending, uid)
    world.send(sending, SendStatus.SENDING)
    _, gone_dest, uid = world.image()
    world.outputs(gone_dest, uid)
    world.send(gone_dest, SendStatus.FAILED, dest={**OTHER, "name": "old-pacs"})

    with world.sessions.begin() as s:
        report = resend(s, world.settings, [999, no_outputs, purged, missing, pending, sending])
    with world.sessions.begin() as s:
        report_failed = resend(s, world.settings, None)

    lines = dict(zip([999, no_outputs, purged, missing, pending, sending], report.lines, strict=True))
    assert lines[999] == "job 999: refused: no such job"
    assert lines[no_outputs] == f"job {no_outputs}: refused: no outputs to send (job is failed: not DICOM)"
    assert "refused: its output files were purged on " in lines[purged]
    assert "refused: 1 of its 2 output files are missing, e.g. " in lines[missing]
    assert lines[pending].endswith(f"send {pending_send} is already pending")
    assert lines[sending].endswith("is being sent now")
    assert (report.done, report.refused) == (0, 4)
    assert world.get(Send, pending_send).attempts == 2  # untouched
    assert report_failed.refused == 1
    assert "destination 'old-pacs' of send" in report_failed.lines[0]


# --- reprocess -------------------------------------------------------------------------------------------


def test_reprocess_queues_a_new_job_for_the_instance(world: World) -> None:
    inst, job, uid = world.image(reply_ae="OTHER")
    with world.sessions.begin() as s:
        report = reprocess(s, [job, job])
    assert report.done == 1 and report.refused == 0
    with world.sessions() as s:
        jobs = s.scalars(select(Job).where(Job.instance_id == inst).order_by(Job.id)).all()
    assert [j.id for j in jobs][0] == job and len(jobs) == 2
    new = jobs[1]
    assert (new.status, new.reason, new.reply_ae, new.attempts) == (
        JobStatus.QUEUED,
        REPROCESS_REASON,
        "OTHER",
        0,
    )
    assert new.next_attempt_at is None  # due now
    assert report.lines == [f"job {job} (instance {uid}): queued as job {new.id}"]


def test_reprocess_refuses_open_unanalysable_purged_and_missing(world: World) -> None:
    inst, queued_behind, _ = world.image()
    open_job = world.job(inst, JobStatus.RUNNING)
    _, skipped, _ = world.image(status=JobStatus.SKIPPED, reason="modality CT is not CR/DX")
    purged_inst, purged, _ = world.image()
    with world.sessions.begin() as s:
        s.get(Instance, purged_inst).purged_at = utcnow()
    missing_inst, missing, _ = world.image()
    Path(world.get(Instance, missing_inst).path).unlink()

    with world.sessions.begin() as s:
        report = reprocess(s, [queued_behind, skipped, purged, missing, 12345])

    assert report.refused == 5 and report.done == 0
    assert report.lines[0].endswith(f"refused: job {open_job} is already running")
    assert report.lines[1].endswith("refused: it was not analysable: modality CT is not CR/DX")
    assert "refused: its spool file was purged on " in report.lines[2]
    assert "refused: its spool file is missing: " in report.lines[3]
    assert report.lines[4] == "job 12345: refused: no such job"
    with world.sessions() as s:
        assert s.scalars(select(Job).where(Job.status == JobStatus.QUEUED)).all() == []


def test_reprocess_since_takes_analysable_instances_received_since(world: World) -> None:
    world.image(days=10)
    _, recent, _ = world.image(days=1)
    world.image(days=1, status=JobStatus.SKIPPED, reason="an SR")
    inst, _, _ = world.image(days=2, status=JobStatus.FAILED)
    latest = world.job(inst, JobStatus.DONE, days=0.5)

    with world.sessions.begin() as s:
        report = reprocess(s, since=_ago(3))

    assert report.done == 2
    assert [line.split()[1] for line in report.lines] == [str(latest), str(recent)]  # oldest received first
    with world.sessions.begin() as s:
        assert reprocess(s, since=utcnow()).lines[0].startswith("no analysable instance was received since")


def test_parse_since() -> None:
    assert parse_since("2024-06-01") == datetime(2024, 6, 1, tzinfo=UTC)
    assert parse_since("2024-06-01T08:30") == datetime(2024, 6, 1, 8, 30, tzinfo=UTC)
    assert parse_since("2024-06-01T10:30+02:00") == datetime(2024, 6, 1, 8, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO date"):
        parse_since("yesterday")


# --- purge -----------------------------------------------------------------------------------------------


def _exists(*paths: Path) -> list[bool]:
    return [p.exists() for p in paths]


def test_purge_deletes_finished_old_files_and_keeps_open_and_recent_ones(world: World) -> None:
    done_inst, done_job, done_uid = world.image()
    failed_inst, _, _ = world.image(status=JobStatus.FAILED)
    skipped_inst, _, _ = world.image(status=JobStatus.SKIPPED)
    recent_inst, _, _ = world.image(days=5)
    queued_inst, _, _ = world.image(status=JobStatus.QUEUED, next_attempt_at=utcnow() + timedelta(hours=1))
    rerun_inst, _, _ = world.image()
    world.job(rerun_inst, JobStatus.DONE, days=1)  # analysed again yesterday
    path = {i: Path(world.get(Instance, i).path) for i in (done_inst, failed_inst, skipped_inst)}
    kept = {i: Path(world.get(Instance, i).path) for i in (recent_inst, queued_inst, rerun_inst)}

    sent = world.outputs(done_job, done_uid)
    world.send(done_job, SendStatus.SENT)
    _, failed_send_job, uid = world.image(days=50)
    failed_send = world.outputs(failed_send_job, uid)
    world.send(failed_send_job, SendStatus.FAILED, last_error="refused")
    _, no_send_job, uid = world.image(days=50)
    no_send = world.outputs(no_send_job, uid)
    _, pending_job, uid = world.image(days=50)
    pending = world.outputs(pending_job, uid)
    world.send(pending_job, SendStatus.PENDING)
    _, resent_job, uid = world.image(days=50)
    resent = world.outputs(resent_job, uid)
    world.send(resent_job, SendStatus.SENT, days=2)  # sent again two days ago
    busy_inst, busy_job, uid = world.image(days=50)
    busy = world.outputs(busy_job, uid)
    world.job(busy_inst, JobStatus.RUNNING)  # a re-analysis writes into the same folder now

    report = purge(world.sessions, world.spool, Rules(30, 30))

    assert all(not p.exists() for p in path.values())
    assert all(p.exists() for p in kept.values())
    assert _exists(*sent, *failed_send, *no_send) == [False] * 6
    assert _exists(*pending, *resent, *busy) == [True] * 6
    assert (report.received_files, report.output_files, report.refused) == (3 + 4, 6, 0)
    # the received files of the output tests' images (their jobs are done, 50 days ago) went too, but not
    # the one whose instance has a running job
    assert Path(world.get(Instance, busy_inst).path).exists()
    with world.sessions() as s:
        purged = set(s.scalars(select(Instance.id).where(Instance.purged_at.is_not(None))))
        assert {done_inst, failed_inst, skipped_inst} <= purged
        assert not purged & {*kept, busy_inst}
        marked = {Path(p) for p in s.scalars(select(Output.path).where(Output.purged_at.is_not(None)))}
    assert marked == set(sent + failed_send + no_send)
    assert not sent[0].parent.exists()  # the image's emptied outputs folder is gone, the spool stays
    assert (world.spool / "outputs").is_dir()
    assert report.kept_in_use == 3 + 6  # queued, rerun, busy images; pending, resent, busy outputs (2 each)
    assert report.summary(Rules(30, 30)).startswith("deleted 7 received file(s) (5.5 KiB) older than 30 days")


def test_purge_keeps_a_file_shared_with_a_busy_analysis(world: World) -> None:
    """Two analyses that made the same object share its file: it goes only when both rows may go."""
    inst, old_job, uid = world.image(days=50)
    shared = world.outputs(old_job, uid, n=1)
    world.send(old_job, SendStatus.SENT)
    new_job = world.job(inst, JobStatus.DONE, days=40)
    world.outputs(new_job, uid, n=1)  # the same UID, the same path
    world.send(new_job, SendStatus.PENDING)

    purge(world.sessions, world.spool, Rules(0, 30))
    assert shared[0].exists()
    with world.sessions.begin() as s:
        s.execute(Send.__table__.update().values(status=SendStatus.FAILED, next_attempt_at=None))
    report = purge(world.sessions, world.spool, Rules(0, 30))
    assert not shared[0].exists() and report.output_files == 1
    with world.sessions() as s:
        assert len(s.scalars(select(Output).where(Output.purged_at.is_not(None))).all()) == 2


def test_purge_dry_run_deletes_and_marks_nothing(world: World) -> None:
    inst, job, uid = world.image()
    outputs = world.outputs(job, uid)
    report = purge(world.sessions, world.spool, Rules(30, 30), dry_run=True)
    assert (report.received_files, report.output_files) == (1, 2)
    assert all(line.startswith("would delete ") for line in report.lines)
    assert _exists(Path(world.get(Instance, inst).path), *outputs) == [True] * 3
    assert world.get(Instance, inst).purged_at is None
    assert report.summary(Rules(30, 30)).startswith("would delete 1 received file(s)")


def test_purge_never_deletes_outside_the_spool_and_marks_files_gone_already(
    world: World, tmp_path: Path
) -> None:
    outside_inst, _, _ = world.image()
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"x")
    with world.sessions.begin() as s:
        s.get(Instance, outside_inst).path = str(outside)
    gone_inst, _, _ = world.image()
    Path(world.get(Instance, gone_inst).path).unlink()

    report = purge(world.sessions, world.spool, Rules(30, 0))

    assert outside.exists() and world.get(Instance, outside_inst).purged_at is None
    assert report.refused == 1 and "not under [node] storage_dir" in report.lines[0]
    assert world.get(Instance, gone_inst).purged_at is not None
    assert "purged (gone already)" in report.lines[1]


def test_rules_refuse_negative_days() -> None:
    with pytest.raises(ValueError, match="received_days"):
        Rules(-1, 0)


# --- recording, retention and the wake-ups in serve ---------------------------------------------------------


def test_record_operation_names_the_os_user(world: World, caplog: pytest.LogCaptureFixture) -> None:
    _, job, _ = world.image()
    with caplog.at_level(logging.INFO, logger="node.ops"):
        report, row = _recorded(world, "reprocess", lambda s: reprocess(s, [job]))
    stored = world.operations()[-1]
    assert (stored.command, stored.arguments, stored.actor) == ("reprocess", "args", getpass.getuser())
    assert stored.summary == "1 done" and stored.detail == report.lines[0]
    assert f"operation {row.id}: reprocess args (by {getpass.getuser()}): 1 done" in caplog.text


def test_actor_under_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice-the-admin")
    assert current_actor() == f"{getpass.getuser()} (sudo from alice-the-admin)"


def test_run_retention_purges_and_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _write_config(tmp_path, retention={"received_days": 30, "outputs_days": 0, "interval_h": 1})
    settings = load_settings(config)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    w = World(tmp_path, config, settings, session_factory(engine))
    inst, job, uid = w.image()
    outputs = w.outputs(job, uid)
    with caplog.at_level(logging.INFO, logger="node.ops"):
        report = run_retention(settings, w.sessions)
    assert report.received_files == 1 and _exists(*outputs) == [True, True]  # outputs_days = 0: kept
    (op,) = w.operations()
    assert (op.command, op.arguments) == ("retention", "received 30 days, outputs kept")
    assert op.summary == "deleted 1 received file(s) (0.8 KiB) older than 30 days"
    assert "retention received 30 days, outputs kept (by " in caplog.text
    engine.dispose()


def test_housekeeping_without_retention_records_nothing(world: World) -> None:
    """No [retention]: the thread has nothing to do (work that other processes queue is found by the
    workers and the sender, which look every [worker] poll_s: tests/integration/test_ops.py)."""
    keeper = Housekeeping(world.settings, world.sessions)
    keeper.start()
    keeper.stop()
    keeper.join(10)
    assert not keeper.is_alive()
    assert world.operations() == []


# --- configuration and logging ---------------------------------------------------------------------------


def test_retention_and_logging_config(tmp_path: Path) -> None:
    settings = load_settings(
        _write_config(
            tmp_path,
            retention={"received_days": 30, "outputs_days": 7.5, "interval_h": 6},
            logging={"file": "var/log/node.log", "max_mb": 10, "backups": 3, "level": "WARNING"},
        )
    )
    assert (settings.retention.received_days, settings.retention.outputs_days) == (30, 7.5)
    assert settings.retention.enabled and settings.retention.interval_h == 6
    assert settings.logging == LoggingConfig(ROOT / "var/log/node.log", 10, 3, "WARNING")
    defaults = load_settings(_write_config(tmp_path / "d"))
    assert not defaults.retention.enabled and defaults.logging.file is None


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("retention", {"received_days": -1}, "retention.received_days"),
        ("retention", {"interval_h": 0}, "retention.interval_h"),
        ("retention", {"keep_days": 3}, "retention.keep_days"),
        ("logging", {"level": "VERBOSE"}, "logging.level"),
        ("logging", {"max_mb": 0}, "logging.max_mb"),
        ("logging", {"file": 3}, "logging.file"),
    ],
)
def test_bad_retention_and_logging_values_are_refused(
    tmp_path: Path, section: str, values: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_write_config(tmp_path, **{section: values}))
    assert err.value.key == key


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_serve_logs_to_a_rotating_file_only(tmp_path: Path, root_logging: None) -> None:
    log_file = tmp_path / "logs" / "node.log"
    setup_logging(LoggingConfig(log_file, max_mb=1, backups=2, level="WARNING"), serving=True)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert (handler.maxBytes, handler.backupCount) == (2**20, 2)
    logging.getLogger("node.x").info("not this")
    for i in range(1200):
        logging.getLogger("node.x").warning("line %d %s", i, "x" * 1000)
    handler.flush()
    assert sorted(p.name for p in log_file.parent.iterdir()) == ["node.log", "node.log.1"]
    text = log_file.read_text() + (log_file.parent / "node.log.1").read_text()
    assert "not this" not in text and "WARNING node.x: line 1199 " in text


def test_serve_refuses_an_unwritable_log_file_and_other_commands_fall_back(
    tmp_path: Path, root_logging: None
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = LoggingConfig(blocker / "node.log")  # its folder is a file
    with pytest.raises(ConfigError, match="logging.file: cannot write the log file"):
        setup_logging(cfg, serving=True, config_file="node.toml")
    setup_logging(cfg, serving=False)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


_JOURNAL_PROBE = """
import logging, os, sys
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if sys.argv[1] == "journal" else ""
from node.ops.logs import setup_logging
setup_logging()
logging.getLogger("node.x").warning("disk nearly full")
logging.getLogger("node.x").info("job 3 done")
"""


def test_stderr_to_journald_carries_priorities(tmp_path: Path) -> None:
    """Under systemd (stderr is the journal's stream) each line starts with its syslog priority."""
    out = {}
    for mode in ("journal", "terminal"):
        err = tmp_path / f"{mode}.txt"
        with err.open("w") as fh:
            subprocess.run([sys.executable, "-c", _JOURNAL_PROBE, mode], cwd=ROOT, stderr=fh, check=True)
        out[mode] = err.read_text().splitlines()
    assert out["journal"] == ["<4>WARNING node.x: disk nearly full", "<6>INFO node.x: job 3 done"]
    assert (
        out["terminal"][0].endswith(" WARNING node.x: disk nearly full") and out["terminal"][0][0].isdigit()
    )


# --- the command line ------------------------------------------------------------------------------------


def test_cli_commands_print_record_and_log(world: World) -> None:
    _, failed_job, uid = world.image()
    world.outputs(failed_job, uid)
    world.send(failed_job, SendStatus.FAILED, last_error="association rejected")
    _, purged_job, uid = world.image()
    world.outputs(purged_job, uid)
    world.send(purged_job, SendStatus.FAILED)
    with world.sessions.begin() as s:
        for o in s.scalars(select(Output).where(Output.job_id == purged_job)):
            o.purged_at = utcnow()

    resent = world.cli("resend", "--failed")
    assert resent.returncode == 1, resent.stderr  # one job refused
    lines = resent.stdout.splitlines()
    assert lines[0].startswith(f"job {failed_job} -> pacs (PACS@127.0.0.1:11113): send ")
    assert lines[1].startswith(f"job {purged_job}: refused: its output files were purged on ")
    assert lines[2] == "1 send(s) queued, 1 job(s) refused"

    reprocessed = world.cli("reprocess", str(failed_job))
    assert reprocessed.returncode == 0, reprocessed.stderr
    assert reprocessed.stdout.splitlines()[-1] == "1 job(s) queued for analysis, 0 refused"

    dry = world.cli("purge", "--older-than", "30", "--dry-run")
    assert dry.returncode == 0 and "would delete" in dry.stdout
    purged = world.cli("purge", "--older-than", "30")
    assert purged.returncode == 0, purged.stderr
    # the reprocessed image has a queued job now; the other one's received file went
    assert purged.stdout.splitlines()[-1].startswith(
        "deleted 1 received file(s) (0.8 KiB) older than 30 days and"
    )

    user = getpass.getuser()
    ops = world.operations()
    assert [(o.command, o.arguments, o.actor) for o in ops] == [
        ("resend", "--failed", user),
        ("reprocess", str(failed_job), user),
        ("purge", "--older-than 30", user),  # the dry run changed nothing and is not recorded
    ]
    assert ops[0].summary == "1 send(s) queued, 1 job(s) refused" and ops[0].detail == "\n".join(lines[:2])
    log = (world.tmp / "log" / "node.log").read_text()
    for op in ops:
        assert (
            f"INFO node.ops: operation {op.id}: {op.command} {op.arguments} (by {user}): {op.summary}" in log
        )
    assert f"operation {ops[0].id}: resend --failed" in resent.stderr  # and on the operator's terminal

    jobs = world.cli("jobs", "--limit", "50")
    assert "file purged " in jobs.stdout and "(purged " in jobs.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resend"], "give job ids or --failed"),
        (["resend", "3", "--failed"], "give job ids or --failed, not both"),
        (["reprocess"], "give job ids or --since"),
        (["reprocess", "--since", "last week"], "expected an ISO date"),
        (["purge", "--older-than", "0"], "expected a number of days above 0"),
        (["resend", "x"], "expected a job id"),
    ],
)
def test_cli_usage_errors(world: World, args: list[str], message: str) -> None:
    done = world.cli(*args)
    assert done.returncode == 2 and message in done.stderr


def test_cli_refuses_without_database_or_retention(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "resend", "--failed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"gradcam-node: error: no database at {tmp_path / 'node.db'}" in done.stderr
    assert not (tmp_path / "node.db").exists()  # never a new empty database

    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    engine.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(config), "purge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "nothing to purge: give --older-than DAYS" in done.stderr


def test_jobs_never_show_numbers_that_contradict_the_decision() -> None:
    """``0.383 >= 0.3833`` would read as a wrong decision: the digits grow until the numbers agree."""
    from node.ops.report import decision_text

    near = {"model": "ResNet18", "probability": 0.38334, "threshold": 0.3833, "positive": True}
    assert decision_text(near) == "ResNet18 0.38334 >= 0.38330"
    far = {"model": "DenseNet121", "probability": 0.031, "threshold": 0.065, "positive": False}
    assert decision_text(far) == "DenseNet121 0.031 < 0.065"
