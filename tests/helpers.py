"""Helpers shared by the node's tests: small test checkpoints, test configuration files, DICOM inputs.

Import with ``import helpers`` (``tests/integration/conftest.py`` puts ``tests/`` on ``sys.path``) or
``from tests import helpers``. Synthetic data only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.ops.node_toml import toml_value

__all__ = [
    "TEST_MODELS",
    "StoreScp",
    "CountingScp",
    "DX_SOP_CLASS",
    "CR_SOP_CLASS",
    "CT_SOP_CLASS",
    "SR_SOP_CLASS",
    "make_test_checkpoints",
    "write_test_config",
    "image_dataset",
    "sr_dataset",
    "write_dataset",
    "DCMTK_DIR",
    "RunningNode",
    "free_port",
    "dcmtk",
    "run_tool",
    "wait_until",
    "checkpoints_for",
    "start_node",
]

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR

# name -> (torchvision builder, Grad-CAM target layer), as in config/node.toml.
TEST_MODELS: dict[str, tuple[str, str]] = {
    "ResNet18": ("resnet18", "layer4"),
    "EfficientNet-B0": ("efficientnet_b0", "features"),
    "DenseNet121": ("densenet121", "features"),
}


def make_test_checkpoints(
    directory: Path, names: Iterable[str] = ("ResNet18",), seed: int = 0, input_size: int = 64
) -> dict[str, Path]:
    """Seeded random checkpoints (``{"model_state_dict", "meta"}``) for models of :data:`TEST_MODELS`.

    Returns ``{model name: checkpoint path}``. Uses ``gradcam.models.build_model``/``save_checkpoint``
    (``weights=None``: nothing is downloaded).
    """
    import torch

    from gradcam.config import ModelConfig
    from gradcam.models import build_model, save_checkpoint

    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for i, name in enumerate(names):
        builder, layer = TEST_MODELS[name]
        path = directory / f"{builder}.pt"
        if not path.exists():
            torch.manual_seed(seed + i)
            cfg = ModelConfig(name, builder, path, layer, input_size=input_size, threshold=0.5)
            save_checkpoint(
                build_model(cfg), path, {"test": True, "seed": seed + i, "input_size": input_size}
            )
        out[name] = path
    return out


def _table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_test_config(
    path: Path,
    *,
    checkpoints: Mapping[str, Path],
    port: int,
    storage_dir: Path,
    database_url: str,
    input_size: int = 64,
    thresholds: Mapping[str, float] | None = None,
    destinations: Iterable[Mapping[str, Any]] = (),
    default_destination: str | None = None,
    **sections: Mapping[str, Any],
) -> Path:
    """Write a node configuration for tests and return its path.

    Parameters
    ----------
    checkpoints
        ``{model name: checkpoint}`` from :func:`make_test_checkpoints`; each becomes a ``[models.NAME]``.
    port, storage_dir, database_url
        The ``[node]`` keys every test must set (free port, temporary folders).
    thresholds
        Per-model thresholds (default 0.5).
    destinations
        ``[[destinations]]`` tables: dicts with name, ae_title, host, port.
    default_destination
        ``[routing] default_destination``.
    **sections
        Extra keys per table, e.g. ``node={"allowed_calling_aets": ["STORESCU"]}``,
        ``worker={"batch_size": 1}``, ``outbox={"backoff_initial_s": 0.1}``, ``render={"max_side": 256}``;
        ``http`` defaults to ``{"enabled": False}``.
    """
    node = {
        "ae_title": "GRADCAM",
        "bind": "127.0.0.1",
        "port": port,
        "storage_dir": str(storage_dir),
        "database_url": database_url,
        "min_free_disk_mb": 0,
        "acse_timeout_s": 10,
        "dimse_timeout_s": 30,
        "network_timeout_s": 30,
    }
    node.update(sections.pop("node", {}))
    # the status page is off unless a test asks for it (http={"port": free_port()}): nodes of the
    # tests run side by side, and the default port 8080 would be taken by the first
    sections.setdefault("http", {"enabled": False})
    # one worker process unless a test asks for more: tests are about behaviour, and run side by side
    sections["worker"] = {"processes": 1, **sections.get("worker", {})}
    parts = [_table("node", node)]
    for name, values in sections.items():
        parts.append(_table(name, values))
    if default_destination is not None:
        parts.append(_table("routing", {"default_destination": default_destination}))
    for dest in destinations:
        parts.append(
            "[[destinations]]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in dest.items()) + "\n"
        )
    for name, ckpt in checkpoints.items():
        builder, layer = TEST_MODELS[name]
        model = {
            "builder": builder,
            "checkpoint": str(ckpt),
            "target_layer": layer,
            "input_size": input_size,
            "threshold": (thresholds or {}).get(name, 0.5),
            "enabled": True,
        }
        parts.append(_table(f'models."{name}"', model))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def image_dataset(
    *,
    modality: str = "DX",
    sop_class_uid: str | None = None,
    size: int = 64,
    seed: int = 0,
    bits_stored: int = 12,
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    sop_uid: str | None = None,
    photometric: str = "MONOCHROME2",
    manufacturer: str = "SYNTHETIC",
) -> Dataset:
    """A small synthetic greyscale image (a smooth chest-like gradient with noise), uncompressed.

    For CR/DX/CT; ``view``/``body_part`` None leaves the element out. Synthetic data only.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    lungs = np.exp(-(((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.05)) + np.exp(
        -(((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.05)
    )
    img = (1.0 - 0.6 * lungs) * (2**bits_stored - 1) * 0.8 + rng.normal(0, 8, (size, size))
    pixels = np.clip(img, 0, 2**bits_stored - 1).astype(np.uint16)

    sop_class = sop_class_uid or {"DX": DX_SOP_CLASS, "CR": CR_SOP_CLASS, "CT": CT_SOP_CLASS}[modality]
    ds = _base(sop_class, modality, study_uid, sop_uid, manufacturer)
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    return ds


def sr_dataset(*, study_uid: str | None = None, sop_uid: str | None = None) -> Dataset:
    """A minimal Basic Text SR (no pixel data), as a PACS might route along with a study."""
    ds = _base(SR_SOP_CLASS, "SR", study_uid, sop_uid, "SYNTHETIC")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "11528-7"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Radiology Report"
    ds.ConceptNameCodeSequence = [concept]
    return ds


def _base(
    sop_class: str, modality: str, study_uid: str | None, sop_uid: str | None, manufacturer: str
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "PHANTOM^TEST"
    ds.PatientID = "PHANTOM-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (explicit VR little endian) and return ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --- running the node and DCMTK in tests ------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
DCMTK_DIR = Path("/usr/bin")  # absolute: pynetdicom installs storescu/echoscu scripts into the venv
START_TIMEOUT_S = float(os.environ.get("GRADCAM_TEST_START_TIMEOUT", "180"))  # CPU shared with training
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> Path:
    """Absolute path of a DCMTK tool (``storescu``, ``dcmcjpeg``...); skips the test if it is absent."""
    path = DCMTK_DIR / tool
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is not installed (apt-get install dcmtk)")
    return path


def run_tool(args: Iterable[str | os.PathLike[str]], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command line tool; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy, else fail the test naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


_CHECKPOINT_CACHE: dict[tuple[Path, tuple[str, ...]], dict[str, Path]] = {}


# the node's output classes: Secondary Capture, Comprehensive 3D SR, Segmentation
OUTPUT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.66.4",
)


class StoreScp:
    """DCMTK storescp in its own folder: unique file names, so every delivery is a separate file."""

    def __init__(self, directory: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.dir = directory
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[Path, tuple[str, str]] = {}

    def start(self) -> None:
        (self.dir / "in").mkdir(parents=True, exist_ok=True)
        with open(self.dir / "storescp.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    dcmtk("storescp"),
                    "-aet",
                    self.ae_title,
                    "-od",
                    self.dir / "in",
                    "+xa",
                    "+uf",
                    "-fe",
                    ".dcm",
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until("storescp to listen", self._listening, 20)

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"storescp exited with {self.proc.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def log(self) -> str:
        return (self.dir / "storescp.log").read_text(errors="replace")

    def received(self) -> dict[str, list[Path]]:
        """SOP Instance UID -> files received with it (complete files only: storescp writes then closes)."""
        out: dict[str, list[Path]] = {}
        for path in sorted((self.dir / "in").glob("*.dcm")):
            if path not in self._seen:
                try:
                    ds = dcmread(path, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - still being written; read again next poll
                    continue
                self._seen[path] = (str(ds.SOPInstanceUID), str(ds.SOPClassUID))
            out.setdefault(self._seen[path][0], []).append(path)
        return out


class CountingScp:
    """Storage SCP that counts every delivery by SOP Instance UID."""

    def __init__(self, port: int, ae_title: str = "PACS", delay_s: float = 0.0) -> None:
        self.port = port
        self.ae_title = ae_title
        self.delay_s = delay_s  # each C-STORE takes this long: a slow PACS
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = None

    def start(self) -> None:
        from pydicom.uid import ImplicitVRLittleEndian
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.ae_title)
        for sop in OUTPUT_CLASSES:
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: Any) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.counts[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def snapshot(self) -> Counter[str]:
        """Deliveries so far, by SOP Instance UID."""
        with self._lock:
            return Counter(self.counts)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def checkpoints_for(root: Path, names: Iterable[str]) -> dict[str, Path]:
    """Test checkpoints for ``names`` (keys of :data:`TEST_MODELS`), made once per process under ``root``."""
    key = (root, tuple(names))
    if key not in _CHECKPOINT_CACHE:
        _CHECKPOINT_CACHE[key] = make_test_checkpoints(root / "-".join(key[1]), key[1])
    return _CHECKPOINT_CACHE[key]


@dataclass
class RunningNode:
    """A ``gradcam-node serve`` subprocess and where it keeps things."""

    proc: subprocess.Popen[bytes]
    port: int
    ae_title: str
    config_path: Path
    storage_dir: Path
    database_url: str
    log_path: Path
    probe_ae: str = "PROBE"  # calling AE of readiness C-ECHOs (an allowed one when the node restricts)
    _engines: list[Any] = field(default_factory=list)

    def log_text(self) -> str:
        """Everything the node wrote to stderr/stdout so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def sessions(self) -> Any:
        """A session factory on the node's database (the test's own engine, disposed by :meth:`stop`)."""
        from node.db import make_engine, session_factory

        if not self._engines:
            self._engines.append(make_engine(self.database_url))
        return session_factory(self._engines[0])

    def echo(self, calling_ae: str | None = None, timeout: float = 5) -> bool:
        """True if the node answers C-ECHO (pynetdicom as SCU, calling AE :attr:`probe_ae` by default)."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=calling_ae or self.probe_ae)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.Status == 0
        finally:
            assoc.release()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Poll C-ECHO until it succeeds; fail with the log if the process exits or the deadline passes."""
        deadline = time.monotonic() + timeout
        quiet = logging.getLogger("pynetdicom")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # "connection refused" while the node starts is expected
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"node exited with {self.proc.returncode} during start:\n{self.log_text()}")
                try:
                    if self.echo(timeout=2):
                        return
                except OSError:
                    pass
                time.sleep(0.2)
        finally:
            quiet.setLevel(level)
        pytest.fail(f"node did not answer C-ECHO within {timeout:.0f} s:\n{self.log_text()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait (SIGKILL and fail after ``timeout``); returns the exit code."""
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"node did not stop within {timeout:.0f} s of SIGTERM:\n{self.log_text()}")
        return int(self.proc.returncode)


def start_node(
    base: Path,
    checkpoints: Mapping[str, Path],
    *,
    ae_title: str = "GRADCAM",
    port: int | None = None,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    database_url: str | None = None,
    **config: Any,
) -> RunningNode:
    """Write ``base/node.toml`` and start ``python -m node.cli --config base/node.toml serve``.

    The spool is ``base/spool``, the database ``base/node.db`` (or ``database_url``), the log
    ``base/node.log``. ``config`` goes to
    :func:`write_test_config` (``node={...}``, ``destinations=[...]``, ``worker={...}``...). With ``wait``
    the node answers C-ECHO when this returns. Stop it with :meth:`RunningNode.stop`.
    """
    port = port or free_port()
    node_table = {"ae_title": ae_title, **config.pop("node", {})}
    cfg = write_test_config(
        base / "node.toml",
        checkpoints=checkpoints,
        port=port,
        storage_dir=base / "spool",
        database_url=database_url or f"sqlite:///{base / 'node.db'}",
        node=node_table,
        **config,
    )
    allowed = node_table.get("allowed_calling_aets") or ["PROBE"]
    return start_node_with(
        cfg, base, port, ae_title, probe_ae=allowed[0], wait=wait, env=env, database_url=database_url
    )


def start_node_with(
    cfg: Path,
    base: Path,
    port: int,
    ae_title: str = "GRADCAM",
    *,
    probe_ae: str = "PROBE",
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    database_url: str | None = None,
) -> RunningNode:
    """Start ``python -m node.cli --config CFG serve`` on a configuration written elsewhere, whose spool is
    ``base/spool`` and database ``base/node.db`` (or ``database_url``); the log goes to ``base/node.log``."""
    log_path = base / "node.log"
    with log_path.open("wb") as log_file:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--config", str(cfg), "serve"],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    db_url = database_url or f"sqlite:///{base / 'node.db'}"
    running = RunningNode(proc, port, ae_title, cfg, base / "spool", db_url, log_path, probe_ae=probe_ae)
    if wait:
        try:
            running.wait_ready()
        except BaseException:
            running.stop()
            raise
    return running
