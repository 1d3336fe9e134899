"""One association to a destination carrying send after send (:class:`Link`), and one C-STORE on it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association

from gradcam.errors import ConfigError
from node.config import Settings
from node.db import utcnow
from node.send.association import (
    OUTPUT_SOP_CLASSES,
    STORED_STATUSES,
    connect_error,
    destination_tls,
    make_ae,
    not_established,
    prompt_tcp,
    tls_failure,
)
from node.send.outbox import (
    OutgoingFile,
    SendWork,
)

__all__ = ["Link", "SendOutcome"]

log = logging.getLogger("node.send.sender")


def _where(work: SendWork) -> tuple[str, str, int]:
    return (work.ae_title, work.host, work.port)


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
        ae = make_ae(settings)
        transfer_syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        classes = {f.sop_class_uid for f in work.files} | OUTPUT_SOP_CLASSES
        for sop_class in sorted(classes):
            ae.add_requested_context(sop_class, transfer_syntaxes)
        try:
            tls = destination_tls(settings, work.destination, work.host)
        except ConfigError as exc:  # a TLS file gone or replaced by a bad one since the start
            self.error = f"TLS configuration: {exc}"
            return
        try:
            self.assoc = ae.associate(
                work.host, work.port, ae_title=work.ae_title, max_pdu=settings.node.max_pdu, tls_args=tls
            )
        except OSError as exc:  # an unresolvable host: a failed attempt like any other, not a stuck send
            self.error = connect_error(exc, settings, work.destination, work.host, work.port)
            return
        if self.assoc.is_established:
            prompt_tcp(self.assoc)
        else:
            self.error = tls_failure(tls, work.destination, work.host, work.port) or not_established(
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
