"""The sending thread: drains the durable outbox by C-STORE, and ``gradcam-node echo DEST``.

One association per Send carries every output of its job. A failed attempt is recorded with its reason and
retried with exponential backoff; a restart resumes unfinished sends (``node.db.recover``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import datetime

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.errors import ConfigError
from node.config import Destination, Settings
from node.db import SendStatus, utcnow
from node.outbox import SendWork, as_utc, claim_send, due_send_ids, next_due_at, record_attempt
from node.queue import JobSignal

__all__ = ["Sender", "SC_SOP_CLASS", "SR_SOP_CLASS", "STORED_STATUSES", "store_files", "echo_command"]

log = logging.getLogger(__name__)

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Success, and the warnings that still mean "stored" (coercion, elements discarded, not fully validated).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_DB_ERROR_PAUSE_S = 1.0
_RECORD_TRIES = 5


def _make_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s
    ae.connection_timeout = settings.node.acse_timeout_s
    return ae


def _not_established(assoc: Association, host: str, port: int, timeout: float) -> str:
    """Why an association did not come up, as precisely as the peer lets us know."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            return f"association rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
        return "association rejected"
    # pynetdicom reports a refused connection as an abort and hides the socket error; one plain connect
    # names it (refused, unreachable, timeout).
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    if assoc.is_aborted:
        return "association aborted by the peer during negotiation"
    return f"no association with {host}:{port} (no answer to the association request)"


def store_files(settings: Settings, work: SendWork) -> tuple[bool, str]:
    """Open one association to the send's destination and C-STORE all its files.

    Returns whether every instance was stored and a detail line (per-instance statuses or the error).
    """
    if not work.files:
        return False, "no output files recorded for this job"
    ae = _make_ae(settings)
    transfer_syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    for sop_class in sorted({f.sop_class_uid for f in work.files} | {SC_SOP_CLASS, SR_SOP_CLASS}):
        ae.add_requested_context(sop_class, transfer_syntaxes)
    assoc = ae.associate(work.host, work.port, ae_title=work.ae_title, max_pdu=settings.node.max_pdu)
    if not assoc.is_established:
        return False, _not_established(assoc, work.host, work.port, settings.node.acse_timeout_s)
    statuses: list[str] = []
    ok = True
    try:
        for msg_id, f in enumerate(work.files, start=1):
            try:
                ds = dcmread(f.path)
            except (OSError, InvalidDicomError) as exc:
                statuses.append(f"{f.sop_instance_uid}=unreadable ({exc})")
                ok = False
                continue
            try:
                rsp = assoc.send_c_store(ds, msg_id=msg_id)
            except ValueError as exc:
                # no accepted presentation context for this SOP class / transfer syntax
                statuses.append(f"{f.sop_instance_uid}=not sent ({exc})")
                ok = False
                continue
            code = rsp.get("Status")
            if code is None:
                statuses.append(f"{f.sop_instance_uid}=no response (timeout or connection lost)")
                ok = False
                break
            statuses.append(f"{f.sop_instance_uid}=0x{int(code):04X}")
            ok = ok and int(code) in STORED_STATUSES
            if not assoc.is_established:
                statuses.append("association lost")
                ok = False
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return ok, "; ".join(statuses)


class Sender:
    """Thread that sends due outbox entries, one association per send."""

    def __init__(
        self, settings: Settings, sessionmaker: sessionmaker[Session], send_signal: JobSignal
    ) -> None:
        self.settings = settings
        self.factory = sessionmaker
        self.signal = send_signal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to exit once the association in progress is finished."""
        self._stop.set()
        self.signal.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to exit."""
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        log.info("sender started")
        while not self._stop.is_set():
            timeout: float | None = None
            try:
                worked = self._drain()
                if not worked:
                    timeout = self._wait_time()
            except OperationalError as exc:
                # database locked or unavailable: nothing is lost (state is in the DB); try again shortly
                log.error("sender: database error, retrying in %.0f s: %s", _DB_ERROR_PAUSE_S, exc)
                timeout, worked = _DB_ERROR_PAUSE_S, False
            except Exception:
                log.exception("sender: unexpected error; pausing before the next round")
                timeout, worked = _DB_ERROR_PAUSE_S, False
            if not worked and not self._stop.is_set():
                self.signal.wait(timeout)
        log.info("sender stopped")

    def _wait_time(self) -> float | None:
        with self.factory() as session:
            due = next_due_at(session)
        if due is None:
            return None  # nothing pending: sleep until a new send is committed
        return max(0.0, (due - utcnow()).total_seconds())

    def _drain(self) -> bool:
        """Send everything due now; True if anything was attempted."""
        with self.factory() as session:
            ids = due_send_ids(session)
        worked = False
        for send_id in ids:
            if self._stop.is_set():
                break
            work = claim_send(self.factory, send_id)
            if work is not None:
                self._attempt(work)
                worked = True
        return worked

    def _attempt(self, work: SendWork) -> None:
        started = utcnow()
        t0 = time.perf_counter()
        try:
            ok, detail = store_files(self.settings, work)
        except Exception as exc:  # noqa: BLE001 - any network-layer surprise is one failed attempt, recorded
            log.exception("send %d: unexpected error while sending", work.send_id)
            ok, detail = False, f"unexpected error: {type(exc).__name__}: {exc}"
        finished = utcnow()
        status, next_at = self._record(work, started, finished, ok, detail)
        ms = (time.perf_counter() - t0) * 1000.0
        where = f"{work.destination} ({work.ae_title}@{work.host}:{work.port})"
        if ok:
            log.info(
                "send %d job %d -> %s: sent %d instances in %.0f ms (attempt %d)",
                work.send_id,
                work.job_id,
                where,
                len(work.files),
                ms,
                work.attempt,
            )
        elif next_at is not None:
            wait_s = (as_utc(next_at) - finished).total_seconds()
            log.warning(
                "send %d job %d -> %s: attempt %d failed (%s); retry in %.1f s",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                detail,
                wait_s,
            )
        else:
            log.error(
                "send %d job %d -> %s: attempt %d failed (%s); giving up (%s)",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                detail,
                status,
            )

    def _record(
        self, work: SendWork, started: datetime, finished: datetime, ok: bool, detail: str
    ) -> tuple[SendStatus, datetime | None]:
        # The attempt happened whatever the database says; try hard to note it, else the send stays
        # 'sending' until recover() at the next start resumes it.
        for n in range(_RECORD_TRIES):
            try:
                return record_attempt(self.factory, work, started, finished, ok, detail, self.settings.outbox)
            except OperationalError as exc:
                if n == _RECORD_TRIES - 1:
                    raise
                log.warning("send %d: cannot record the attempt yet (%s); retrying", work.send_id, exc)
                time.sleep(_DB_ERROR_PAUSE_S)
        raise AssertionError("unreachable")


def echo(settings: Settings, dest: Destination) -> tuple[bool, str, float]:
    """C-ECHO a destination; returns success, a reason on failure, and the round trip in ms."""
    ae = _make_ae(settings)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    t0 = time.perf_counter()
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        return False, _not_established(assoc, dest.host, dest.port, settings.node.acse_timeout_s), 0.0
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    ms = (time.perf_counter() - t0) * 1000.0
    code = rsp.get("Status")
    if code is None:
        return False, "no C-ECHO response (timeout or connection lost)", ms
    if int(code) != 0x0000:
        return False, f"C-ECHO status 0x{int(code):04X}", ms
    return True, "", ms


def echo_command(settings: Settings, dest_name: str) -> int:
    """``gradcam-node echo DEST``: print the outcome of a C-ECHO to a configured destination; 0 if OK."""
    try:
        dest = settings.destination(dest_name)
    except ConfigError as exc:
        print(f"{dest_name}: {exc.expected}")
        return 1
    # pynetdicom logs its own view of a refused connection; the one line below says it clearly
    transport_log = logging.getLogger("pynetdicom")
    level = transport_log.level
    transport_log.setLevel(logging.CRITICAL)
    try:
        ok, reason, ms = echo(settings, dest)
    finally:
        transport_log.setLevel(level)
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
    if ok:
        print(f"{where}: OK in {ms:.0f} ms")
        return 0
    print(f"{where}: FAILED: {reason}")
    return 1
