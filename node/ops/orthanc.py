"""Orthanc on this machine, as the demo, the integration tests and bench/e2e.py run it.

Debian's Orthanc (``/usr/sbin/Orthanc``) with a copy of ``config/orthanc/orthanc.json`` in which the ports,
the storage folder, the Lua script and the node's address are replaced (:func:`local_orthanc_config`,
:class:`LocalOrthanc`), and a small REST client (:class:`OrthancClient`). The files in ``config/orthanc/``
are the ones a site deploys; nothing here changes what they say about routing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gradcam.config import REPO_ROOT
from node.ops.peers import ChildProcess, PeerError, port_is_free

__all__ = [
    "ORTHANC_BINARY",
    "ORTHANC_CONFIG",
    "ORTHANC_LUA",
    "OrthancError",
    "SR_CLASS_PREFIX",
    "strip_json_comments",
    "load_orthanc_config",
    "lua_setting",
    "local_orthanc_config",
    "OrthancClient",
    "LocalOrthanc",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
ORTHANC_CONFIG = REPO_ROOT / "config" / "orthanc" / "orthanc.json"
ORTHANC_LUA = REPO_ROOT / "config" / "orthanc" / "autorouting.lua"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage class


class OrthancError(PeerError):
    """Orthanc could not be started, stopped or queried, or its configuration read."""


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

    def holds_results(self, study_uid: str) -> bool:
        """Whether the study holds an SR of the node and every object that SR lists as evidence: the node's
        results for an image are all there, whatever kinds the configuration makes."""
        from io import BytesIO

        import pydicom

        instances = self.study_instances(study_uid)
        held = {i["SOPInstanceUID"] for i in instances}
        for sr in (i for i in instances if i["SOPClassUID"].startswith(SR_CLASS_PREFIX)):
            ds = pydicom.dcmread(BytesIO(self.instance_file(sr["ID"])), stop_before_pixels=True)
            listed = {
                str(ref.ReferencedSOPInstanceUID)
                for evidence in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                for series in evidence.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence
            }
            if listed and listed <= held:
                return True
        return False


# --- local Orthanc process ----------------------------------------------------------------------------------


class LocalOrthanc(ChildProcess):
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
        super().__init__(self.workdir / "orthanc.log")
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.node_port = node_port
        self.node_host = node_host
        self.binary = binary
        self.storage_dir = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.lua_path = self.workdir / "autorouting.lua"
        self.config = self._config()
        self.aet: str = self.config.get("DicomAet", "ORTHANC")
        self.client = OrthancClient(self.url)

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
