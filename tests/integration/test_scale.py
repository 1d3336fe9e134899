"""Scale-out: analysis workers as processes of their own, on PostgreSQL and on SQLite, and what happens when
one of them, or the node while it sends, is killed.

Real components throughout: `gradcam-node serve` and `gradcam-node work` subprocesses, a PostgreSQL server
started for the session (tests/postgres.py), DCMTK storescu sending, a pynetdicom storage SCP counting every
delivery by SOP Instance UID (helpers.CountingScp). Kills are SIGKILL, as from the OOM killer.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest
from helpers import CountingScp, RunningNode, dcmtk, run_tool, wait_until
from sqlalchemy import func, select

from node.db import Delivery, Instance, Job, JobStatus, Output, Result, Send, SendStatus, WorkerState, utcnow
from node.work.presence import seen_workers

pytestmark = pytest.mark.integration

MODELS = ("ResNet18",)  # one small model: these tests are about the plumbing, not the analysis
OUTPUTS_PER_JOB = 2 + 2 * len(MODELS)  # negative_maps on: summary, SC and heatmap per model, SR
TIMEOUT_S = 300


@dataclass
class WorkerProcess:
    """A `gradcam-node work` subprocess."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def holder(self) -> str:
        """Its lease holder id (node.db.leases.holder_id)."""
        return f"{socket.gethostname()}:{self.proc.pid}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@dataclass
class Cluster:
    """What a test started: the receiving node, its worker processes, the destination."""

    tmp: Path
    nodes: list[RunningNode]
    workers: list[WorkerProcess]
    dest: CountingScp | None = None

    def start_worker(self, config: Path) -> WorkerProcess:
        log_path = self.tmp / f"worker{len(self.workers) + 1}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--config", str(config), "work"],
                cwd=helpers.REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        worker = WorkerProcess(proc, log_path)
        self.workers.append(worker)
        wait_until(f"worker {proc.pid} to start", lambda: _started(worker), 120)
        return worker


def _started(worker: WorkerProcess) -> bool:
    if worker.proc.poll() is not None:
        pytest.fail(f"worker exited with {worker.proc.returncode}:\n{worker.log_text()}")
    return "worker " in worker.log_text() and " started (models:" in worker.log_text()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, [], [])
    yield c
    for w in c.workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        print(f"----- {w.log_path.name} (exit {w.proc.returncode}) -----\n{w.log_text()[-8000:]}")
    for n in c.nodes:
        code = n.stop()
        print(f"----- {n.log_path.name} (exit {code}) -----\n{n.log_text()[-8000:]}")
    if c.dest is not None:
        c.dest.stop()


def _receiver(
    cluster: Cluster, checkpoint_root: Path, database_url: str | None, delay_s: float = 0.0, **config: object
) -> RunningNode:
    """`serve` with a destination that counts deliveries; ``config`` goes to helpers.write_test_config."""
    cluster.dest = CountingScp(helpers.free_port(), delay_s=delay_s)
    cluster.dest.start()
    worker = {"batch_size": 4, "lease_s": 3, "poll_s": 0.2, **config.pop("worker", {})}  # type: ignore[dict-item]
    node = helpers.start_node(
        cluster.tmp / "node",
        helpers.checkpoints_for(checkpoint_root, MODELS),
        wait=False,
        database_url=database_url,
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": cluster.dest.port}],
        default_destination="pacs",
        outputs={"negative_maps": True},  # every model has a map: a fixed number of outputs per job
        outbox={"backoff_initial_s": 0.5, "backoff_max_s": 2.0, **config.pop("outbox", {})},  # type: ignore[dict-item]
        worker=worker,
        **config,
    )
    cluster.nodes.append(node)
    node.wait_ready()
    return node


def _send_images(cluster: Cluster, node: RunningNode, n: int, size: int = 128) -> list[Path]:
    files = [
        helpers.write_dataset(helpers.image_dataset(size=size, seed=500 + i), cluster.tmp / "in" / f"{i}.dcm")
        for i in range(n)
    ]
    res = run_tool(
        [dcmtk("storescu"), "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        timeout=300,
    )
    assert res.returncode == 0, res.stdout
    return files


def _count(node: RunningNode, stmt: object) -> int:
    with node.sessions()() as s:
        return int(s.scalar(stmt) or 0)


def _all_delivered(node: RunningNode, n_jobs: int) -> bool:
    sent = _count(node, select(func.count()).select_from(Send).where(Send.status == SendStatus.SENT))
    return sent == n_jobs


def _jobs(node: RunningNode) -> list[Job]:
    with node.sessions()() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def test_two_workers_on_postgresql_process_60_instances_exactly_once(
    pg_url: str, cluster: Cluster, checkpoint_root: Path
) -> None:
    """The receiver analyses nothing itself ([worker] processes = 0); two `work` processes share one
    PostgreSQL job store and one spool, claiming with FOR UPDATE SKIP LOCKED."""
    node = _receiver(cluster, checkpoint_root, pg_url, worker={"processes": 0})
    workers = [cluster.start_worker(node.config_path) for _ in range(2)]
    files = _send_images(cluster, node, 60)
    wait_until("60 jobs analysed and sent", lambda: _all_delivered(node, 60), TIMEOUT_S, interval=0.5)

    jobs = _jobs(node)
    assert len(jobs) == 60 and {j.status for j in jobs} == {JobStatus.DONE}
    assert {j.attempts for j in jobs} == {1}, "no job was claimed twice"
    assert _count(node, select(func.count(func.distinct(Job.instance_id)))) == 60
    assert _count(node, select(func.count()).select_from(Instance)) == len(files)
    assert _count(node, select(func.count()).select_from(Result)) == 60 * len(MODELS)
    assert _count(node, select(func.count()).select_from(Output)) == 60 * OUTPUTS_PER_JOB
    assert _count(node, select(func.count()).select_from(Delivery)) == 60 * OUTPUTS_PER_JOB
    counts = cluster.dest.snapshot() if cluster.dest else {}
    assert len(counts) == 60 * OUTPUTS_PER_JOB and set(counts.values()) == {1}, "each output delivered once"
    done_by = [w.log_text().count(" done in ") for w in workers]
    assert sum(done_by) == 60 and min(done_by) > 0, f"both workers analysed: {done_by}"


def test_a_killed_worker_s_jobs_finish_elsewhere_after_its_lease(
    pg_url: str, cluster: Cluster, checkpoint_root: Path
) -> None:
    """kill -9 of a worker holding jobs: the other worker, already running, takes them when their lease
    (3 s) runs out; nothing restarts, and each output reaches the destination once."""
    node = _receiver(cluster, checkpoint_root, pg_url, worker={"processes": 0, "batch_size": 4})
    victim, survivor = cluster.start_worker(node.config_path), cluster.start_worker(node.config_path)
    sending = threading.Thread(target=_send_images, args=(cluster, node, 16, 1024))
    sending.start()

    def held_by_victim() -> list[int]:
        return [j.id for j in _jobs(node) if j.status == JobStatus.RUNNING and j.leased_by == victim.holder]

    held = wait_until("the worker to hold jobs", held_by_victim, 120, interval=0.01)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(10)
    sending.join(300)
    wait_until("16 jobs analysed and sent", lambda: _all_delivered(node, 16), TIMEOUT_S, interval=0.5)

    jobs = {j.id: j for j in _jobs(node)}
    assert {j.status for j in jobs.values()} == {JobStatus.DONE}
    assert all(jobs[i].attempts == 2 for i in held), "the killed worker's jobs were claimed a second time"
    assert "recovered after an unclean stop" not in survivor.log_text(), "taken over by lease, not recover()"
    assert survivor.proc.poll() is None
    counts = cluster.dest.snapshot() if cluster.dest else {}
    assert len(counts) == 16 * OUTPUTS_PER_JOB and set(counts.values()) == {1}


def test_a_job_that_kills_its_worker_every_time_ends_failed(
    cluster: Cluster, checkpoint_root: Path, tmp_path: Path
) -> None:
    """SQLite, `work` processes beside `serve`: each worker that takes the job is killed while it holds it
    (as an image that crashes the decoder or exhausts memory would); after max_attempts the next worker
    ends the job failed instead of dying with it."""
    node = _receiver(
        cluster, checkpoint_root, None, worker={"processes": 0, "max_attempts": 2, "batch_size": 1}
    )
    _send_images(cluster, node, 1, size=3072)  # seconds to analyse: time to see it held, and kill
    for attempt in (1, 2):
        worker = cluster.start_worker(node.config_path)
        wait_until(
            f"attempt {attempt} to be held",
            lambda w=worker: any(j.leased_by == w.holder for j in _jobs(node)),  # type: ignore[misc]
            120,
            interval=0.02,
        )
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)
    last = cluster.start_worker(node.config_path)
    (job,) = wait_until(
        "the job to end failed", lambda: [j for j in _jobs(node) if j.status == JobStatus.FAILED], 60
    )
    assert job.attempts == 2 and job.reason == (
        "worker died 2 times while analysing it (killed, out of memory, crashed?): not tried again"
    )
    assert _count(node, select(func.count()).select_from(Result)) == 0
    assert last.proc.poll() is None, "the last worker lives on"
    assert node.proc.poll() is None


def test_a_kill_during_a_send_resends_only_the_files_not_yet_delivered(
    cluster: Cluster, checkpoint_root: Path, tmp_path: Path
) -> None:
    """kill -9 of `serve` while it sends to a slow PACS (0.4 s per C-STORE): after the restart only the
    undelivered files of the interrupted send go again; at most the file in flight arrives twice."""
    node = _receiver(cluster, checkpoint_root, None, delay_s=0.4, outbox={"associations": 1})
    _send_images(cluster, node, 2)
    dest = cluster.dest
    assert dest is not None

    def mid_send() -> bool:
        with node.sessions()() as s:
            sending = s.scalar(
                select(func.count()).select_from(Send).where(Send.status == SendStatus.SENDING)
            )
            delivered = s.scalar(select(func.count()).select_from(Delivery))
        return bool(sending) and 0 < int(delivered or 0)

    wait_until("a send half done", mid_send, 120, interval=0.02)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    with node.sessions()() as s:
        delivered_at_kill = set(s.scalars(select(Delivery.sop_instance_uid)))
    before = dest.snapshot()
    assert delivered_at_kill and len(before) < 2 * OUTPUTS_PER_JOB

    node.log_path = node.log_path.rename(node.log_path.with_name("node-killed.log"))
    restarted = helpers.start_node_with(node.config_path, node.log_path.parent, node.port, wait=False)
    cluster.nodes.append(restarted)
    restarted.wait_ready()
    wait_until("both jobs sent", lambda: _all_delivered(restarted, 2), TIMEOUT_S, interval=0.5)

    counts = dest.snapshot()
    assert len(counts) == 2 * OUTPUTS_PER_JOB, "every output arrives"
    again = {uid for uid, c in counts.items() if c > 1}
    assert not again & delivered_at_kill, "no acknowledged file is sent again"
    assert len(again) <= 1 and set(counts.values()) <= {1, 2}, f"at most the file in flight twice: {again}"


def test_serve_starts_a_killed_local_worker_again(cluster: Cluster, checkpoint_root: Path) -> None:
    """`serve`'s own worker process, killed: serve logs it and starts another, which does the work; the
    status page's workers show the killed one silent (gone) after a lease and its successor alive."""
    node = _receiver(cluster, checkpoint_root, None, worker={"processes": 1})
    (first,) = re.findall(r"1 worker process\(es\) ready: (\d+)", node.log_text())
    killed = f"{socket.gethostname()}:{first}"
    assert _worker_states(node) == {killed: ("alive", "cpu")}
    os.kill(int(first), signal.SIGKILL)
    wait_until("serve to start another worker", lambda: node.log_text().count("worker process(es)") >= 1
               and f"worker process {first} exited (code -9)" in node.log_text()
               and node.log_text().count(" started (models:") >= 2, 120)  # fmt: skip
    _send_images(cluster, node, 4)
    wait_until("4 jobs analysed and sent", lambda: _all_delivered(node, 4), TIMEOUT_S, interval=0.5)
    assert node.proc.poll() is None
    wait_until("the killed worker shown silent", lambda: _worker_states(node)[killed][0] == "silent", 30)
    (successor,) = (w for w in _worker_states(node) if w != killed)
    assert _worker_states(node)[successor] == ("alive", "cpu")
    wait_until("its 4 jobs in its next beat", lambda: _jobs_done(node, successor) == 4, 30)


def _jobs_done(node: RunningNode, holder: str) -> int:
    with node.sessions()() as s:
        return s.query(WorkerState).filter_by(holder=holder).one().jobs_done


def _worker_states(node: RunningNode) -> dict[str, tuple[str, str]]:
    """Each worker process of the node's database: (state as the status page shows it, device)."""
    with node.sessions()() as s:
        return {w.worker: (w.state, w.device) for w in seen_workers(s, utcnow(), 3.0)}  # lease_s of _receiver
