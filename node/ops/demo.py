"""``gradcam-node demo``, and the local Orthanc that the demo, the integration tests and bench/e2e.py use.

The demo starts Debian's Orthanc (``/usr/sbin/Orthanc``) with a copy of ``config/orthanc/orthanc.json`` in
which the ports, the storage folder, the Lua script and the node's address are replaced, starts the node
(``gradcam-node serve``), sends a few synthetic phantom studies to Orthanc with DCMTK's ``storescu``, waits
until Orthanc holds every result and prints them. Synthetic data only; every output is an AI research
output, not for diagnostic use.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcam.config import DEFAULT_CONFIG, REPO_ROOT
from gradcam.errors import GradcamError

if TYPE_CHECKING:
    from node.config import Settings

__all__ = [
    "ORTHANC_BINARY",
    "STORESCU",
    "ORTHANC_CONFIG",
    "ORTHANC_LUA",
    "OrthancError",
    "strip_json_comments",
    "load_orthanc_config",
    "lua_setting",
    "local_orthanc_config",
    "free_port",
    "port_is_free",
    "OrthancClient",
    "LocalOrthanc",
    "storescu",
    "compress",
    "toml_value",
    "terminate",
    "dump_node_toml",
    "derived_node_config",
    "NodeProcess",
    "DemoStudy",
    "make_demo_studies",
    "node_command",
    "demo_state_dir",
    "run_demo",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
STORESCU = Path("/usr/bin/storescu")  # DCMTK's, by absolute path: pynetdicom installs a script of that name
ORTHANC_CONFIG = REPO_ROOT / "config" / "orthanc" / "orthanc.json"
ORTHANC_LUA = REPO_ROOT / "config" / "orthanc" / "autorouting.lua"


class OrthancError(GradcamError):
    """Orthanc could not be started, stopped or queried."""


# --- configuration ------------------------------------------------------------------------------------------


def strip_json_comments(text: str) -> str:
    """Remove ``//`` and ``/* */`` comments (which Orthanc accepts) outside JSON strings."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            i = j + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_orthanc_config(path: Path = ORTHANC_CONFIG) -> dict[str, Any]:
    """Parse an Orthanc configuration file (JSON with comments)."""
    try:
        data = json.loads(strip_json_comments(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise OrthancError(f"{path}: cannot read the Orthanc configuration: {exc}") from exc
    if not isinstance(data, dict):
        raise OrthancError(f"{path}: expected a JSON object")
    return data


def lua_setting(lua_text: str, name: str) -> str:
    """The string value of a top-level ``NAME = 'value'`` setting of the routing script."""
    m = re.search(rf"^{re.escape(name)}\s*=\s*'([^']*)'", lua_text, re.MULTILINE)
    if m is None:
        raise OrthancError(f"the routing script has no setting {name} = '...'")
    return m.group(1)


def local_orthanc_config(
    *,
    dicom_port: int,
    http_port: int,
    storage_dir: Path,
    lua_path: Path,
    node_port: int,
    node_host: str = "127.0.0.1",
    base: Path = ORTHANC_CONFIG,
    node_modality: str | None = None,
) -> dict[str, Any]:
    """``config/orthanc/orthanc.json`` for a loopback run: ports, storage, Lua path and node address replaced.

    HTTP answers local clients only (``RemoteAccessAllowed`` false), so no login is needed, and callers must
    come from the host of their DicomModalities entry (all 127.0.0.1 here).
    """
    cfg = load_orthanc_config(base)
    if node_modality is None:
        node_modality = lua_setting(ORTHANC_LUA.read_text(encoding="utf-8"), "NODE_MODALITY")
    cfg.update(
        DicomPort=dicom_port,
        HttpPort=http_port,
        StorageDirectory=str(storage_dir),
        IndexDirectory=str(storage_dir),
        LuaScripts=[str(lua_path)],
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        DicomCheckModalityHost=True,
    )
    cfg.pop("RegisteredUsers", None)
    modalities = cfg.get("DicomModalities", {})
    if node_modality not in modalities:
        raise OrthancError(f"{base}: DicomModalities has no {node_modality!r} entry (the node)")
    for name, entry in modalities.items():
        entry["Host"] = node_host if name == node_modality else "127.0.0.1"
    modalities[node_modality]["Port"] = node_port
    return cfg


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (connections lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- REST client --------------------------------------------------------------------------------------------


class OrthancClient:
    """Minimal Orthanc REST client (standard library only)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as rsp:
                return bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code} {exc.read()[:300]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{method} {path}: Orthanc at {self.url} not reachable: {exc}") from exc

    def get_json(self, path: str) -> Any:
        return json.loads(self._request("GET", path))

    def get_bytes(self, path: str) -> bytes:
        return self._request("GET", path)

    def post_json(self, path: str, body: Any) -> Any:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        return json.loads(self._request("POST", path, data))

    def upload(self, dicom: bytes) -> Any:
        """Store a DICOM file through the REST API (as Orthanc Explorer's upload does)."""
        return json.loads(self._request("POST", "/instances", dicom))

    def alive(self) -> bool:
        try:
            self.get_json("/system")
        except OrthancError:
            return False
        return True

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's identifier of the study with this Study Instance UID, or None."""
        for hit in self.post_json("/tools/lookup", study_uid):
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study: ``ID``, ``SOPInstanceUID``, ``SOPClassUID``, ``SeriesInstanceUID``,
        ``Modality``, ``SeriesNumber``, ``RemoteAET`` and ``ReceptionDate`` (empty list: no such study)."""
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        series = {s["ID"]: s.get("MainDicomTags", {}) for s in self.get_json(f"/studies/{sid}/series")}
        out = []
        for inst in self.get_json(f"/studies/{sid}/instances"):
            meta = self.get_json(f"/instances/{inst['ID']}/metadata?expand")
            stags = series.get(inst.get("ParentSeries"), {})
            out.append(
                {
                    "ID": inst["ID"],
                    "SOPInstanceUID": inst.get("MainDicomTags", {}).get("SOPInstanceUID", ""),
                    "SOPClassUID": meta.get("SopClassUid", ""),
                    "SeriesInstanceUID": stags.get("SeriesInstanceUID", ""),
                    "Modality": stags.get("Modality", ""),
                    "SeriesNumber": stags.get("SeriesNumber", ""),
                    "RemoteAET": meta.get("RemoteAET", ""),
                    "ReceptionDate": meta.get("ReceptionDate", ""),
                }
            )
        return out

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance, as stored."""
        return self.get_bytes(f"/instances/{instance_id}/file")


# --- local Orthanc process ----------------------------------------------------------------------------------


class LocalOrthanc:
    """Debian's Orthanc on this machine with a derived configuration; restartable on the same storage.

    ``workdir`` receives ``orthanc.json``, ``autorouting.lua``, ``storage/`` and ``orthanc.log``.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        dicom_port: int,
        http_port: int,
        node_port: int,
        node_host: str = "127.0.0.1",
        binary: Path = ORTHANC_BINARY,
    ) -> None:
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.node_port = node_port
        self.node_host = node_host
        self.binary = binary
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.lua_path = self.workdir / "autorouting.lua"
        self.log_path = self.workdir / "orthanc.log"
        self.config = self._config()
        self.aet: str = self.config.get("DicomAet", "ORTHANC")
        self.client = OrthancClient(self.url)
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        return local_orthanc_config(
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            storage_dir=self.storage_dir,
            lua_path=self.lua_path,
            node_port=self.node_port,
            node_host=self.node_host,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start Orthanc and wait until its REST API answers."""
        if self.running:
            return
        for port in (self.dicom_port, self.http_port):
            if not port_is_free(port):
                raise OrthancError(f"cannot start Orthanc: port {port} is already in use on 127.0.0.1")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        shutil.copyfile(ORTHANC_LUA, self.lua_path)
        with self.log_path.open("ab") as log:
            # own session: a Ctrl-C in the terminal reaches only the caller, which stops us in order
            self._proc = subprocess.Popen(
                [str(self.binary), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise OrthancError(f"Orthanc exited at start-up; log {self.log_path}:\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout:.0f} s; log:\n{self.log_tail()}")

    def _answers(self) -> bool:
        """Our Orthanc answers (not some other server on the port: the DICOM port must be ours)."""
        try:
            system = self.client.get_json("/system")
        except OrthancError:
            return False
        return int(system.get("DicomPort", -1)) == self.dicom_port

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        terminate(proc, timeout)

    def restart(self, *, dicom_port: int | None = None, timeout: float = 60.0) -> None:
        """Stop, then start again on the same storage (optionally on another DICOM port)."""
        self.stop()
        if dicom_port is not None:
            self.dicom_port = dicom_port
            self.config = self._config()
        self.start(timeout)

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# storescu proposes uncompressed transfer syntaxes only, unless told which compressed one a file needs.
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline (8 bit)
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


def _transfer_syntax(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def storescu(
    files: list[Path],
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    host: str = "127.0.0.1",
    timeout: float = 120.0,
) -> None:
    """Send files with DCMTK's storescu, compressed ones as they are (one association per transfer syntax).

    Raises :class:`OrthancError` unless every file was stored.
    """
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_STORESCU_PROPOSE.get(_transfer_syntax(f), ""), []).append(f)
    for option, group in groups.items():
        cmd = [str(STORESCU), "-aet", calling_aet, "-aec", called_aet, "-to", "30", "-ta", "30", "-td", "60"]
        cmd += [option] if option else []
        cmd += [host, str(port), *map(str, group)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OrthancError(f"storescu failed: {exc}") from exc
        if done.returncode != 0 or "E:" in done.stderr:
            raise OrthancError(f"storescu exit {done.returncode}: {done.stderr.strip()[-1000:]}")


COMPRESSORS = {"jpeg-ls": Path("/usr/bin/dcmcjpls"), "jpeg-lossless": Path("/usr/bin/dcmcjpeg")}


def compress(path: Path, kind: str) -> bool:
    """Re-encode a DICOM file in place with DCMTK (``jpeg-ls``, ``jpeg-lossless``); False: tool absent."""
    tool = COMPRESSORS[kind]
    if not os.access(tool, os.X_OK):
        return False
    tmp = path.with_suffix(".tmp.dcm")
    done = subprocess.run([str(tool), str(path), str(tmp)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise OrthancError(f"{tool.name} failed on {path}: {done.stderr.strip()[-500:]}")
    os.replace(tmp, path)
    return True


# --- node configuration and process -------------------------------------------------------------------------


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child and wait ``timeout`` seconds for it; SIGKILL it after that."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def toml_value(v: Any) -> str:
    """``v`` (bool, number, string or path, list, table) written as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_node_toml(data: dict[str, Any]) -> str:
    """TOML text of a node configuration as ``tomllib`` reads it (tables, ``[[destinations]]``, models)."""
    out: list[str] = []
    for name, value in data.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"\n[[{_toml_key(name)}]]")
                out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, dict) and value and all(isinstance(x, dict) for x in value.values()):
            for sub, table in value.items():  # [models."NAME"]
                out.append(f"\n[{_toml_key(name)}.{_toml_key(sub)}]")
                out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
        elif isinstance(value, dict):
            out.append(f"\n[{_toml_key(name)}]")
            out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        else:
            out.insert(0, f"{_toml_key(name)} = {toml_value(value)}")
    return "\n".join(out).lstrip("\n") + "\n"


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def derived_node_config(base: Path, out: Path, overrides: dict[str, Any]) -> Path:
    """Write a copy of the node configuration ``base`` with values replaced by ``overrides``.

    ``overrides`` is merged table by table (``{"node": {"port": 11113}}``, ``{"models": {"ResNet18":
    {"checkpoint": "/tmp/r.pt"}}}``); a list (``destinations``) replaces the whole list. Relative paths keep
    their meaning (they are relative to the repository, not to the file). The result is loaded once, so a
    bad value fails here, naming the key.
    """
    from node.config import load_settings

    data = tomllib.loads(base.read_text(encoding="utf-8"))
    _merge(data, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated from {base}; edit that file instead.\n"
    out.write_text(header + dump_node_toml(data), encoding="utf-8")
    load_settings(out)
    return out


class NodeProcess:
    """``gradcam-node serve`` as a child process, in its own session (Ctrl-C reaches only the caller)."""

    def __init__(self, config: Path, log_path: Path, port: int, ae_title: str) -> None:
        self.config = config
        self.log_path = log_path
        self.port = port
        self.ae_title = ae_title
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def echo(self, calling_ae: str) -> bool:
        """True if the node answers C-ECHO."""
        from pynetdicom import AE

        ae = AE(ae_title=calling_ae)
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 5
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()

    def start(self, calling_ae: str, timeout: float = 600.0) -> None:
        """Start the node and wait until it answers C-ECHO from ``calling_ae`` (models load first)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "--config", str(self.config), "serve"],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"the node exited at start-up; log {self.log_path}:\n{self.log_tail()}")
            if self.echo(calling_ae):
                return
            time.sleep(0.5)
        self.stop()
        raise OrthancError(f"the node did not answer C-ECHO within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM (the node finishes its batch and exits), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        terminate(proc, timeout)


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


_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _has_results(client: OrthancClient, study_uid: str) -> bool:
    """The study holds an SR of the node and every object that SR lists as evidence."""
    from io import BytesIO

    import pydicom

    instances = client.study_instances(study_uid)
    held = {i["SOPInstanceUID"] for i in instances}
    for sr in (i for i in instances if i["SOPClassUID"].startswith(_SR_PREFIX)):
        ds = pydicom.dcmread(BytesIO(client.instance_file(sr["ID"])), stop_before_pixels=True)
        listed = {
            str(ref.ReferencedSOPInstanceUID)
            for evidence in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in evidence.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        if listed and listed <= held:
            return True
    return False


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
            if s.study_uid not in done and _has_results(client, s.study_uid):
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
    srs = [i for i in instances if i["SOPClassUID"].startswith(_SR_PREFIX)]
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
