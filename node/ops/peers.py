"""The programs on this machine that the demo, the integration tests and the benches start and drive: DCMTK's
``storescu`` and compressors, ``gradcam-node serve`` as a child process, and free loopback ports.

Orthanc, the one peer with a configuration of its own, is :mod:`node.ops.orthanc`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from gradcam.config import REPO_ROOT
from gradcam.errors import GradcamError

__all__ = [
    "PeerError",
    "STORESCU",
    "COMPRESSORS",
    "port_is_free",
    "free_port",
    "terminate",
    "storescu",
    "compress",
    "ChildProcess",
    "NodeProcess",
]

STORESCU = Path("/usr/bin/storescu")  # DCMTK's, by absolute path: pynetdicom installs a script of that name


class PeerError(GradcamError):
    """A program on this machine (Orthanc, a DCMTK tool, the node) could not be started, or failed."""


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


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a child and wait ``timeout`` seconds for it; SIGKILL it after that."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# --- DCMTK --------------------------------------------------------------------------------------------------

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

    Raises :class:`PeerError` unless every file was stored.
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
            raise PeerError(f"storescu failed: {exc}") from exc
        if done.returncode != 0 or "E:" in done.stderr:
            raise PeerError(f"storescu exit {done.returncode}: {done.stderr.strip()[-1000:]}")


COMPRESSORS = {"jpeg-ls": Path("/usr/bin/dcmcjpls"), "jpeg-lossless": Path("/usr/bin/dcmcjpeg")}


def compress(path: Path, kind: str) -> bool:
    """Re-encode a DICOM file in place with DCMTK (``jpeg-ls``, ``jpeg-lossless``); False: tool absent."""
    tool = COMPRESSORS[kind]
    if not os.access(tool, os.X_OK):
        return False
    tmp = path.with_suffix(".tmp.dcm")
    done = subprocess.run([str(tool), str(path), str(tmp)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise PeerError(f"{tool.name} failed on {path}: {done.stderr.strip()[-500:]}")
    os.replace(tmp, path)
    return True


# --- the node as a child process ----------------------------------------------------------------------------


class ChildProcess:
    """A program this process started, writing to :attr:`log_path`: whether it runs, its log's end, and
    its stop (SIGTERM, SIGKILL after a timeout)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, SIGKILL after ``timeout`` seconds; nothing if it is not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        terminate(proc, timeout)


class NodeProcess(ChildProcess):
    """``gradcam-node serve`` as a child process, in its own session (Ctrl-C reaches only the caller)."""

    def __init__(self, config: Path, log_path: Path, port: int, ae_title: str) -> None:
        super().__init__(log_path)
        self.config = config
        self.port = port
        self.ae_title = ae_title

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
                raise PeerError(f"the node exited at start-up; log {self.log_path}:\n{self.log_tail()}")
            if self.echo(calling_ae):
                return
            time.sleep(0.5)
        self.stop()
        raise PeerError(f"the node did not answer C-ECHO within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM (the node finishes its batch and exits), SIGKILL after ``timeout``."""
        super().stop(timeout)
