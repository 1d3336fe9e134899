"""``gradcam-node demo``: Orthanc and the node on this machine, a few phantom studies through both.

The demo starts Debian's Orthanc (:mod:`node.ops.orthanc`) and the node (``gradcam-node serve``, with a
configuration of its own derived from the user's), sends a few synthetic phantom studies to Orthanc with
DCMTK's ``storescu``, waits until Orthanc holds every result and prints them. Synthetic data only; every
output is an AI research output, not for diagnostic use.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcam.config import DEFAULT_CONFIG, REPO_ROOT
from node.ops.node_toml import derived_node_config
from node.ops.orthanc import (
    ORTHANC_BINARY,
    ORTHANC_LUA,
    SR_CLASS_PREFIX,
    LocalOrthanc,
    OrthancClient,
    OrthancError,
    load_orthanc_config,
    lua_setting,
)
from node.ops.peers import STORESCU, NodeProcess, compress, free_port, port_is_free, storescu

if TYPE_CHECKING:
    from node.config import Settings

__all__ = ["DemoStudy", "make_demo_studies", "node_command", "demo_state_dir", "run_demo"]

# --- the demo -----------------------------------------------------------------------------------------------

DEMO_DIR = REPO_ROOT / "var" / "demo"
DEMO_SEED = 2024
DEMO_SIZE = 512
DEMO_TIMEOUT_S = 900.0
# (phantom with a consolidation?, modality, transfer syntax): both modalities, positives and negatives,
# uncompressed and compressed as modalities send them.
DEMO_CASES: tuple[tuple[bool, str, str | None], ...] = (
    (True, "CR", None),
    (False, "DX", "jpeg-ls"),
    (True, "DX", "jpeg-lossless"),
    (False, "CR", None),
)
EXPLORER_PATH = "/app/explorer.html"


@dataclass(frozen=True)
class DemoStudy:
    """One phantom study sent by the demo."""

    path: Path
    positive: bool
    modality: str
    encoding: str
    study_uid: str
    patient_id: str


def make_demo_studies(folder: Path) -> list[DemoStudy]:
    """One single-image phantom study per :data:`DEMO_CASES` entry (synthetic data only)."""
    from pydicom.uid import generate_uid

    from gradcam.phantom_dicom import phantom_dataset, write_dicom
    from gradcam.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    studies = []
    for i, (positive, modality, encoding) in enumerate(DEMO_CASES):
        phantom = make_phantom(DEMO_SEED, i, positive, DEMO_SIZE)
        ds = phantom_dataset(phantom, DEMO_SEED, i, modality=modality, study_uid=generate_uid())
        # new UIDs each run: the node records instances by UID and does not analyse one it already has
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"study{i + 1}-{modality}-{'positive' if positive else 'negative'}.dcm"
        write_dicom(ds, path)
        used = encoding if encoding is not None and compress(path, encoding) else "uncompressed"
        studies.append(DemoStudy(path, positive, modality, used, str(ds.StudyInstanceUID), str(ds.PatientID)))
    return studies


def demo_state_dir(workdir: Path) -> Path:
    """The demo node's own spool and database: ``workdir/node/`` (emptied at each demo start)."""
    return workdir / "node"


def _shown(path: Path) -> str:
    """A path as a user types it in the current directory: relative when below it, else absolute."""
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel) if len(rel.parts) > 1 else f"./{rel}"  # "./x": a bare name would be looked up on PATH


def node_command(*args: str | Path) -> str:
    """The shell command line that runs ``gradcam-node ARGS`` with this interpreter's installation.

    The ``gradcam-node`` script next to the running interpreter (``.venv/bin/gradcam-node``; it need not be
    on PATH), else ``python -m node.cli`` with this interpreter.
    """
    script = Path(sys.executable).parent / "gradcam-node"
    if os.access(script, os.X_OK):
        argv = [_shown(script)]
    else:
        argv = [_shown(Path(sys.executable)), "-m", "node.cli"]
    return shlex.join(argv + [_shown(a) if isinstance(a, Path) else a for a in args])


def _demo_ports(settings: Settings, workdir: Path) -> tuple[Path, int, int, int]:
    """The demo node's configuration and port, Orthanc's DICOM and HTTP ports.

    The node's configuration is always derived, as ``workdir/node.toml``: its spool and SQLite database are
    the demo's own (:func:`demo_state_dir`), so results that ``make run``'s node still has to deliver never
    go to the demo's Orthanc, and the demo leaves nothing in that node's database. The ports are the
    configured ones (node port, the default destination's port, orthanc.json's HttpPort) when free,
    otherwise free ones, announced.
    """
    base = load_orthanc_config()
    modality = base["DicomModalities"][lua_setting(ORTHANC_LUA.read_text(encoding="utf-8"), "NODE_MODALITY")]
    dest = settings.destination(settings.default_destination) if settings.default_destination else None
    if dest is None or dest.host not in ("127.0.0.1", "localhost"):
        raise OrthancError("the demo needs [routing] default_destination naming a destination on 127.0.0.1")
    if (dest.ae_title, modality["AET"]) != (base["DicomAet"], settings.node.ae_title):
        raise OrthancError(
            f"AE titles disagree: node destination {dest.ae_title!r} vs Orthanc DicomAet "
            f"{base['DicomAet']!r}, node ae_title {settings.node.ae_title!r} vs orthanc.json node AET "
            f"{modality['AET']!r}"
        )
    node_port, dicom_port, http_port = settings.node.port, dest.port, int(base["HttpPort"])
    state = demo_state_dir(workdir)
    db_url = f"sqlite:///{state / 'gradcam-node.db'}"
    overrides: dict[str, Any] = {"node": {"storage_dir": str(state / "spool"), "database_url": db_url}}
    if not port_is_free(node_port):
        node_port = free_port()
        print(f"port {settings.node.port} (the node) is in use: the demo node listens on {node_port}")
        overrides["node"]["port"] = node_port
    if not port_is_free(dicom_port):
        dicom_port = free_port()
        print(f"port {dest.port} (Orthanc DICOM) is in use: the demo Orthanc listens on {dicom_port}")
        overrides["destinations"] = [
            {
                "name": d.name,
                "ae_title": d.ae_title,
                "host": d.host,
                "port": dicom_port if d == dest else d.port,
            }
            for d in settings.destinations
        ]
    if not port_is_free(http_port):
        http_port = free_port()
        print(f"port {base['HttpPort']} (Orthanc HTTP) is in use: the demo Orthanc answers on {http_port}")
    if settings.http.enabled and not port_is_free(settings.http.port, settings.http.bind):
        status_port = free_port()
        print(f"port {settings.http.port} (the node's status page) is in use: the demo's is on {status_port}")
        overrides["http"] = {"port": status_port}
    config = derived_node_config(settings.path, workdir / "node.toml", overrides)
    print(f"demo node configuration: {_shown(config)} (its own spool and database in {_shown(state)}/)")
    return config, node_port, dicom_port, http_port


def _announce_status_page(config: Path) -> None:
    from node.config import load_settings

    http = load_settings(config).http
    if http.enabled:
        host = "127.0.0.1" if http.bind in ("0.0.0.0", "") else http.bind
        print(f"the node's status page: http://{host}:{http.port}/", flush=True)


_SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _wait_for_results(
    client: OrthancClient,
    studies: list[DemoStudy],
    timeout: float,
    hopeless: Callable[[int], str | None] = lambda _done: None,
) -> tuple[int, str | None]:
    """Poll Orthanc until every study holds the node's SR and all it references, or until ``hopeless``
    (given how many do) says why the others never will; returns how many do, and that reason."""
    deadline = time.monotonic() + timeout
    done: set[str] = set()
    while time.monotonic() < deadline:
        for s in studies:
            if s.study_uid not in done and client.holds_results(s.study_uid):
                done.add(s.study_uid)
                print(f"  results for {s.path.name} are in Orthanc ({len(done)}/{len(studies)})", flush=True)
        if len(done) == len(studies):
            break
        reason = hopeless(len(done))
        if reason is not None:
            return len(done), reason
        time.sleep(1.0)
    return len(done), None


def _no_more_results(node: NodeProcess, settings: Settings, studies: int) -> Callable[[int], str | None]:
    """Why the studies without results never get any, from the demo node's process and database: it
    exited, or every study either has its results or was refused, rejected, skipped or failed by it."""
    from sqlalchemy import func, select

    from node.db import Association, AssociationStatus, Job, JobStatus, make_engine, session_factory

    sessions = session_factory(make_engine(settings.database_url))  # one engine for every poll

    def check(done: int) -> str | None:
        if not node.running:
            return f"the node exited; the end of its log ({_shown(node.log_path)}):\n{node.log_tail(1500)}"
        with sessions() as s:
            refused = s.scalar(select(func.coalesce(func.sum(Association.n_failed), 0)))
            rejected = s.scalar(select(func.count()).where(Association.status == AssociationStatus.REJECTED))
            ended = dict(
                s.execute(
                    select(Job.status, func.count())
                    .where(Job.status.in_([JobStatus.FAILED, JobStatus.SKIPPED]))
                    .group_by(Job.status)
                ).all()
            )
        failed, skipped = ended.get(JobStatus.FAILED, 0), ended.get(JobStatus.SKIPPED, 0)
        lost = int(refused) + int(rejected) + failed + skipped
        if lost == 0 or done + lost < studies:
            return None
        what = ", ".join(
            f"{n} {label}"
            for n, label in (
                (refused, "instance(s) refused"),
                (rejected, "association(s) rejected"),
                (failed, "job(s) failed"),
                (skipped, "job(s) skipped"),
            )
            if n
        )
        return (
            f"{studies - done} of {studies} studies will get no results: the node reports {what}. "
            f"Why: {node_command('--config', node.config, 'jobs')} and {_shown(node.log_path)}"
        )

    return check


def _summary(client: OrthancClient, study: DemoStudy) -> list[str]:
    """Lines describing a study's results, from the SR that Orthanc holds."""
    from io import BytesIO

    import pydicom

    from node.outputs import read_sr_findings

    truth = "consolidation" if study.positive else "no consolidation"
    lines = [f"{study.path.name}: {study.modality}, {study.encoding}, phantom truth: {truth}"]
    instances = client.study_instances(study.study_uid)
    srs = [i for i in instances if i["SOPClassUID"].startswith(SR_CLASS_PREFIX)]
    scs = [i for i in instances if i["SOPClassUID"] == _SC_CLASS]
    segs = [i for i in instances if i["SOPClassUID"] == _SEG_CLASS]
    if not srs:
        return [*lines, "  no SR in Orthanc yet"]
    findings = read_sr_findings(pydicom.dcmread(BytesIO(client.instance_file(srs[0]["ID"]))))
    for f in findings.models:
        decision = "positive" if f.positive else "negative"
        lines.append(f"  {f.model:<18} p={f.probability:.3f}  threshold {f.threshold:.3f}  {decision}")
    lines.append(
        f"  consensus: {'positive' if findings.consensus else 'negative'}; in the study: {len(scs)} "
        f"picture(s) (summary + a heatmap per positive model), {len(segs)} heatmap overlay(s), {len(srs)} SR"
    )
    return lines


def run_demo(settings: Settings, *, keep_running: bool = True, workdir: Path = DEMO_DIR) -> int:
    """Orthanc + node on this machine, phantom studies through both, results printed.

    Keeps both running until Ctrl-C when ``keep_running`` (``gradcam-node demo``), else stops them after the
    summary (``gradcam-node demo --exit``). Everything the demo writes is under ``workdir``: Orthanc's and
    the node's state start empty at each run. Returns 0 when every study got its results.
    """
    for tool in (ORTHANC_BINARY, STORESCU):
        if not os.access(tool, os.X_OK):
            raise OrthancError(f"{tool} is not installed (Debian: apt-get install orthanc dcmtk)")
    # SIGTERM too ends the demo through the same clean stop as Ctrl-C (the children run in their own
    # sessions, so nobody else stops them); SIGINT explicitly, since a background start may ignore it.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_demo(settings, keep_running, Path(workdir))
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _run_demo(settings: Settings, keep_running: bool, workdir: Path) -> int:
    # the demo's own Orthanc storage and node state start empty: nothing an earlier run left is resent
    shutil.rmtree(workdir / "orthanc", ignore_errors=True)
    shutil.rmtree(demo_state_dir(workdir), ignore_errors=True)
    config, node_port, dicom_port, http_port = _demo_ports(settings, workdir)
    orthanc = LocalOrthanc(
        workdir / "orthanc", dicom_port=dicom_port, http_port=http_port, node_port=node_port
    )
    node = NodeProcess(config, workdir / "node.log", node_port, settings.node.ae_title)
    try:
        print(
            f"starting Orthanc (DICOM {orthanc.aet}@127.0.0.1:{dicom_port}, HTTP {orthanc.url}) ...",
            flush=True,
        )
        orthanc.start()
        print(
            f"starting the node ({settings.node.ae_title}@127.0.0.1:{node_port}; loading models) ...",
            flush=True,
        )
        node.start(calling_ae=orthanc.aet)
        _announce_status_page(config)
        studies = make_demo_studies(workdir / "inputs")
        print(f"sending {len(studies)} synthetic phantom studies to Orthanc with {STORESCU} ...", flush=True)
        storescu([s.path for s in studies], dicom_port, orthanc.aet)
        from node.config import load_settings

        hopeless = _no_more_results(node, load_settings(config), len(studies))
        complete, reason = _wait_for_results(orthanc.client, studies, DEMO_TIMEOUT_S, hopeless)
        print()
        for s in studies:
            print("\n".join(_summary(orthanc.client, s)))
        if reason is not None:
            print(reason)
        elif complete < len(studies):
            print(f"only {complete} of {len(studies)} studies got results within {DEMO_TIMEOUT_S:.0f} s")
        if not keep_running:
            print("\nstopping the node and Orthanc (--exit) ...", flush=True)
            node.stop()
            orthanc.stop()
        print("\nAI research output - not for diagnostic use.")
        if keep_running:
            print(f"Look at the studies in Orthanc Explorer: {orthanc.url}{EXPLORER_PATH}")
        else:
            default = settings.path.resolve() == DEFAULT_CONFIG.resolve()
            again = node_command(*(("demo",) if default else ("--config", settings.path, "demo")))
            print(
                f"Checked in Orthanc: {complete} of {len(studies)} studies hold the node's results (above, "
                "read back from its SRs).\n"
                "Orthanc and the node are stopped now (--exit). To browse the studies in Orthanc Explorer,\n"
                f"run the demo without --exit, `make demo` or `{again}`: both then keep running until Ctrl-C."
            )
        print(
            f"What the node did: {node_command('--config', config, 'jobs')}\n"
            f"Logs: {_shown(node.log_path)}, {_shown(orthanc.log_path)}"
        )
        if keep_running:
            print("Orthanc and the node keep running; press Ctrl-C to stop both.", flush=True)
            while orthanc.running and node.running:
                time.sleep(1.0)
            if not (orthanc.running and node.running):
                print("Orthanc or the node stopped unexpectedly; see the logs above", file=sys.stderr)
                return 1
        return 0 if complete == len(studies) else 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        # a second Ctrl-C must not cut the stop short and leave the children running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        node.stop()
        orthanc.stop()
