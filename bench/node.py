"""End-to-end benchmark of the node: storescu -> node (subprocess) -> destination.

Sends N synthetic phantom instances with DCMTK's ``/usr/bin/storescu`` to a node started as a subprocess
(the default configuration's models, with the committed demo checkpoints when they exist, else seeded
random weights of the same architectures), which sends its SC and SR objects to the destination: DCMTK's
``storescp`` (default; native code, as the sender is: on one small machine the destination's CPU is taken
from the node) or, with ``--destination pynetdicom``, a pynetdicom SCP in this process. Prints, against a
floor measured in the same run on the same preprocessed images:

* floor: ``1 / sum`` over the models of the per-image forward time at the worker's batch size (no
  Grad-CAM, no decoding, no DICOM, no network): what the node could do if everything else were free;
* throughput: instances per second from the first acknowledgement (``instances.received_at``) to the
  last output received at the destination, and its ratio to the floor (the target is >= 0.8);
* latency p50/p95: from an instance's acknowledgement to the arrival of its last output;
* CPU per instance of the node process (``serve``: receive, send), of its worker processes (decode,
  outputs, database) and of their model processes (from /proc, start-up excluded), next to the floor's
  (its per-image time times the torch threads it keeps busy): where the time goes; and the non-model CPU
  per instance, everything but the model processes (the target is <= 40 ms at 512 px).

Usage::

    .venv/bin/python bench/node.py [--count 24] [--config config/node.toml] [--destination pynetdicom]

Synthetic data only. No assertions: this prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import Verification  # noqa: E402
from sqlalchemy import select  # noqa: E402

from gradcam.config import ModelConfig  # noqa: E402
from gradcam.models import build_model, load_model, place_batch, place_model, save_checkpoint  # noqa: E402
from gradcam.phantoms import generate_dataset  # noqa: E402
from gradcam.preprocess import load_image, to_model_input  # noqa: E402
from node.config import load_settings  # noqa: E402
from node.db import Instance, Job, JobStatus, Output, make_engine, session_factory  # noqa: E402
from node.ops.node_toml import toml_value  # noqa: E402
from node.send.association import OUTPUT_SOP_CLASSES  # noqa: E402

__all__ = ["main"]

STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- inputs ---------------------------------------------------------------------------------------------


def make_inputs(directory: Path, count: int, seed: int, size: int) -> tuple[list[Path], str]:
    """``count`` phantom DICOM files from the project's phantom generator."""
    generate_dataset(directory, count, seed, 0.5, "dicom", size=size)
    files = sorted(directory.rglob("*.dcm"))[:count]
    return files, f"gradcam.phantoms {size}x{size}"


def checkpoints_for(models: tuple[ModelConfig, ...], directory: Path) -> tuple[tuple[ModelConfig, ...], str]:
    """The committed checkpoints where they exist; seeded random weights for the others."""
    out, kinds = [], set()
    for i, m in enumerate(models):
        if m.checkpoint.is_file():
            out.append(m)
            kinds.add("committed")
            continue
        path = directory / f"{m.builder}.pt"
        torch.manual_seed(i)
        save_checkpoint(build_model(m), path, {"bench": True, "seed": i})
        out.append(
            ModelConfig(m.name, m.builder, path, m.target_layer, m.input_size, m.threshold, True, m.window)
        )
        kinds.add("seeded random")
    return tuple(out), " + ".join(sorted(kinds))


# --- floor ----------------------------------------------------------------------------------------------


def measure_floor(
    models: tuple[ModelConfig, ...], files: list[Path], batch_size: int, max_pixels: int, repeats: int = 3
) -> dict[str, float]:
    """Per-image forward time of each model at ``batch_size`` on the preprocessed inputs (seconds), in the
    memory layout the node's models run in."""
    images = [load_image(p, max_pixels) for p in files]
    per_image: dict[str, float] = {}
    for m in models:
        module = place_model(load_model(m).module, "cpu")
        batches = [
            place_batch(to_model_input(images[i : i + batch_size], m), "cpu")
            for i in range(0, len(images), batch_size)
        ]
        with torch.inference_mode():
            for x in batches[:2]:
                module(x)  # warm-up (allocations, lazy init)
            passes = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for x in batches:
                    module(x)
                passes.append((time.perf_counter() - t0) / len(images))
        # the fastest pass: other load on the machine only ever slows a pass down, so this is the floor
        per_image[m.name] = min(passes)
        del module
    return per_image


# --- destination ----------------------------------------------------------------------------------------


class Receiver:
    """Storage SCP (pynetdicom, in this process) that timestamps every instance it receives."""

    label = "destination (pynetdicom SCP in the bench)"

    def __init__(self, port: int) -> None:
        self.arrivals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="BENCHDEST")
        for sop in sorted(OUTPUT_SOP_CLASSES):
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on)]
        )
        self._cpu_start = 0.0

    def _on(self, event: evt.Event) -> int:
        now = time.time()
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.arrivals.setdefault(uid, []).append(now)
        return 0x0000

    def count(self) -> int:
        with self._lock:
            return len(self.arrivals)

    def mark(self) -> None:
        """Start counting CPU time here (of this whole process: the bench does nothing else meanwhile)."""
        self._cpu_start = time.process_time()

    def cpu(self) -> float:
        """CPU seconds since :meth:`mark`."""
        return time.process_time() - self._cpu_start

    def stop(self) -> None:
        self.server.shutdown()


class StorescpReceiver:
    """DCMTK's ``storescp`` writing every instance to a file of its own (``+uf``: a duplicate is a second
    file); an instance's arrival is its file's modification time (written before the response is sent).
    ``--fork``: one process per association, as the node's sender uses several at once."""

    label = "destination (DCMTK storescp)"

    def __init__(self, port: int, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.arrivals: dict[str, list[float]] = {}
        self.proc = subprocess.Popen(
            [str(STORESCP), "--fork", "-aet", "BENCHDEST", "+uf", "-od", str(directory), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(port, self.proc, 30, "BENCHDEST")
        self._cpu_start = 0.0

    def _cpu_now(self) -> float:
        """CPU seconds of storescp, its running children (one per association) and its ended ones."""
        return sum(cpu_seconds(self.proc.pid, ended_children=True).values())

    def mark(self) -> None:
        self._cpu_start = self._cpu_now()

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.directory))

    def cpu(self) -> float:
        return self._cpu_now() - self._cpu_start

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        for entry in os.scandir(self.directory):
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            self.arrivals.setdefault(str(ds.SOPInstanceUID), []).append(entry.stat().st_mtime)
        for times in self.arrivals.values():
            times.sort()


# --- node -----------------------------------------------------------------------------------------------


def write_config(
    path: Path, base_path: Path, models: tuple[ModelConfig, ...], port: int, dest_port: int, work: Path
) -> None:
    base = load_settings(base_path)
    lines = [
        "[node]",
        'ae_title = "GRADCAM"',
        'bind = "127.0.0.1"',
        f"port = {port}",
        f"storage_dir = {toml_value(work / 'spool')}",
        f"database_url = {toml_value('sqlite:///' + str(work / 'node.db'))}",
        "min_free_disk_mb = 0",
        "[worker]",
        f"batch_size = {base.worker.batch_size}",
        f"inference_threads = {base.worker.inference_threads}",
        f"processes = {base.worker.processes}",
        "max_attempts = 3",
        "retry_delay_s = 1",
        "[outbox]",
        "backoff_initial_s = 0.5",
        "backoff_max_s = 2.0",
        f"associations = {base.outbox.associations}",
        "[outputs]",
        f"kinds = {json.dumps(list(base.outputs.kinds))}",
        f"negative_maps = {'true' if base.outputs.negative_maps else 'false'}",
        "[http]",
        "enabled = false",  # the status page waits for requests only; no one asks during the bench
        "[preprocess]",
        f"max_pixels = {base.core.preprocess.max_pixels}",
        "[render]",
        f"max_side = {base.core.render.max_side}",
        f"opacity = {base.core.render.opacity}",
        f"colormap = {toml_value(base.core.render.colormap)}",
        "[routing]",
        'default_destination = "bench"',
        "[[destinations]]",
        'name = "bench"',
        'ae_title = "BENCHDEST"',
        'host = "127.0.0.1"',
        f"port = {dest_port}",
    ]
    for m in models:
        lines += [
            f"[models.{json.dumps(m.name)}]",
            f"builder = {toml_value(m.builder)}",
            f"checkpoint = {toml_value(m.checkpoint)}",
            f"target_layer = {toml_value(m.target_layer)}",
            f"input_size = {m.input_size}",
            f"threshold = {m.threshold}",
        ]
        if m.window is not None:
            lines.append(f"window = {{ center = {m.window.center}, width = {m.window.width} }}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def start_node(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--config", str(config), "serve"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], timeout: float, ae_title: str = "GRADCAM"
) -> None:
    """Wait until ``proc`` accepts an association on ``port`` as ``ae_title``; raise if it exits first."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{ae_title} exited with {proc.returncode} during start-up")
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.25)
    raise TimeoutError(f"{ae_title} not listening on {port} after {timeout:.0f} s")


def cpu_seconds(pid: int, ended_children: bool = False) -> dict[str, float]:
    """CPU time (user + system, seconds) of a process and of each of its children, by process name;
    with ``ended_children``, also of the root's children that have exited (and were waited for)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}

    def one(p: int) -> None:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            name = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return
        fields = stat.rsplit(")", 1)[1].split()
        if any(b"multiprocessing" in part for part in name):
            label = "models process"
        elif b"work" in name:
            label = "worker process"  # gradcam-node work, started by serve
        else:
            label = "node process"
        ticks = int(fields[11]) + int(fields[12])
        if ended_children and p == pid:
            ticks += int(fields[13]) + int(fields[14])
        out[label] = out.get(label, 0.0) + ticks / tick
        for task in Path(f"/proc/{p}/task").iterdir():
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            for c in children:
                one(int(c))

    one(pid)
    return out


# --- run ------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    acks: dict[str, float]  # source SOP UID -> acknowledgement time (epoch s)
    done: dict[str, float]  # source SOP UID -> arrival of its last output (epoch s)
    failed: int
    duplicates: int


def collect(db_url: str, receiver: Receiver | StorescpReceiver) -> Outcome:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.received_at, Job.id, Job.status).join(
                    Job, Job.instance_id == Instance.id
                )
            ).all()
            outputs = s.execute(select(Output.job_id, Output.sop_instance_uid)).all()
    finally:
        engine.dispose()
    by_job: dict[int, list[str]] = {}
    for job_id, uid in outputs:
        by_job.setdefault(job_id, []).append(uid)
    acks, done, failed = {}, {}, 0
    for uid, received_at, job_id, status in rows:
        acks[uid] = received_at.timestamp()
        failed += status != JobStatus.DONE
        arrivals = [receiver.arrivals.get(o) for o in by_job.get(job_id, [])]
        if arrivals and all(arrivals):
            done[uid] = max(a[0] for a in arrivals)
    dups = sum(len(v) - 1 for v in receiver.arrivals.values())
    return Outcome(acks, done, failed, dups)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=24, help="phantom instances to send (default 24)")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "node.toml", help="models and batch size")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--size", type=int, default=512, help="side of the phantoms (pixels)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for all results")
    p.add_argument("--workdir", type=Path, help="keep everything (inputs, spool, database, node.log) here")
    p.add_argument(
        "--destination",
        choices=("storescp", "pynetdicom"),
        default="storescp",
        help="DCMTK storescp (default) or a pynetdicom SCP in this process",
    )
    args = p.parse_args(argv)
    for tool in (STORESCU, STORESCP):
        if not os.access(tool, os.X_OK):
            print(f"{tool} is not installed (DCMTK)", file=sys.stderr)
            return 2
    base = load_settings(args.config)
    batch = base.worker.batch_size
    with tempfile.TemporaryDirectory(prefix="gradcam-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models, weights = checkpoints_for(base.core.enabled_models, work / "checkpoints")
        files, source = make_inputs(work / "inputs", args.count, args.seed, args.size)
        print(
            f"inputs: {len(files)} ({source}); models: {', '.join(m.name for m in models)} "
            f"({weights} weights); "
            f"batch size {batch}; torch threads {torch.get_num_threads()} (floor), "
            f"{base.worker.threads()} (each worker's model process); "
            f"{base.worker.processes} worker process(es)",
            flush=True,
        )
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        before = measure_floor(models, files, batch, base.core.preprocess.max_pixels)

        port, dest_port = free_port(), free_port()
        receiver: Receiver | StorescpReceiver = (
            StorescpReceiver(dest_port, work / "received")
            if args.destination == "storescp"
            else Receiver(dest_port)
        )
        config = work / "bench.toml"
        write_config(config, args.config, models, port, dest_port, work)
        proc = start_node(config, work / "node.log")
        try:
            wait_listening(port, proc, 300)
            cpu_start = cpu_seconds(proc.pid)  # after start-up (imports, loading the models)
            receiver.mark()
            expected = len(files) * (len(models) + 1)
            sent = subprocess.run(
                [str(STORESCU), "-aet", "BENCH", "-aec", "GRADCAM", "127.0.0.1", str(port), *map(str, files)],
                capture_output=True,
                text=True,
            )
            if sent.returncode != 0:
                print(f"storescu failed ({sent.returncode}): {sent.stderr.strip()}", file=sys.stderr)
            deadline = time.monotonic() + args.timeout
            while receiver.count() < expected and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            cpu_end = cpu_seconds(proc.pid)
            cpu_end[receiver.label] = receiver.cpu()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            receiver.stop()
        # The floor again, after the run: other load on the machine only slows passes down, so the
        # faster of the two is the better estimate of the floor (and the stricter one for the ratio).
        after = measure_floor(models, files, batch, base.core.preprocess.max_pixels)
        per_image = {name: min(before[name], after[name]) for name in before}
        floor = 1.0 / sum(per_image.values())
        print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
        outcome = collect(f"sqlite:///{work / 'node.db'}", receiver)
        if outcome.failed or len(outcome.done) < len(files):
            print((work / "node.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        cpu = {k: cpu_end.get(k, 0.0) - cpu_start.get(k, 0.0) for k in cpu_end}
        report(per_image, floor, outcome, len(files), cpu)
    return 0


def report(per_image: dict[str, float], floor: float, o: Outcome, n: int, cpu: dict[str, float]) -> None:
    print()
    print(f"{'model':<20}{'forward ms/image':>18}")
    for name, t in per_image.items():
        print(f"{name:<20}{t * 1000:>18.1f}")
    print()
    rows: list[tuple[str, str]] = [
        ("instances sent", str(n)),
        ("results complete", str(len(o.done))),
        ("jobs not done", str(o.failed)),
        ("duplicate deliveries", str(o.duplicates)),
        ("floor (forward only)", f"{floor:.2f} inst/s"),
    ]
    if o.done:
        start = min(o.acks.values())
        span = max(o.done.values()) - start
        throughput = len(o.done) / span if span > 0 else float("nan")
        lat = np.array([o.done[u] - o.acks[u] for u in o.done])
        rows += [
            ("throughput", f"{throughput:.2f} inst/s"),
            ("throughput / floor", f"{throughput / floor:.2f} (target >= 0.70)"),
            ("latency p50", f"{np.percentile(lat, 50):.2f} s"),
            ("latency p95", f"{np.percentile(lat, 95):.2f} s"),
        ]
    threads = torch.get_num_threads()
    rows.append(("floor, CPU per instance", f"{threads * 1000 / floor:.0f} ms ({threads} threads busy)"))
    for name, seconds in sorted(cpu.items()):
        rows.append((f"{name}, CPU per instance", f"{seconds * 1000 / n:.0f} ms"))
    outside = sum(s for name, s in cpu.items() if name in ("node process", "worker process"))
    rows.append(
        ("non-model CPU per instance", f"{outside * 1000 / n:.0f} ms (serve + workers; target <= 40)")
    )
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k:<{width}}{v}")


if __name__ == "__main__":
    sys.exit(main())
