"""Operating a running node: reprocess, resend and [retention] against a real ``gradcam-node serve`` (DCMTK
storescu in, DCMTK storescp as the destination), and the systemd unit.

The commands run as an operator runs them, in their own process: the node learns of their work only
through the database, within a few seconds (node.ops.housekeeping).
"""

from __future__ import annotations

import configparser
import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import helpers
import pytest
from helpers import RunningNode, StoreScp, dcmtk, run_tool, wait_until
from sqlalchemy import func, select, update

from node.cli import build_parser
from node.db import Instance, Job, JobStatus, Operation, Output, Send, SendAttempt, SendStatus, utcnow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "systemd" / "gradcam-node.service"
WORKER_UNIT = ROOT / "config" / "systemd" / "gradcam-node-worker@.service"
SYSTEMD_README = ROOT / "config" / "systemd" / "README.md"
RESULT_TIMEOUT_S = 120
PICKUP_S = 10.0  # a job or send queued by another process is taken within the node's poll (2 s) and slack


def _cli(node: RunningNode, *args: str) -> subprocess.CompletedProcess[str]:
    """``gradcam-node --config NODE ARGS`` in its own process, as an operator runs it next to the node."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "--config", str(node.config_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _store(node: RunningNode, tmp: Path, name: str, seed: int) -> str:
    """C-STORE one synthetic chest DX with DCMTK storescu; its SOP Instance UID."""
    ds = helpers.image_dataset(size=96, seed=seed)
    _send_file(node, helpers.write_dataset(ds, tmp / "inputs" / f"{name}.dcm"))
    return str(ds.SOPInstanceUID)


def _send_file(node: RunningNode, path: Path) -> None:
    """C-STORE one file with DCMTK storescu."""
    done = run_tool([dcmtk("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), path])
    assert done.returncode == 0, done.stdout


def _jobs_of(node: RunningNode, uid: str) -> list[Job]:
    with node.sessions()() as s:
        return list(
            s.scalars(select(Job).join(Instance).where(Instance.sop_instance_uid == uid).order_by(Job.id))
        )


def _job(node: RunningNode, job_id: int) -> Job | None:
    with node.sessions()() as s:
        return s.get(Job, job_id)


def _wait_done(node: RunningNode, job_id: int) -> Job:
    def done() -> Job | None:
        job = _job(node, job_id)
        if job is not None and job.status is JobStatus.FAILED:
            pytest.fail(f"job {job_id} failed: {job.reason}\n{node.log_text()}")
        return job if job is not None and job.status is JobStatus.DONE else None

    return wait_until(f"job {job_id} done", done, RESULT_TIMEOUT_S)


def _outputs(node: RunningNode, job_id: int) -> list[Output]:
    with node.sessions()() as s:
        return list(s.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id)))


def _operations(node: RunningNode, command: str) -> list[Operation]:
    with node.sessions()() as s:
        return list(s.scalars(select(Operation).where(Operation.command == command).order_by(Operation.id)))


@pytest.fixture
def nodes(checkpoint_root: Path) -> Iterator[list[RunningNode]]:
    """Nodes a test starts itself (several on one folder), stopped at the end with their logs printed."""
    started: list[RunningNode] = []
    yield started
    for node in started:
        node.stop()
        print(f"----- node log {node.log_path} (exit {node.proc.returncode}) -----")
        print(node.log_text())


def _start(nodes: list[RunningNode], base: Path, checkpoint_root: Path, **config: Any) -> RunningNode:
    node = helpers.start_node(
        base, helpers.checkpoints_for(checkpoint_root, ("ResNet18",)), wait=False, **config
    )
    nodes.append(node)
    node.wait_ready()
    return node


def test_reprocess_on_a_running_node_supersedes_where_the_configuration_changed(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode]
) -> None:
    base = tmp_path / "node"
    first = _start(nodes, base, checkpoint_root, thresholds={"ResNet18": 0.5})
    uid = _store(first, tmp_path, "chest", seed=3)
    (job1,) = wait_until("the job", lambda: _jobs_of(first, uid), 30)
    _wait_done(first, job1.id)
    sr1 = next(o for o in _outputs(first, job1.id) if o.kind == "sr")
    assert first.stop() == 0

    # the same node, same database and spool, with another threshold: another configuration
    node = _start(nodes, base, checkpoint_root, thresholds={"ResNet18": 0.4})
    asked = _cli(node, "reprocess", str(job1.id))
    assert asked.returncode == 0, asked.stderr
    job2_id = int(re.search(r"queued as job (\d+)", asked.stdout).group(1))
    assert asked.stdout.splitlines() == [
        f"job {job1.id} (instance {uid}): queued as job {job2_id}",
        "1 job(s) queued for analysis, 0 refused",
    ]
    job2 = _wait_done(node, job2_id)
    assert (job2.started_at - job2.created_at).total_seconds() < PICKUP_S
    outputs2 = _outputs(node, job2.id)
    sr2 = next(o for o in outputs2 if o.kind == "sr")
    assert sr2.supersedes == sr1.sop_instance_uid
    assert not {o.sop_instance_uid for o in outputs2} & {o.sop_instance_uid for o in _outputs(node, job1.id)}
    assert f"job {job2.id} ({uid}) done" in node.log_text()
    assert f"supersedes SR {sr1.sop_instance_uid}" in node.log_text()

    # again, with the configuration unchanged: the same objects (same UIDs), superseding the same SR
    again = _cli(node, "reprocess", str(job2.id))
    assert again.returncode == 0, again.stderr
    job3 = _wait_done(node, int(re.search(r"queued as job (\d+)", again.stdout).group(1)))
    assert [o.sop_instance_uid for o in _outputs(node, job3.id)] == [o.sop_instance_uid for o in outputs2]
    assert next(o for o in _outputs(node, job3.id) if o.kind == "sr").supersedes == sr1.sop_instance_uid

    # the record says who asked for what, in the database and in the log
    user = getpass.getuser()
    ops = _operations(node, "reprocess")
    assert [(o.arguments, o.actor) for o in ops] == [(str(job1.id), user), (str(job2.id), user)]
    assert ops[0].detail == asked.stdout.splitlines()[0]
    assert f"INFO node.ops: operation {ops[0].id}: reprocess {job1.id} (by {user}): 1 job(s)" in asked.stderr


def test_image_sent_again_for_another_patient_gets_results_for_that_patient(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode]
) -> None:
    """A PACS reconciles a patient (IHE PIR) and sends the image again under its SOP Instance UID: the node
    analyses the new content and delivers results filed under the corrected patient, with UIDs of their own
    (a PACS ignores a UID it has), whose SR supersedes the first; every object is valid for dciodvfy. The
    same image sent again unchanged is only counted."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from tests.integration.test_pipeline import dciodvfy_errors

    pacs = StoreScp(tmp_path / "pacs")
    pacs.start()
    node = _start(
        nodes,
        tmp_path / "node",
        checkpoint_root,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
        default_destination="pacs",
    )
    try:
        ds = helpers.image_dataset(size=96, seed=4)
        first_file = helpers.write_dataset(ds, tmp_path / "inputs" / "first.dcm")
        uid = str(ds.SOPInstanceUID)
        _send_file(node, first_file)
        (job1,) = wait_until("the job", lambda: _jobs_of(node, uid), 30)
        _wait_done(node, job1.id)
        first = {o.sop_instance_uid for o in _outputs(node, job1.id)}
        wait_until("the first results at the PACS", lambda: first <= set(pacs.received()), 60)

        old_study = str(ds.StudyInstanceUID)
        # the patient corrected, and the image moved into that patient's study
        ds.PatientID, ds.PatientName = "PHANTOM-RECONCILED", "PHANTOM^RECONCILED"
        ds.StudyInstanceUID = generate_uid()
        again_file = helpers.write_dataset(ds, tmp_path / "inputs" / "reconciled.dcm")
        _send_file(node, again_file)
        job1_, job2 = wait_until("the second job", lambda: len(jobs := _jobs_of(node, uid)) == 2 and jobs, 30)
        assert job1_.id == job1.id
        assert "(PatientName, PatientID, StudyInstanceUID): revision 2" in job2.reason
        _wait_done(node, job2.id)
        outputs2 = _outputs(node, job2.id)
        second = {o.sop_instance_uid for o in outputs2}
        assert not first & second  # new UIDs: a PACS would ignore new content under an old one
        wait_until("the second results at the PACS", lambda: second <= set(pacs.received()), 60)
        received = pacs.received()
        for sop in second:
            (path,) = received[sop]
            out = dcmread(path)
            assert (out.PatientID, str(out.PatientName)) == ("PHANTOM-RECONCILED", "PHANTOM^RECONCILED"), path
            assert out.StudyInstanceUID == ds.StudyInstanceUID, path
            assert dciodvfy_errors(path) == [], path
        sr1 = next(o for o in _outputs(node, job1.id) if o.kind == "sr")
        sr2 = next(o for o in outputs2 if o.kind == "sr")
        assert sr2.supersedes == sr1.sop_instance_uid
        (sr2_file,) = received[sr2.sop_instance_uid]
        predecessor = dcmread(sr2_file).PredecessorDocumentsSequence[0]  # where the first SR is filed
        assert predecessor.StudyInstanceUID == old_study
        series = predecessor.ReferencedSeriesSequence[0]
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr1.sop_instance_uid

        # the reconciled image once more, unchanged: counted, not analysed or sent again
        _send_file(node, again_file)
        with node.sessions()() as s:
            instance = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
            assert (instance.times_received, instance.revision) == (3, 2)
        assert len(_jobs_of(node, uid)) == 2
        log_text = node.log_text()
        assert "received again with other content (PatientName, PatientID, StudyInstanceUID)" in log_text
        assert "PHANTOM-RECONCILED" not in log_text  # no patient data in the log
    finally:
        pacs.stop()


def test_resend_failed_delivers_once_the_destination_is_up(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode]
) -> None:
    port = helpers.free_port()  # nothing listens there yet
    node = _start(
        nodes,
        tmp_path / "node",
        checkpoint_root,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        default_destination="pacs",
        outbox={"max_attempts": 1},
    )
    uid = _store(node, tmp_path, "chest", seed=5)
    (job,) = wait_until("the job", lambda: _jobs_of(node, uid), 30)
    _wait_done(node, job.id)

    def send() -> Send:
        with node.sessions()() as s:
            return s.scalars(select(Send).where(Send.job_id == job.id)).one()

    failed = wait_until("the send to fail", lambda: (row := send()).status is SendStatus.FAILED and row, 60)
    assert failed.attempts == 1 and "cannot connect" in failed.last_error

    pacs = StoreScp(tmp_path / "pacs", port=port)
    pacs.start()
    try:
        asked = _cli(node, "resend", "--failed")
        assert asked.returncode == 0, asked.stderr
        lines = asked.stdout.splitlines()
        assert lines[0].startswith(
            f"job {job.id} -> pacs (PACS@127.0.0.1:{port}): send {failed.id} pending again "
            "(was failed after 1 attempt(s): cannot connect"
        )
        assert lines[1:] == ["1 send(s) queued, 0 job(s) refused"]
        t0 = time.monotonic()
        sent = wait_until("the send", lambda: (row := send()).status is SendStatus.SENT and row, 60)
        assert time.monotonic() - t0 < PICKUP_S + 10
        made = {o.sop_instance_uid for o in _outputs(node, job.id)}
        wait_until("the files at the destination", lambda: set(pacs.received()) == made, 30)
    finally:
        pacs.stop()
    assert sent.attempts == 1 and sent.sent_at is not None
    with node.sessions()() as s:
        outcomes = list(s.scalars(select(SendAttempt.outcome).where(SendAttempt.send_id == sent.id)))
    assert outcomes == ["failed", "sent"]  # the history is kept
    (op,) = _operations(node, "resend")
    assert (op.arguments, op.actor) == ("--failed", getpass.getuser())
    assert op.summary == "1 send(s) queued, 0 job(s) refused"
    assert f"operation {op.id}: resend --failed (by {getpass.getuser()})" in asked.stderr


def test_retention_on_a_running_node_keeps_the_files_of_open_jobs_and_sends(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode]
) -> None:
    log_file = tmp_path / "logs" / "node.log"
    node = _start(
        nodes,
        tmp_path / "node",
        checkpoint_root,
        # nobody listens: every send waits, pending, for an hour
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": helpers.free_port()}],
        default_destination="pacs",
        outbox={"max_attempts": 5, "backoff_initial_s": 3600, "backoff_max_s": 3600},
        retention={"received_days": 30, "outputs_days": 30, "interval_h": 0.001},  # every 3.6 s
        logging={"file": str(log_file)},
    )
    uids = [_store(node, tmp_path, name, seed) for name, seed in (("a", 7), ("b", 8))]
    jobs = [wait_until("the job", lambda u=u: _jobs_of(node, u), 30)[0] for u in uids]
    for job in jobs:
        _wait_done(node, job.id)
    keep_job, go_job = jobs

    def sends_tried() -> bool:  # each tried once and recorded (no longer 'sending'), pending for an hour
        with node.sessions()() as s:
            statuses = list(s.scalars(select(Send.status)))
            tried = s.scalars(select(func.count(func.distinct(SendAttempt.send_id)))).one()
        return statuses == [SendStatus.PENDING] * 2 and tried == 2

    wait_until("both sends tried", sends_tried, 60)

    # B's send gave up (failed); A's stays pending, and A also has a retry scheduled for tomorrow. Then
    # everything happened 40 days ago.
    old = utcnow() - timedelta(days=40)
    with node.sessions().begin() as s:
        gave_up = {"status": SendStatus.FAILED, "next_attempt_at": None}
        s.execute(update(Send).where(Send.job_id == go_job.id).values(**gave_up))
        s.add(
            Job(
                instance_id=keep_job.instance_id,
                status=JobStatus.QUEUED,
                attempts=1,
                reply_ae="STORESCU",
                created_at=old,
                next_attempt_at=utcnow() + timedelta(days=1),
            )
        )
        s.execute(update(Instance).values(received_at=old))
        s.execute(update(Job).values(created_at=old))
        s.execute(update(Job).where(Job.finished_at.is_not(None)).values(finished_at=old))
        s.execute(update(Output).values(created_at=old))
        s.execute(update(Send).values(created_at=old))
        s.execute(update(SendAttempt).values(started_at=old, finished_at=old))
    paths = {
        job.id: (Path(_job_instance_path(node, job.id)), [Path(o.path) for o in _outputs(node, job.id)])
        for job in jobs
    }

    def purging_run() -> Operation | None:
        return next(
            (o for o in _operations(node, "retention") if not o.summary.startswith("deleted 0 ")), None
        )

    op = wait_until("a retention run that deletes", purging_run, 60)
    n_out, n_kept = len(paths[go_job.id][1]), 1 + len(paths[keep_job.id][1])
    size = r"\([0-9.]+ [KM]iB\)"
    assert re.fullmatch(
        rf"deleted 1 received file\(s\) {size} older than 30 days and {n_out} output file\(s\) {size} older "
        rf"than 30 days; kept {n_kept} as old whose job or send is open or was active since",
        op.summary,
    ), op.summary
    assert (op.arguments, op.actor) == ("received 30 days, outputs 30 days", getpass.getuser())
    received_go, outputs_go = paths[go_job.id]
    received_keep, outputs_keep = paths[keep_job.id]
    assert not received_go.exists() and not any(p.exists() for p in outputs_go)
    assert received_keep.exists() and all(p.exists() for p in outputs_keep)
    with node.sessions()() as s:
        purged = s.scalars(select(Instance.sop_instance_uid).where(Instance.purged_at.is_not(None))).all()
        assert purged == [uids[1]]
        assert {o.job_id for o in s.scalars(select(Output).where(Output.purged_at.is_not(None)))} == {
            go_job.id
        }
    # serve logs to the [logging] file, the retention's line included
    text = log_file.read_text()
    assert "INFO node.service: listening on" in text
    assert f"INFO node.ops: operation {op.id}: retention received 30 days, outputs 30 days (by " in text

    # the operator is told, and the commands refuse what is gone
    shown = _cli(node, "jobs")
    assert f"(received 1x; file purged {utcnow():%Y-%m-%d})" in shown.stdout
    again = _cli(node, "reprocess", str(go_job.id))
    assert again.returncode == 1 and "refused: its spool file was purged on" in again.stdout
    resent = _cli(node, "resend", str(go_job.id))
    assert resent.returncode == 1 and "refused: its output files were purged on" in resent.stdout
    assert node.stop() == 0


def _job_instance_path(node: RunningNode, job_id: int) -> str:
    with node.sessions()() as s:
        return s.scalars(select(Instance.path).join(Job).where(Job.id == job_id)).one()


# --- systemd -----------------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_runs_serve_hardened() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    expected = {
        "Type": "simple",
        "User": "gradcam",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    # ExecStart names the installed entry point, a real subcommand and the configuration
    argv = shlex.split(service["ExecStart"])
    working = PurePosixPath(service["WorkingDirectory"])
    assert PurePosixPath(argv[0]) == working / ".venv" / "bin" / "gradcam-node"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gradcam-node"] == "node.cli:main"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("serve", "/etc/gradcam-node/node.toml")

    # the configuration the README installs there keeps spool and database where the unit may write
    readme = SYSTEMD_README.read_text(encoding="utf-8")
    assert f"config/node.toml {args.config}" in readme
    snippet = tomllib.loads(re.search(r"```toml\n(.*?)```", readme, re.S).group(1))
    writable = [PurePosixPath(p) for p in service["ReadWritePaths"].split()]
    storage = PurePosixPath(snippet["node"]["storage_dir"])
    database = PurePosixPath(snippet["node"]["database_url"].removeprefix("sqlite:///"))
    for path in (storage, database):
        assert any(path.is_relative_to(w) for w in writable), path


def test_systemd_worker_unit_runs_work_on_the_instance_s_device() -> None:
    worker = configparser.ConfigParser(interpolation=None, strict=True)
    worker.optionxform = str  # type: ignore[assignment,method-assign]
    worker.read_string(WORKER_UNIT.read_text(encoding="utf-8"))
    serve = _unit()
    for key in ("User", "KillSignal", "TimeoutStopSec", "KillMode", "NoNewPrivileges", "ProtectSystem"):
        assert worker["Service"][key] == serve["Service"][key], key
    argv = shlex.split(worker["Service"]["ExecStart"].replace("%i", "cuda:1"))
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.device) == ("work", "/etc/gradcam-node/node.toml", "cuda:1")
    assert "gradcam-node-worker@.service" in SYSTEMD_README.read_text(encoding="utf-8")


@pytest.mark.parametrize("unit", [UNIT, WORKER_UNIT], ids=["serve", "worker"])
def test_systemd_analyze_verifies_the_unit(tmp_path: Path, unit: Path) -> None:
    """systemd's own check of the units, with the executable pointed at this checkout's."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit's keys are checked by the test above)")
    executable = Path(sys.executable).parent / "gradcam-node"
    assert os.access(executable, os.X_OK), executable
    text = unit.read_text(encoding="utf-8").replace(
        "/opt/gradcam-node/.venv/bin/gradcam-node", str(executable)
    )
    copy = tmp_path / unit.name.replace("@.", "@cpu.")
    copy.write_text(text, encoding="utf-8")
    done = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
