"""The sending thread: drains the durable outbox by C-STORE, and ``gradcam-node echo DEST``.

One association per Send carries every output of its job. A failed attempt is recorded with its reason and
retried with exponential backoff; a restart resumes unfinished sends (``node.db.recover``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from gradcam.errors import ConfigError
from node.config import Destination, Settings
from node.db import LeaseKeeper, SendStatus, holder_id, utcnow
from node.db.doorbell import SENDS, Listener
from node.queue import JobSignal
from node.send.outbox import (
    OutgoingFile,
    SendWork,
    as_utc,
    claim_send,
    due_send_ids,
    next_due_at,
    record_attempt,
    record_delivery,
)
from node.tls import ClientContext, describe_tls_error, tls_args

__all__ = [
    "Sender",
    "SendOutcome",
    "SC_SOP_CLASS",
    "SR_SOP_CLASS",
    "STORED_STATUSES",
    "Link",
    "echo_command",
]

log = logging.getLogger(__name__)

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
# Every class the node's outputs can have: proposed on every association, so that a lingering one
# serves the next job's results whatever kinds they are.
OUTPUT_SOP_CLASSES = frozenset({SC_SOP_CLASS, SR_SOP_CLASS, SEG_SOP_CLASS})
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Success, and the warnings that still mean "stored" (coercion, elements discarded, not fully validated).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_DB_ERROR_PAUSE_S = 1.0
_RECORD_TRIES = 5
_LINGER_S = 1.0  # an idle association to a destination is kept this long for the next results

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


def _prompt_tcp(assoc: Association) -> None:
    """Take the 40 ms TCP stalls out of every C-STORE to a peer that writes its response in pieces.

    DCMTK (Orthanc, storescp and most PACS built on it) writes a C-STORE response as a PDU header and then
    the rest, with Nagle's algorithm on: the rest waits until we acknowledge the header, and Linux delays
    that acknowledgement by up to 40 ms. So: TCP_NODELAY on our writes, and TCP_QUICKACK before each read
    of pynetdicom's (the kernel resets it) so that a pending acknowledgement goes out at once. Measured on
    loopback, 512 x 512 RGB SC: Orthanc 63-74 ms per C-STORE -> 7-9 ms, DCMTK storescp 64-77 -> 3.5-3.7;
    either option alone leaves 28-53 ms. Per association, in our sender only; a no-op where the socket
    or the option is missing (not Linux, pynetdicom internals changed).
    """
    transport: Any = getattr(assoc.dul, "socket", None)
    raw = getattr(transport, "socket", None)
    if transport is None or raw is None:
        return
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    quickack = getattr(socket, "TCP_QUICKACK", None)
    read = getattr(transport, "recv", None)
    if quickack is None or read is None:
        return

    def recv(nr_bytes: int) -> bytearray:
        sock = transport.socket
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass  # closed meanwhile: the read reports it
        return read(nr_bytes)

    transport.recv = recv


def _not_established(
    assoc: Association,
    host: str,
    port: int,
    timeout: float,
    connected: bool | None = None,
    elapsed_s: float = 0.0,
) -> str:
    """Why an association did not come up, as precisely as the peer lets us know.

    ``connected``: whether the TCP connection was made (None: not known); ``elapsed_s``: how long the
    association request took, so that a timeout (``timeout``: ``acse_timeout_s``, which is also the
    connection timeout) is called one and not taken for a refusal.
    """
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            return f"association rejected ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
        return "association rejected"
    no_connection = (
        f"cannot connect to {host}:{port}: no answer within {timeout:g} s (acse_timeout_s): "
        "is the host up and the port open (firewall)?"
    )
    timed_out = elapsed_s >= 0.9 * timeout
    if connected is False and timed_out:
        return no_connection
    if connected:
        if timed_out:
            return (
                f"connected to {host}:{port}, but no answer to the association request within {timeout:g} s "
                "(acse_timeout_s): is it a DICOM node, and is the port the right one?"
            )
        return (
            f"connected to {host}:{port}, but the association was aborted during negotiation: the peer "
            "closed the connection or does not speak DICOM on this port"
        )
    # pynetdicom reports a refused connection as an abort and hides the socket error; one plain connect
    # names it (refused, unreachable, timeout).
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        return no_connection
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    if assoc.is_aborted:
        return "association aborted by the peer during negotiation"
    return f"no association with {host}:{port} (no answer to the association request)"


def _connect_error(exc: OSError, settings: Settings, name: str, host: str, port: int) -> str:
    """What ``ae.associate`` raising means: pynetdicom resolves the host name before it connects."""
    if isinstance(exc, socket.gaierror):
        where = f"the host of [[destinations]] {name!r} in {settings.path}"
        return f"cannot resolve host {host!r}: {exc.strerror or exc}: check {where}"
    return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _tls_args(settings: Settings, name: str, host: str) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for the destination called ``name`` (a fresh context: its files are read
    again, so a renewed certificate needs no restart); None for plain DICOM. Raises :class:`ConfigError`."""
    dest = next((d for d in settings.destinations if d.name == name), None)
    if dest is None or dest.tls is None:
        return None
    return tls_args(dest.tls, host)


def _tls_failure(args: tuple[ClientContext, str] | None, name: str, host: str, port: int) -> str | None:
    """Why the TLS handshake with a destination failed; None when it did not (or there was no TLS)."""
    if args is None or args[0].error is None:
        return None
    reason = describe_tls_error(args[0].error, "the destination", f"tls.ca of destination {name!r}")
    return f"TLS handshake with {host}:{port} failed: {reason}"


def _pause_reactor(assoc: Association, timeout: float = 1.0) -> None:
    """Wait until the association's own thread is parked, so that it cannot take our C-STORE response.

    pynetdicom's association thread reads incoming DIMSE messages too, unless paused. ``send_c_store``
    pauses it by clearing an event and waiting for a ``_is_paused`` flag, but the flag is set just before
    the thread waits on the event: a thread that got past an earlier, still-set event reads the response
    off the queue itself and the C-STORE waits for the DIMSE timeout (60 s), after which the send is
    retried and the peer gets duplicates. Measured with busy Python threads (as in the node): 3 and 4 of
    300 C-STOREs timed out; 0 of 300 after this wait, which clears the event and returns once the thread
    is inside ``wait()`` on it. Uses pynetdicom's and CPython's internals; if they change, it does nothing.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    waiters = getattr(getattr(checkpoint, "_cond", None), "_waiters", None)
    if checkpoint is None or waiters is None:
        return
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while not waiters and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.0002)


def _resume_reactor(assoc: Association) -> None:
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is not None and not checkpoint.is_set():
        checkpoint.set()


def _send_one(assoc: Association, msg_id: int, f: OutgoingFile) -> tuple[str, int | None, bool]:
    """C-STORE one file: ``(status text, the response's status or None, association still usable)``.

    The file goes out as it lies on disk (no decoding and re-encoding) when the peer accepted its transfer
    syntax; otherwise it is read and pynetdicom converts it to an accepted one.
    """
    _pause_reactor(assoc)
    try:
        try:
            rsp = assoc.send_c_store(f.path, msg_id=msg_id)  # streamed from the file
        except ValueError:
            rsp = assoc.send_c_store(dcmread(f.path), msg_id=msg_id)  # needs another transfer syntax
    except (OSError, InvalidDicomError, AttributeError) as exc:
        return f"{f.sop_instance_uid}=unreadable ({exc})", None, True
    except ValueError as exc:
        # no accepted presentation context for this SOP class / transfer syntax
        return f"{f.sop_instance_uid}=not sent ({exc})", None, True
    finally:
        _resume_reactor(assoc)  # send_c_store resumes it after a response; not when it raised before
    code = rsp.get("Status")
    if code is None:
        return f"{f.sop_instance_uid}=no response (timeout or connection lost)", None, False
    return f"{f.sop_instance_uid}=0x{int(code):04X}", int(code), assoc.is_established


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one Send in an association."""

    ok: bool
    detail: str
    started: datetime
    finished: datetime


def _no_files(work: SendWork) -> SendOutcome:
    now = utcnow()
    if work.delivered:  # an earlier attempt delivered them all, and was cut short before it could say so
        return SendOutcome(True, f"all {work.delivered} files were delivered by earlier attempts", now, now)
    return SendOutcome(False, "no output files recorded for this job", now, now)


class Link:
    """One association to one destination, used for send after send until :meth:`close`.

    The node's outputs are SC, Segmentation and SR objects; all three classes are always proposed, with
    explicit and implicit VR little endian. A refused association is remembered as :attr:`error`: every
    send given to the link then fails with it, without another connection attempt.
    """

    def __init__(self, settings: Settings, work: SendWork) -> None:
        self.where = _where(work)
        self.error: str | None = None
        self.assoc: Association | None = None
        self._warned: set[str] = set()
        self._msg_id = 0
        ae = _make_ae(settings)
        transfer_syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        classes = {f.sop_class_uid for f in work.files} | OUTPUT_SOP_CLASSES
        for sop_class in sorted(classes):
            ae.add_requested_context(sop_class, transfer_syntaxes)
        try:
            tls = _tls_args(settings, work.destination, work.host)
        except ConfigError as exc:  # a TLS file gone or replaced by a bad one since the start
            self.error = f"TLS configuration: {exc}"
            return
        try:
            self.assoc = ae.associate(
                work.host, work.port, ae_title=work.ae_title, max_pdu=settings.node.max_pdu, tls_args=tls
            )
        except OSError as exc:  # an unresolvable host: a failed attempt like any other, not a stuck send
            self.error = _connect_error(exc, settings, work.destination, work.host, work.port)
            return
        if self.assoc.is_established:
            _prompt_tcp(self.assoc)
        else:
            self.error = _tls_failure(tls, work.destination, work.host, work.port) or _not_established(
                self.assoc, work.host, work.port, settings.node.acse_timeout_s
            )

    @property
    def usable(self) -> bool:
        return self.error is None and self.assoc is not None and self.assoc.is_established

    def serves(self, work: SendWork) -> bool:
        """Whether ``work`` goes over this link: same destination, and open (or refused: the refusal
        stands for the rest of this pass instead of a new connection attempt per send)."""
        open_ = self.assoc is not None and self.assoc.is_established
        return self.where == _where(work) and (self.error is not None or open_)

    def send(
        self, work: SendWork, delivered: Callable[[OutgoingFile, int], None] | None = None
    ) -> SendOutcome:
        """C-STORE every file of ``work``; its outcome (stored or not, per-instance statuses).
        ``delivered`` is told of each file the destination acknowledged, as it is."""
        if not work.files:
            return _no_files(work)
        started = utcnow()
        if self.error is not None:
            return SendOutcome(False, self.error, started, started)
        if self.assoc is None or not self.assoc.is_established:
            return SendOutcome(False, "association lost before this send", started, started)
        statuses: list[str] = []
        ok = True
        accepted = {str(cx.abstract_syntax) for cx in self.assoc.accepted_contexts}
        for f in work.files:
            if f.sop_class_uid not in accepted:
                # a destination that takes no Segmentations (say) still gets the SCs and the SR; the
                # administrator is told what to change, and the object is not retried for ever
                statuses.append(f"{f.sop_instance_uid}=skipped ({f.kind}: SOP class not accepted)")
                self._not_accepted(f)
                continue
            self._msg_id += 1
            text, status, usable = _send_one(self.assoc, self._msg_id, f)
            statuses.append(text)
            stored = status is not None and status in STORED_STATUSES
            ok = ok and stored
            if stored and delivered is not None:
                delivered(f, status)
            if not usable:
                statuses.append("association lost")
                ok = False
                break
        return SendOutcome(ok, "; ".join(statuses), started, utcnow())

    def _not_accepted(self, f: OutgoingFile) -> None:
        if f.sop_class_uid in self._warned:
            return
        self._warned.add(f.sop_class_uid)
        name = getattr(UID(f.sop_class_uid), "name", f.sop_class_uid)
        ae_title, host, port = self.where
        log.warning(
            "%s at %s:%d does not accept %s: the node's %s outputs are not sent there; allow that SOP "
            "class at the destination, or remove %r from [outputs] kinds",
            ae_title,
            host,
            port,
            name,
            f.kind,
            f.kind,
        )

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


class Sender:
    """Threads (``outbox.associations`` of them) that send due outbox entries, each over its own
    association: sending is bound by round trips more than by CPU, so a second association nearly doubles
    the rate at which results reach the PACS. A send is claimed atomically, so no two threads send it."""

    def __init__(
        self, settings: Settings, sessionmaker: sessionmaker[Session], send_signal: JobSignal
    ) -> None:
        self.settings = settings
        self.factory = sessionmaker
        self.signal = send_signal
        self.holder = holder_id()
        self._held: set[int] = set()  # the sends the threads are sending now (their leases are renewed)
        self._held_lock = threading.Lock()
        self.leases = LeaseKeeper(sessionmaker, self.holder, settings.worker.lease_s, self._holding)
        self.doorbell = Listener(settings.database_url, SENDS, send_signal.notify)  # PostgreSQL only
        self._stop = threading.Event()
        n = settings.outbox.associations
        self._threads = [
            # the first thread keeps its association a moment for the next results; the others only help
            # with a backlog and close theirs as soon as nothing is due (an open pynetdicom association
            # costs CPU even when idle: its threads poll)
            threading.Thread(
                target=self._run, args=(_LINGER_S if i == 0 else 0.0,), name=f"sender-{i + 1}", daemon=True
            )
            for i in range(n)
        ]

    def start(self) -> None:
        """Start the threads."""
        log.info("sender started (%d associations at most)", len(self._threads))
        self.leases.start()
        self.doorbell.start()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Ask the threads to exit once the send in progress is finished."""
        self._stop.set()
        self.signal.notify()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the threads to exit (``timeout`` for all of them together)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if not self.is_alive():
            self.doorbell.stop()
            self.leases.stop()
            log.info("sender stopped")

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _run(self, linger_s: float) -> None:
        while not self._stop.is_set():
            timeout: float | None = None
            try:
                worked = self._drain(linger_s)
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

    def _holding(self) -> tuple[list[int], list[int]]:
        with self._held_lock:
            return [], list(self._held)

    def _wait_time(self) -> float:
        """Until the next send is due, at most ``[worker] poll_s`` (sends that workers in other processes
        queue: those on this machine ring, the others are found by looking)."""
        with self.factory() as session:
            due = next_due_at(session)
        poll = self.settings.worker.poll_s
        return poll if due is None else min(poll, max(0.0, (due - utcnow()).total_seconds()))

    def _drain(self, linger_s: float = _LINGER_S) -> bool:
        """Send everything due, and what becomes due meanwhile; True if anything was attempted.

        Sends to the same destination share one association, kept open while results keep coming (up to
        ``linger_s`` without any): outputs flow to the PACS as each job finishes, without an association
        per job. Each send is still claimed, attempted and recorded on its own, as soon as it is done.
        """
        worked = False
        link: Link | None = None
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                with self.factory() as session:
                    ids = due_send_ids(session)
                progressed = False
                for send_id in ids:
                    if self._stop.is_set():
                        break
                    work = claim_send(
                        self.factory, send_id, holder=self.holder, lease_s=self.settings.worker.lease_s
                    )
                    if work is None:
                        continue
                    progressed = worked = True
                    if link is not None and not link.serves(work):
                        link.close()
                        link = None
                    if link is None:
                        link = Link(self.settings, work)
                    self._attempt(link, work)
                if progressed:
                    idle_since = None
                    continue
                # nothing due: keep a working association a moment for the results being written now
                if link is None or not link.usable:
                    break
                idle_since = idle_since or time.monotonic()
                remaining = linger_s - (time.monotonic() - idle_since)
                if remaining <= 0:
                    break
                self.signal.wait(remaining)
        finally:
            if link is not None:
                link.close()
        return worked

    def _attempt(self, link: Link, work: SendWork) -> None:
        with self._held_lock:
            self._held.add(work.send_id)
        try:
            try:
                outcome = link.send(work, lambda f, status: self._delivered(work, f, status))
            except Exception as exc:  # noqa: BLE001 - any network-layer surprise is one failed attempt, recorded
                log.exception("send %d: unexpected error while sending", work.send_id)
                now = utcnow()
                outcome = SendOutcome(False, f"unexpected error: {type(exc).__name__}: {exc}", now, now)
            self._log(work, outcome)
        finally:
            with self._held_lock:
                self._held.discard(work.send_id)

    def _delivered(self, work: SendWork, f: OutgoingFile, status: int) -> None:
        """Note one acknowledged file at once, so that no later attempt sends it again."""
        try:
            record_delivery(self.factory, work.send_id, f.sop_instance_uid, status)
        except OperationalError as exc:  # the attempt's record still lists it; a retry may send it again
            log.warning(
                "send %d: cannot record the delivery of %s yet: %s", work.send_id, f.sop_instance_uid, exc
            )

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
    opened: list[bool] = []
    try:
        tls = _tls_args(settings, dest.name, dest.host)
    except ConfigError as exc:
        return False, f"TLS configuration: {exc}", 0.0
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            tls_args=tls,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: opened.append(True))],
        )
    except OSError as exc:
        return False, _connect_error(exc, settings, dest.name, dest.host, dest.port), 0.0
    if not assoc.is_established:
        failure = _tls_failure(tls, dest.name, dest.host, dest.port)
        if failure:
            return False, failure, 0.0
        timeout, elapsed = settings.node.acse_timeout_s, time.perf_counter() - t0
        return False, _not_established(assoc, dest.host, dest.port, timeout, bool(opened), elapsed), 0.0
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
