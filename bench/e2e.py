"""End-to-end benchmark through Orthanc: storescu -> Orthanc -> Lua routing -> node -> Orthanc.

Starts Debian's Orthanc (the project's ``config/orthanc`` files, free loopback ports, temporary storage) and
the node (``gradcam-node serve`` with the given configuration's models, temporary spool and database; the
committed checkpoints where they exist, else seeded random weights of the same architectures). Sends N
synthetic phantom images to Orthanc with DCMTK's ``/usr/bin/storescu``, one association per image as a
modality does, and polls Orthanc's REST API until each image's study holds all its results. Prints, against
the floor measured in the same run exactly as ``bench/node.py`` does (the models' forward passes on the
preprocessed images at the worker's batch size, nothing else):

* latency p50/p95 per image: from Orthanc acknowledging the image (storescu's C-STORE response) to Orthanc
  holding every result for it (the SR and every object it lists); ratio to the floor's per-image time;
* throughput: images per second from the first acknowledgement to the last complete study; ratio to the
  floor's rate.

Usage::

    .venv/bin/python bench/e2e.py [--count 12] [--config config/node.toml]

Synthetic data only. No assertions: this prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402
import torch  # noqa: E402

from node.config import load_settings  # noqa: E402
from node.ops.node_toml import derived_node_config  # noqa: E402
from node.ops.orthanc import ORTHANC_BINARY, LocalOrthanc, OrthancClient  # noqa: E402
from node.ops.peers import STORESCU, NodeProcess, PeerError, free_port  # noqa: E402

__all__ = ["main"]

POLL_S = 0.1


def _bench_node() -> ModuleType:
    """``bench/node.py`` (its inputs, checkpoints and floor), loaded by path: ``node`` is our package."""
    spec = importlib.util.spec_from_file_location("bench_node", Path(__file__).with_name("node.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def send_one(path: Path, port: int, called_aet: str) -> float:
    """C-STORE one file with storescu; returns the time (epoch s) Orthanc acknowledged it."""
    cmd = [str(STORESCU), "-aet", "STORESCU", "-aec", called_aet, "127.0.0.1", str(port), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise PeerError(f"storescu failed on {path.name}: {done.stderr.strip()[-500:]}")
    return time.time()


def wait_complete(client: OrthancClient, acks: dict[str, float], timeout: float) -> dict[str, float]:
    """Study UID -> time (epoch s) Orthanc first held the node's results for it (its SR and every object the
    SR lists, :meth:`OrthancClient.holds_results`, as the demo checks); polls the REST API."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(acks) and time.monotonic() < deadline:
        for study in acks:
            if study not in done and client.holds_results(study):
                done[study] = time.time()
        time.sleep(POLL_S)
    return done


def run(args: argparse.Namespace, work: Path) -> int:
    bench = _bench_node()
    base = load_settings(args.config)
    batch = base.worker.batch_size
    models, weights = bench.checkpoints_for(base.core.enabled_models, work / "checkpoints")
    files, source = bench.make_inputs(work / "inputs", args.count, args.seed, args.size)
    print(
        f"inputs: {len(files)} ({source}); models: {', '.join(m.name for m in models)} ({weights} weights); "
        f"batch size {batch}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    per_image = bench.measure_floor(models, files, batch, base.core.preprocess.max_pixels)
    floor_s = sum(per_image.values())  # forward-only seconds per image, all models

    node_port, dicom_port, http_port = free_port(), free_port(), free_port()
    config = derived_node_config(
        args.config,
        work / "node.toml",
        {
            "node": {
                "port": node_port,
                "bind": "127.0.0.1",
                "allowed_calling_aets": [],
                "storage_dir": str(work / "spool"),
                "database_url": f"sqlite:///{work / 'node.db'}",
                "min_free_disk_mb": 0,
            },
            "outbox": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0},
            "routing": {"default_destination": "orthanc"},
            "destinations": [
                {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}
            ],
            "models": {m.name: {"checkpoint": str(m.checkpoint)} for m in models},
        },
    )
    orthanc = LocalOrthanc(work / "orthanc", dicom_port=dicom_port, http_port=http_port, node_port=node_port)
    node = NodeProcess(config, work / "node.log", node_port, base.node.ae_title)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    studies = len({str(h.StudyInstanceUID) for h in headers})
    try:
        orthanc.start()
        node.start(calling_ae=orthanc.aet)
        acks: dict[str, float] = {}
        for path, h in zip(files, headers, strict=True):
            acks[str(h.StudyInstanceUID)] = send_one(path, dicom_port, orthanc.aet)  # last image of a study
        done = wait_complete(orthanc.client, acks, args.timeout)
    finally:
        node.stop()
        orthanc.stop()
    if len(done) < studies:
        print(node.log_tail(4000), file=sys.stderr)
    report(per_image, floor_s, acks, done, len(files), studies)
    return 0 if len(done) == studies else 1


def report(
    per_image: dict[str, float],
    floor_s: float,
    acks: dict[str, float],
    done: dict[str, float],
    n: int,
    studies: int,
) -> None:
    print()
    print(f"{'model':<20}{'forward ms/image':>18}")
    for name, t in per_image.items():
        print(f"{name:<20}{t * 1000:>18.1f}")
    rows = [
        ("images sent", str(n)),
        ("studies complete in Orthanc", f"{len(done)}/{studies}"),
        ("floor (forward only)", f"{floor_s * 1000:.1f} ms/image = {1 / floor_s:.2f} images/s"),
    ]
    if done:
        lat = np.array([done[s] - acks[s] for s in done])
        span = max(done.values()) - min(acks.values())
        throughput = len(done) / span if span > 0 else float("nan")
        p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
        rows += [
            ("latency p50", f"{p50:.2f} s  ({p50 / floor_s:.1f} x floor)"),
            ("latency p95", f"{p95:.2f} s  ({p95 / floor_s:.1f} x floor)"),
            ("throughput", f"{throughput:.2f} images/s  ({throughput * floor_s:.2f} of floor)"),
        ]
    print()
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k:<{width}}{v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=12, help="phantom images to send (default 12)")
    p.add_argument("--config", type=Path, default=ROOT / "config" / "node.toml", help="models and batch size")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--size", type=int, default=1024, help="side of the fallback phantoms (pixels)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for all results")
    p.add_argument("--workdir", type=Path, help="keep inputs, Orthanc, spool, database and logs here")
    args = p.parse_args(argv)
    # a SIGTERM (timeout, a CI job cancelled) stops Orthanc and the node through run()'s clean-up too
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    for tool in (ORTHANC_BINARY, STORESCU):
        if not os.access(tool, os.X_OK):
            print(f"{tool} is not installed (apt-get install orthanc dcmtk)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="gradcam-e2e-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            return run(args, work)
        except PeerError as exc:  # Orthanc's own errors too
            print(f"bench/e2e.py: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
