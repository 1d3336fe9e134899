"""The node survives what happens to real services: SIGKILL right after acknowledging, a destination that is
down for a while, and SIGTERM in the middle of work. The node is a real subprocess, DCMTK storescu the
sender, a pynetdicom storage SCP in the test the destination (it counts deliveries per SOP Instance UID).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import helpers
import pydicom
import pytest
from helpers import CountingScp, RunningNode, dcmtk, run_tool, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import Instance, Job, JobStatus, Output, Result, Send, SendAttempt, SendStatus

pytestmark = pytest.mark.integration

MODELS = ("ResNet18",)  # one small model: these tests are about the plumbing, not the analysis
# with negative_maps on: the summary, an SC and a heatmap per model, and the SR
OUTPUTS_PER_JOB = 2 + 2 * len(MODELS)
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
TIMEOUT_S = 240
T = TypeVar("T")


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RunningNode]]:
    """Nodes started by a test (first start and restarts); stopped and their logs printed at teardown."""
    started: list[RunningNode] = []
    yield started
    for n in started:
        code = n.stop()
        print(f"----- {n.log_path.name} (exit {code}) -----\n{n.log_text()[-15000:]}")


@pytest.fixture
def scps() -> Iterator[list[CountingScp]]:
    started: list[CountingScp] = []
    yield started
    for s in started:
        s.stop()


def _start(
    base: Path, checkpoint_root: Path, dest_port: int, nodes: list[RunningNode], **config: object
) -> RunningNode:
    running = helpers.start_node(
        base,
        helpers.checkpoints_for(checkpoint_root, MODELS),
        wait=False,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": dest_port}],
        default_destination="pacs",
        outputs={"negative_maps": True},  # every model has a map: a fixed number of outputs per job
        **config,
    )
    nodes.append(running)
    running.wait_ready()
    return running


def _restart(old: RunningNode, nodes: list[RunningNode]) -> RunningNode:
    """Start the same configuration again (same port, spool and database), logging to a new file."""
    log_path = old.log_path.with_name(f"node-restart{len(nodes)}.log")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--config", str(old.config_path), "serve"],
            cwd=helpers.REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    running = RunningNode(
        proc, old.port, old.ae_title, old.config_path, old.storage_dir, old.database_url, log_path
    )
    nodes.append(running)
    running.wait_ready()
    return running


def _inputs(directory: Path, n: int, size: int = 128) -> list[Path]:
    return [
        helpers.write_dataset(helpers.image_dataset(size=size, seed=100 + i), directory / f"in{i}.dcm")
        for i in range(n)
    ]


def _running_dest(scps: list[CountingScp]) -> CountingScp:
    """A destination SCP listening on a free port (stopped by the ``scps`` fixture)."""
    dest = CountingScp(helpers.free_port())
    dest.start()
    scps.append(dest)
    return dest


def _storescu(node: RunningNode, files: list[Path]) -> None:
    res = run_tool(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        timeout=120,
    )
    assert res.returncode == 0, res.stdout


def _query(node: RunningNode, fn: Callable[[Session], T]) -> T:
    """Run ``fn(session)`` in a short session (each session holds SQLite's write lock while open)."""
    with node.sessions()() as s:
        return fn(s)


def _all_jobs(node: RunningNode) -> list[Job]:
    return list(_query(node, lambda s: s.scalars(select(Job).order_by(Job.id)).all()))


def _outputs(node: RunningNode) -> list[Output]:
    return list(_query(node, lambda s: s.scalars(select(Output)).all()))


def _sends(node: RunningNode) -> list[Send]:
    return list(_query(node, lambda s: s.scalars(select(Send).order_by(Send.id)).all()))


def _all_sent(node: RunningNode, n_jobs: int) -> bool:
    jobs = _all_jobs(node)
    sends = _sends(node)
    return (
        len(jobs) == n_jobs
        and all(j.status == JobStatus.DONE for j in jobs)
        and len(sends) == n_jobs
        and all(s.status == SendStatus.SENT for s in sends)
    )


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sigkill_after_ack_then_restart_delivers_once(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode], scps: list[CountingScp]
) -> None:
    dest = _running_dest(scps)
    node = _start(
        tmp_path / "node",
        checkpoint_root,
        dest.port,
        nodes,
        worker={"batch_size": 2},
        outbox={"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
    )
    files = _inputs(tmp_path / "in", 6)
    _storescu(node, files)
    node.proc.send_signal(signal.SIGKILL)  # as soon as every instance was acknowledged
    node.proc.wait(10)

    # What was acknowledged is durable: every instance and its job are in the database, files in the spool.
    uids = {_uid(f) for f in files}
    with node.sessions()() as s:
        instances = s.scalars(select(Instance)).all()
        unfinished_at_kill = {x.id for x in s.scalars(select(Send).where(Send.status == SendStatus.SENDING))}
        interrupted = {
            o.sop_instance_uid
            for o in s.scalars(
                select(Output).join(Send, Send.job_id == Output.job_id).where(Send.id.in_(unfinished_at_kill))
            )
        }
        at_kill = Counter(str(j.status) for j in s.scalars(select(Job)))
    print(f"at SIGKILL: jobs {dict(at_kill)}, sends cut mid-association: {len(unfinished_at_kill)}")
    assert {i.sop_instance_uid for i in instances} == uids
    assert all(Path(i.path).is_file() for i in instances)
    delivered_before = dest.snapshot()

    node = _restart(node, nodes)
    wait_until("all results sent after the restart", lambda: _all_sent(node, len(files)), TIMEOUT_S)
    outputs = _outputs(node)
    assert len(outputs) == len(files) * OUTPUTS_PER_JOB
    counts = dest.snapshot()
    assert set(counts) == {o.sop_instance_uid for o in outputs}, "every output arrives"
    # Exactly once, except instances of an association the kill cut in the middle (C-STORE cannot tell
    # which of them the peer kept, so that send is repeated whole): those may arrive twice, never more.
    repeated = {uid: c for uid, c in counts.items() if c > 1}
    assert set(repeated) <= interrupted, (repeated, delivered_before)
    assert all(c == 2 for c in repeated.values())
    # kill -9 can leave a writer's hidden temporary file behind, never a visible half-written object:
    # every .dcm in the spool (received instances and outputs) is complete
    assert all(p.name.startswith(".") for p in node.storage_dir.rglob("*.tmp"))
    for path in node.storage_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:  # all uncompressed here: a torn file would be short
            expected = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
            assert len(ds.PixelData) >= expected, path


def test_destination_down_then_up(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode], scps: list[CountingScp]
) -> None:
    dest = CountingScp(helpers.free_port())  # not started: the port is closed
    node = _start(
        tmp_path / "node",
        checkpoint_root,
        dest.port,
        nodes,
        outbox={"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_attempts": 100},
    )
    files = _inputs(tmp_path / "in", 2)
    _storescu(node, files)

    def failed_attempts() -> list[SendAttempt]:
        return list(
            _query(
                node, lambda s: s.scalars(select(SendAttempt).where(SendAttempt.outcome == "failed")).all()
            )
        )

    def each_send_failed_twice() -> bool:
        per_send = Counter(a.send_id for a in failed_attempts())
        sends = _sends(node)
        return len(sends) == len(files) and all(per_send[x.id] >= 2 for x in sends)

    wait_until("two failed attempts of each send", each_send_failed_twice, TIMEOUT_S)
    assert all("cannot connect" in a.detail for a in failed_attempts()), [a.detail for a in failed_attempts()]
    assert all(x.status in (SendStatus.PENDING, SendStatus.SENDING) and x.last_error for x in _sends(node))

    dest.start()
    scps.append(dest)
    wait_until("results after the destination came back", lambda: _all_sent(node, len(files)), TIMEOUT_S)
    outputs = _outputs(node)
    assert dest.snapshot() == Counter({o.sop_instance_uid: 1 for o in outputs})
    for send in _sends(node):
        attempts = list(
            _query(
                node,
                lambda s, i=send.id: s.scalars(
                    select(SendAttempt).where(SendAttempt.send_id == i).order_by(SendAttempt.id)
                ).all(),
            )
        )
        outcomes = [a.outcome for a in attempts]
        assert (
            outcomes[-1] == "sent"
            and outcomes[:-1] == ["failed"] * (len(outcomes) - 1)
            and len(outcomes) >= 3
        )
        assert send.attempts == len(attempts)


def test_sigterm_during_work_stops_cleanly(
    tmp_path: Path, checkpoint_root: Path, nodes: list[RunningNode], scps: list[CountingScp]
) -> None:
    dest = _running_dest(scps)
    node = _start(
        tmp_path / "node",
        checkpoint_root,
        dest.port,
        nodes,
        worker={"batch_size": 2},
        render={"max_side": 512},
    )
    files = _inputs(tmp_path / "in", 8, size=384)
    _storescu(node, files)
    wait_until(
        "work in progress", lambda: any(j.status != JobStatus.QUEUED for j in _all_jobs(node)), TIMEOUT_S
    )
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(120) == 0, node.log_text()[-5000:]

    assert not list(node.storage_dir.rglob("*.tmp")), "no half-written file"
    jobs = _all_jobs(node)
    print(f"after SIGTERM: jobs {dict(Counter(str(j.status) for j in jobs))}")
    assert len(jobs) == len(files)
    assert {j.status for j in jobs} <= {JobStatus.DONE, JobStatus.QUEUED}, [(j.id, j.status) for j in jobs]
    outputs = _outputs(node)
    with node.sessions()() as s:
        for j in jobs:
            n_results = len(s.scalars(select(Result).where(Result.job_id == j.id)).all())
            n_outputs = sum(1 for o in outputs if o.job_id == j.id)
            expected = (len(MODELS), OUTPUTS_PER_JOB) if j.status == JobStatus.DONE else (0, 0)
            assert (n_results, n_outputs) == expected, (j.id, j.status)
    assert all(Path(o.path).is_file() for o in outputs)
    on_disk = {p.stem for p in (node.storage_dir / "outputs").rglob("*.dcm")}
    assert on_disk == {o.sop_instance_uid for o in outputs}, "no output file without its database row"
    assert all(s.status in (SendStatus.PENDING, SendStatus.SENT) for s in _sends(node)), (
        "no send left 'sending'"
    )

    node = _restart(node, nodes)
    wait_until("the rest after the restart", lambda: _all_sent(node, len(files)), TIMEOUT_S)
    assert set(dest.snapshot()) == {o.sop_instance_uid for o in _outputs(node)}
