"""Scaling benchmark of the node: 1 and 2 ``gradcam-node work`` processes, on SQLite and on PostgreSQL.

Runs, in one go (so that the figures compare as ratios on a noisy machine), one configuration per
database and number of workers: ``gradcam-node serve`` with ``[worker] processes = 0`` (it receives and
sends only) and N ``gradcam-node work`` processes started by the bench with the same configuration
(``inference_threads = max(1, (cores - 1) // N)``), each configuration with a fresh spool, database (a new
PostgreSQL database on a throw-away server, tests/postgres.py) and ports. Once every worker has logged
"started", it sends the phantoms with DCMTK's ``/usr/bin/storescu`` and waits until every job is finished
and every send is done; the destination is DCMTK's ``storescp`` (as in bench/node.py, whose parts this
reuses). On PostgreSQL the workers and ``serve``'s sender are rung by NOTIFY when a job or a send is
queued; on SQLite, workers that ``serve`` did not start, and its sender, find them by looking every
``[worker] poll_s`` when idle (``--poll-s``; default the configuration's): at a few seconds a
configuration, that wait is part of the throughput. Prints, per configuration:

* throughput: instances per second from the first acknowledgement to the last output received at the
  destination; its ratio to the first configuration (1 worker, SQLite) and to the forward-only floor
  (bench/node.py's, in this process: the faster of before and after the configurations);
* CPU per instance (from /proc, start-up excluded) of ``serve`` alone (receive and send: what bounds one
  receiver on a host with many cores or a GPU), of the worker processes (decode, outputs, database), of
  their model processes, the non-model CPU (``serve`` + workers) and, on PostgreSQL, the database
  server's (SQLite's is in the processes that use it);
* jobs not done and duplicate deliveries.

Usage::

    .venv/bin/python bench/scale.py [--count 24] [--workers 1,2] [--databases sqlite,postgresql] [--poll-s 1]

Synthetic data only. No assertions: this prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_node", ROOT / "bench" / "node.py")
assert _spec is not None and _spec.loader is not None
bench = sys.modules["bench_node"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(bench)  # puts ROOT on sys.path
sys.path.append(str(ROOT / "tests"))  # after ROOT: tests/node and tests/gradcam must not shadow the packages

import pytest  # noqa: E402 - only for the exception tests/postgres.py raises when it cannot start a server
import torch  # noqa: E402
from postgres import PostgresServer, find_programs  # noqa: E402
from sqlalchemy import Engine, func, select  # noqa: E402

from gradcam.config import ModelConfig  # noqa: E402
from node.config import load_settings  # noqa: E402
from node.db import Job, JobStatus, Send, SendStatus, make_engine  # noqa: E402

__all__ = ["main"]

_STARTED = re.compile(rb"worker \S+ started \(models: ")
_BUSY_JOBS = (JobStatus.QUEUED, JobStatus.RUNNING)
_BUSY_SENDS = (SendStatus.PENDING, SendStatus.SENDING)


@dataclass
class Config:
    workers: int
    database: str  # "sqlite" or "postgresql"

    @property
    def name(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}, {self.database}"

    @property
    def slug(self) -> str:
        return f"{self.database}-{self.workers}w"


@dataclass
class Run:
    config: Config
    threads: int
    outcome: bench.Outcome
    cpu: dict[str, float]  # "serve", "worker process", "models process" (, "postgresql") -> seconds


# --- processes ------------------------------------------------------------------------------------------


def write_scale_config(
    path: Path,
    base_path: Path,
    models: tuple[ModelConfig, ...],
    ports: tuple[int, int],
    work: Path,
    db_url: str,
    threads: int,
    poll_s: float,
) -> None:
    """bench/node.py's configuration with ``database_url``, no local workers, ``threads`` torch threads and
    ``poll_s``."""
    bench.write_config(path, base_path, models, ports[0], ports[1], work)
    overrides = {
        "node": {"database_url": bench.toml_value(db_url)},
        "worker": {"processes": "0", "inference_threads": str(threads), "poll_s": repr(poll_s)},
    }
    lines, section = path.read_text(encoding="utf-8").splitlines(), ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key = line.split("=", 1)[0].strip()
        if key in overrides.get(section, {}):
            lines[i] = f"{key} = {overrides[section].pop(key)}"
    for name, left in overrides.items():  # keys bench/node.py does not write: at the top of their table
        at = lines.index(f"[{name}]") + 1
        lines[at:at] = [f"{key} = {value}" for key, value in left.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def start_worker(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """``gradcam-node --config CONFIG work``, its output into ``log_path``."""
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        command = [sys.executable, "-m", "node.cli", "--config", str(config), "work"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_started(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    """Wait until the worker logs "worker HOST:PID started"; raise if it exits first or takes too long."""
    deadline = time.monotonic() + timeout
    while not _STARTED.search(log_path.read_bytes()):
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} during start-up:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not started after {timeout:.0f} s:\n{tail(log_path)}")
        time.sleep(0.25)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """SIGTERM to all at once, then SIGKILL to any still there ``timeout`` seconds later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def cpu_now(
    serve: subprocess.Popen[bytes], workers: list[subprocess.Popen[bytes]], db_pid: int | None
) -> dict[str, float]:
    """CPU seconds of ``serve`` (with anything it started), of the workers and their model processes, and
    of the PostgreSQL server ``db_pid`` (all its processes, those ended too)."""
    out = {"serve": sum(bench.cpu_seconds(serve.pid).values())}
    if db_pid is not None:
        out["postgresql"] = sum(bench.cpu_seconds(db_pid, ended_children=True).values())
    for w in workers:
        for label, seconds in bench.cpu_seconds(w.pid).items():
            out[label] = out.get(label, 0.0) + seconds
    return out


def finished(engine: Engine) -> bool:
    """Every job finished, every done job's send queued, and no send waiting or under way."""
    with engine.connect() as c:
        jobs = c.execute(select(func.count()).select_from(Job)).scalar_one()
        busy = c.execute(select(func.count()).where(Job.status.in_(_BUSY_JOBS))).scalar_one()
        done = c.execute(select(func.count()).where(Job.status == JobStatus.DONE)).scalar_one()
        sends = c.execute(select(func.count()).select_from(Send)).scalar_one()
        sending = c.execute(select(func.count()).where(Send.status.in_(_BUSY_SENDS))).scalar_one()
    return jobs > 0 and busy == 0 and sends >= done and sending == 0


# --- one configuration ----------------------------------------------------------------------------------


def run_config(
    config: Config,
    db_url: str,
    work: Path,
    files: list[Path],
    models: tuple[ModelConfig, ...],
    args: argparse.Namespace,
    db_pid: int | None = None,
) -> Run:
    threads = max(1, ((os.cpu_count() or 2) - 1) // config.workers)
    ports = (bench.free_port(), bench.free_port())
    path = work / "node.toml"
    write_scale_config(path, args.config, models, ports, work, db_url, threads, args.poll_s)
    logs = [work / "serve.log", *(work / f"work-{i}.log" for i in range(config.workers))]
    procs: list[subprocess.Popen[bytes]] = []  # serve, then the workers
    with ExitStack() as stack:  # on the way out: the processes (all at once), then the destination
        receiver = bench.StorescpReceiver(ports[1], work / "received")
        stack.callback(receiver.stop)
        stack.callback(stop_all, procs)
        procs.append(bench.start_node(path, logs[0]))
        bench.wait_listening(ports[0], procs[0], 300)  # the schema is made before the workers open it
        procs += [start_worker(path, log) for log in logs[1:]]
        for w, log in zip(procs[1:], logs[1:], strict=True):
            wait_started(w, log, 300)
        serve, workers = procs[0], procs[1:]
        cpu_start = cpu_now(serve, workers, db_pid)  # after start-up: imports, models, warm-up
        sent = subprocess.run(
            [str(bench.STORESCU), "-aet", "BENCH", "-aec", "GRADCAM", "127.0.0.1", str(ports[0])]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
        )
        if sent.returncode != 0:
            print(f"storescu failed ({sent.returncode}): {sent.stderr.strip()}", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        engine = make_engine(db_url)
        stack.callback(engine.dispose)
        while not finished(engine) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                print(f"{config.name}: a process exited early", file=sys.stderr)
                break
            time.sleep(0.5)
        cpu_end = cpu_now(serve, workers, db_pid)
    outcome = bench.collect(db_url, receiver)
    if outcome.failed or len(outcome.done) < len(files):
        for log in logs:
            print(f"--- {log} (end) ---\n{tail(log)}", file=sys.stderr)
    cpu = {k: cpu_end[k] - cpu_start.get(k, 0.0) for k in cpu_end}
    return Run(config, threads, outcome, cpu)


def throughput(o: bench.Outcome) -> float:
    """Instances per second from the first acknowledgement to the last output at the destination."""
    if not o.done:
        return float("nan")
    span = max(o.done.values()) - min(o.acks.values())
    return len(o.done) / span if span > 0 else float("nan")


# --- report ---------------------------------------------------------------------------------------------


def report(runs: list[Run], floor: float, n: int) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000 / n:.0f}"

    head = (
        "configuration",
        "threads",
        "complete",
        "inst/s",
        "vs first",
        "/ floor",
        "serve ms",
        "workers ms",
        "models ms",
        "non-model ms",
        "postgres ms",
        "failed",
        "dups",
    )
    rows = [head]
    first = throughput(runs[0].outcome) if runs else float("nan")
    for r in runs:
        t, cpu = throughput(r.outcome), r.cpu
        serve, worker = cpu.get("serve", 0.0), cpu.get("worker process", 0.0)
        rows.append(
            (
                r.config.name,
                str(r.threads),
                f"{len(r.outcome.done)}/{n}",
                f"{t:.2f}",
                f"{t / first:.2f}",
                f"{t / floor:.2f}",
                ms(serve),
                ms(worker),
                ms(cpu.get("models process", 0.0)),
                ms(serve + worker),
                ms(cpu["postgresql"]) if "postgresql" in cpu else "-",
                str(r.outcome.failed),
                str(r.outcome.duplicates),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    print()
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    print(
        f"\nfloor (forward only, {torch.get_num_threads()} torch threads): {floor:.2f} inst/s; "
        "threads: torch threads of each model process; CPU columns: ms per instance sent, start-up "
        "excluded; non-model: serve + workers; postgres: the database server's processes"
    )


# --- main -----------------------------------------------------------------------------------------------


def postgres_available() -> bool:
    try:
        find_programs()
        import psycopg  # noqa: F401
    except (pytest.fail.Exception, ImportError) as exc:
        print(f"PostgreSQL not available, SQLite only: {str(exc).splitlines()[0]}", flush=True)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=24, help="phantom instances per configuration (default 24)")
    p.add_argument("--size", type=int, default=512, help="side of the phantoms (pixels)")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "node.toml", help="models, batch size")
    p.add_argument("--workers", default="1,2", help="numbers of work processes (default 1,2)")
    p.add_argument("--databases", default="sqlite,postgresql", help="sqlite and/or postgresql")
    p.add_argument("--workdir", type=Path, help="keep everything (inputs, spools, databases, logs) here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for a configuration")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--poll-s",
        type=float,
        help="[worker] poll_s: how often idle workers look for jobs and serve for their sends "
        "(default: the --config's)",
    )
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    if bad := [d for d in databases if d not in ("sqlite", "postgresql")] or [w for w in workers if w < 1]:
        p.error(f"not a database or a number of workers: {bad}")
    for tool in (bench.STORESCU, bench.STORESCP):
        if not os.access(tool, os.X_OK):
            print(f"{tool} is not installed (DCMTK)", file=sys.stderr)
            return 2
    if "postgresql" in databases and not postgres_available():
        databases = [d for d in databases if d != "postgresql"]
    configs = [Config(w, d) for d in databases for w in workers]
    base = load_settings(args.config)
    batch = base.worker.batch_size
    args.poll_s = base.worker.poll_s if args.poll_s is None else args.poll_s
    with tempfile.TemporaryDirectory(prefix="gradcam-scale-") as tmp, ExitStack() as stack:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models, weights = bench.checkpoints_for(base.core.enabled_models, work / "checkpoints")
        files, source = bench.make_inputs(work / "inputs", args.count, args.seed, args.size)
        print(
            f"inputs: {len(files)} ({source}); models: {', '.join(m.name for m in models)} ({weights} "
            f"weights); batch size {batch}; poll_s {args.poll_s}; {os.cpu_count()} cores; configurations: "
            f"{'; '.join(c.name for c in configs)}",
            flush=True,
        )
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        before = bench.measure_floor(models, files, batch, base.core.preprocess.max_pixels)
        server = None
        if "postgresql" in databases:
            server = PostgresServer()
            stack.callback(server.stop)  # also on errors and Ctrl-C
            try:
                server.start()
            except pytest.fail.Exception as exc:
                print(f"PostgreSQL did not start, SQLite only: {str(exc).splitlines()[0]}", flush=True)
                configs, server = [c for c in configs if c.database != "postgresql"], None
        runs = []
        for i, config in enumerate(configs):
            folder = work / f"{i}-{config.slug}"
            shutil.rmtree(folder, ignore_errors=True)  # a fresh spool and SQLite database
            folder.mkdir()
            db_pid = None
            if server is not None and config.database == "postgresql":
                server.create_database(f"scale_{i}")
                db_url = server.url(f"scale_{i}")
                db_pid = int((server.data / "postmaster.pid").read_text().split()[0])
            else:
                db_url = f"sqlite:///{folder / 'node.db'}"
            print(f"running: {config.name} ...", flush=True)
            try:
                runs.append(run_config(config, db_url, folder, files, models, args, db_pid))
            except (RuntimeError, TimeoutError) as exc:  # a process that did not start: the others still run
                print(f"{config.name}: not measured: {exc}", file=sys.stderr, flush=True)
        # the floor again: other load on the machine only slows a pass down, so the faster one counts
        after = bench.measure_floor(models, files, batch, base.core.preprocess.max_pixels)
        floor = 1.0 / sum(min(before[name], after[name]) for name in before)
        print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
        report(runs, floor, len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
