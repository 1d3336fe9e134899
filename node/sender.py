"""The sending thread: drains the durable outbox by C-STORE, and ``gradcam-node echo DEST``.

One association per Send carries every output of its job. A failed attempt is recorded with its reason and
retried with exponential backoff; a restart resumes unfinished sends (``node.db.recover``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.errors import ConfigError
from node.config import Destination, Settings
from node.db import SendStatus, utcnow
from node.outbox import OutgoingFile, SendWork, as_utc, claim_send, due_send_ids, next_due_at, record_attempt
from node.queue import JobSignal

__all__ = [
    "Sender",
    "SendOutcome",
    "SC_SOP_CLASS",
    "SR_SOP_CLASS",
    "STORED_STATUSES",
    "store_files",
    "store_many",
    "echo_command",
]

log = logging.getLogger(__name__)

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Success, and the warnings that still mean "stored" (coercion, elements discarded, not fully validated).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_DB_ERROR_PAUSE_S = 1.0
_RECORD_TRIES = 5
_SENDS_PER_ASSOC = 16  # due sends to one destination that share an association

# Files are streamed from disk as they are (not decoded and encoded again) when the peer accepts their
# transfer syntax; see _send_one.
_config.STORE_SEND_CHUNKED_DATASET = True


def _where(work: SendWork) -> tuple[str, str, int]:
    return (work.ae_title, work.host, work.port)


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


def _send_one(assoc: Association, msg_id: int, f: OutgoingFile) -> tuple[str, bool, bool]:
    """C-STORE one file: ``(status text, stored, association still usable)``.

    The file goes out as it lies on disk (no decoding and re-encoding) when the peer accepted its transfer
    syntax; otherwise it is read and pynetdicom converts it to an accepted one.
    """
    try:
        try:
            rsp = assoc.send_c_store(f.path, msg_id=msg_id)  # streamed from the file
        except ValueError:
            rsp = assoc.send_c_store(dcmread(f.path), msg_id=msg_id)  # needs another transfer syntax
    except (OSError, InvalidDicomError, AttributeError) as exc:
        return f"{f.sop_instance_uid}=unreadable ({exc})", False, True
    except ValueError as exc:
        # no accepted presentation context for this SOP class / transfer syntax
        return f"{f.sop_instance_uid}=not sent ({exc})", False, True
    code = rsp.get("Status")
    if code is None:
        return f"{f.sop_instance_uid}=no response (timeout or connection lost)", False, False
    return f"{f.sop_instance_uid}=0x{int(code):04X}", int(code) in STORED_STATUSES, assoc.is_established


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one Send in an association."""

    ok: bool
    detail: str
    started: datetime
    finished: datetime


def store_many(settings: Settings, works: list[SendWork]) -> list[SendOutcome]:
    """C-STORE the files of several sends to one destination over one association, send by send.

    Returns one outcome per send, in order: whether every instance of it was stored and a detail line
    (per-instance statuses or the error). Sends after a lost association fail with that reason.
    """
    started = utcnow()
    done: dict[int, SendOutcome] = {}
    for i, w in enumerate(works):
        if not w.files:
            done[i] = SendOutcome(False, "no output files recorded for this job", started, started)
    todo = [(i, w) for i, w in enumerate(works) if w.files]
    if todo:
        first = todo[0][1]
        ae = _make_ae(settings)
        transfer_syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        classes = {f.sop_class_uid for _, w in todo for f in w.files} | {SC_SOP_CLASS, SR_SOP_CLASS}
        for sop_class in sorted(classes):
            ae.add_requested_context(sop_class, transfer_syntaxes)
        assoc = ae.associate(first.host, first.port, ae_title=first.ae_title, max_pdu=settings.node.max_pdu)
        if not assoc.is_established:
            reason = _not_established(assoc, first.host, first.port, settings.node.acse_timeout_s)
            for i, _ in todo:
                done[i] = SendOutcome(False, reason, started, utcnow())
        else:
            try:
                _store_over(assoc, todo, done)
            finally:
                if assoc.is_established:
                    assoc.release()
    return [done[i] for i in range(len(works))]


def _store_over(assoc: Association, todo: list[tuple[int, SendWork]], done: dict[int, SendOutcome]) -> None:
    msg_id = 0
    for i, w in todo:
        w_started = utcnow()
        if not assoc.is_established:
            done[i] = SendOutcome(False, "association lost before this send", w_started, w_started)
            continue
        statuses: list[str] = []
        ok = True
        for f in w.files:
            msg_id += 1
            text, stored, usable = _send_one(assoc, msg_id, f)
            statuses.append(text)
            ok = ok and stored
            if not usable:
                statuses.append("association lost")
                ok = False
                break
        done[i] = SendOutcome(ok, "; ".join(statuses), w_started, utcnow())


def store_files(settings: Settings, work: SendWork) -> tuple[bool, str]:
    """Open one association to the send's destination and C-STORE all its files.

    Returns whether every instance was stored and a detail line (per-instance statuses or the error).
    """
    (outcome,) = store_many(settings, [work])
    return outcome.ok, outcome.detail


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
        """Send everything due now; True if anything was attempted.

        Consecutive due sends to the same destination share one association (up to ``_SENDS_PER_ASSOC``):
        each is still claimed, attempted and recorded on its own.
        """
        with self.factory() as session:
            ids = due_send_ids(session)
        worked = False
        group: list[SendWork] = []
        for send_id in ids:
            if self._stop.is_set():
                break
            work = claim_send(self.factory, send_id)
            if work is None:
                continue
            if group and (_where(group[0]) != _where(work) or len(group) >= _SENDS_PER_ASSOC):
                self._attempt(group)
                group = []
            group.append(work)
            worked = True
        if group:
            self._attempt(group)
        return worked

    def _attempt(self, works: list[SendWork]) -> None:
        try:
            outcomes = store_many(self.settings, works)
        except Exception as exc:  # noqa: BLE001 - any network-layer surprise is one failed attempt, recorded
            ids = ", ".join(str(w.send_id) for w in works)
            log.exception("sends %s: unexpected error while sending", ids)
            now = utcnow()
            failed = SendOutcome(False, f"unexpected error: {type(exc).__name__}: {exc}", now, now)
            outcomes = [failed] * len(works)
        for work, outcome in zip(works, outcomes, strict=True):
            self._log(work, outcome)

    def _log(self, work: SendWork, outcome: SendOutcome) -> None:
        ms = (outcome.finished - outcome.started).total_seconds() * 1000.0
        status, next_at = self._record(work, outcome.started, outcome.finished, outcome.ok, outcome.detail)
        where = f"{work.destination} ({work.ae_title}@{work.host}:{work.port})"
        if outcome.ok:
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
            wait_s = (as_utc(next_at) - outcome.finished).total_seconds()
            log.warning(
                "send %d job %d -> %s: attempt %d failed (%s); retry in %.1f s",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                outcome.detail,
                wait_s,
            )
        else:
            log.error(
                "send %d job %d -> %s: attempt %d failed (%s); giving up (%s)",
                work.send_id,
                work.job_id,
                where,
                work.attempt,
                outcome.detail,
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
