"""The receiving side of the node: a pynetdicom AE answering C-ECHO and C-STORE.

Every storage SOP class is accepted (:data:`STORAGE_SOP_CLASSES`: pynetdicom's
``AllStoragePresentationContexts`` plus the retired classes of ``StoragePresentationContexts``, 184 in all;
pynetdicom's limit of 128 contexts applies to *requested* contexts only, not to supported ones), each with
every transfer syntax of :data:`TRANSFER_SYNTAXES`, so a PACS that routes a whole study is never refused;
only frontal chest CR/DX are analysed (``node.receive.triage``).

C-STORE statuses (the peer never sees a Python exception):

======  =====================================================================================
0x0000  stored durably (spool file fsynced, instance + job committed), or already stored before
0xA700  out of resources: free disk below ``min_free_disk_mb``, disk or database failure; retry later
0xC210  the dataset cannot be decoded (header unreadable)
0xC211  SOP Instance UID or Study Instance UID missing or invalid (``^[0-9]+(\\.[0-9]+)*$``, 64 chars
        max), or the dataset's SOP Instance UID differs from the request's; not stored, since a UID
        names the spool file
0xC212  unexpected internal error (a bug; logged with its traceback)
======  =====================================================================================

Failures carry an Error Comment (0000,0902) saying why.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import sessionmaker

from gradcam.eligibility import DEFAULT_MIN_SIDE
from node.config import NodeConfig
from node.db import AssociationStatus, utcnow
from node.dicom_net import configure_pynetdicom
from node.queue import JobSignal
from node.receive.spool import valid_uid
from node.receive.store import (
    CONN_CLOSED_REASON,
    AssociationLog,
    InstanceStore,
    OutOfResourcesError,
    Received,
    StoreOutcome,
)
from node.receive.triage import triage
from node.tls import start_tls_server

__all__ = [
    "TRANSFER_SYNTAXES",
    "STORAGE_SOP_CLASSES",
    "SUCCESS",
    "OUT_OF_RESOURCES",
    "CANNOT_DECODE",
    "INVALID_UID",
    "PROCESSING_FAILURE",
    "ScpContext",
    "build_ae",
    "make_handlers",
    "start_scp",
    "handle_echo",
    "handle_store",
]

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGExtended12Bit,  # .4.51
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEGLSNearLossless,  # .4.81
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    RLELossless,  # .5
)

# Every storage SOP class pynetdicom knows: the current ones (AllStoragePresentationContexts) plus the
# retired ones still in StoragePresentationContexts (old US, NM... devices send them).
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(
    dict.fromkeys(
        str(cx.abstract_syntax) for cx in (*AllStoragePresentationContexts, *StoragePresentationContexts)
    )
)

SUCCESS = 0x0000
_CALLED_AE_NOT_RECOGNISED = 0x07  # A-ASSOCIATE-RJ diagnostic of the service user (PS3.8 9.3.4)
OUT_OF_RESOURCES = 0xA700
CANNOT_DECODE = 0xC210
INVALID_UID = 0xC211
PROCESSING_FAILURE = 0xC212


@dataclass
class _AssocState:
    """What we keep about a live association (in memory, for its log lines and its row id)."""

    started_at: datetime
    row_id: int | None = None
    stored: int = 0
    failed: int = 0


@dataclass
class ScpContext:
    """Everything the event handlers need; passed to them as their extra argument (no module state)."""

    node: NodeConfig
    store: InstanceStore
    associations: AssociationLog
    min_side: int = DEFAULT_MIN_SIDE  # [preprocess] min_side: smaller images are skipped at reception
    _states: weakref.WeakKeyDictionary[Any, _AssocState] = field(default_factory=weakref.WeakKeyDictionary)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def state(self, assoc: Any) -> _AssocState:
        """The state of ``assoc``, created on first use (entries go when the association object does)."""
        with self._lock:
            st = self._states.get(assoc)
            if st is None:
                st = self._states[assoc] = _AssocState(started_at=utcnow())
            return st


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def _peer(event: Event) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title} ({r.address}:{r.port})"


def handle_echo(event: Event, ctx: ScpContext) -> int:
    """C-ECHO: always 0x0000 (Success)."""
    log.debug("C-ECHO from %s", _peer(event))
    return SUCCESS


def handle_store(event: Event, ctx: ScpContext) -> Dataset:
    """C-STORE: make the instance durable, record it with its job, then answer.

    Returns
    -------
    pydicom.dataset.Dataset
        Status 0x0000 (stored, or a duplicate already stored), 0xA700 (out of resources: low disk, disk or
        database failure), 0xC210 (cannot decode), 0xC211 (missing/invalid UID) or 0xC212 (internal
        error), with an Error Comment on failure.
    """
    st = ctx.state(event.assoc)
    try:
        rsp = _store(event, ctx, st)
    except Exception:  # the peer must get a status, never a dropped association
        log.exception("C-STORE from %s: unexpected error", _peer(event))
        rsp = _status(PROCESSING_FAILURE, "internal error in the node (logged)")
    if rsp.Status != SUCCESS:
        st.failed += 1
        ctx.associations.count_failure(st.row_id)
        log.warning(
            "instance refused from %s: status 0x%04X %s",
            _peer(event),
            rsp.Status,
            rsp.get("ErrorComment", ""),
        )
    else:
        st.stored += 1
    return rsp


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _received(event: Event, st: _AssocState, min_side: int) -> Received | Dataset:
    """The header facts of a C-STORE request, or the failure status to answer."""
    try:
        ds = event.dataset
        sop_uid, study_uid = _text(ds, "SOPInstanceUID"), _text(ds, "StudyInstanceUID")
        series_uid, sop_class = _text(ds, "SeriesInstanceUID"), _text(ds, "SOPClassUID")
        modality, patient_id = _text(ds, "Modality"), _text(ds, "PatientID")
    except Exception as exc:  # pydicom raises many kinds on broken data
        log.warning("C-STORE from %s: cannot decode dataset: %s", _peer(event), exc)
        return _status(CANNOT_DECODE, "cannot decode the dataset")
    for name, uid in (("SOP Instance UID", sop_uid), ("Study Instance UID", study_uid)):
        if not valid_uid(uid):
            return _status(INVALID_UID, f"missing or invalid {name}")
    if sop_uid != str(event.request.AffectedSOPInstanceUID or "").strip():
        return _status(INVALID_UID, "SOP Instance UID differs from the request's")
    try:
        analysable, reason = triage(ds, min_side)
    except Exception as exc:  # header values triage cannot read: keep the instance, do not analyse it
        analysable, reason = False, f"unreadable header ({exc.__class__.__name__})"
    return Received(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class or str(event.request.AffectedSOPClassUID),
        study_instance_uid=study_uid,
        series_instance_uid=series_uid if valid_uid(series_uid) else "",
        patient_id=patient_id[:64],
        modality=modality[:16] or None,
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=event.assoc.requestor.ae_title.strip(),
        association_id=st.row_id,
        analysable=analysable,
        skip_reason=reason,
    )


def _store(event: Event, ctx: ScpContext, st: _AssocState) -> Dataset:
    try:
        ctx.store.check_space()  # before decoding anything: refusing must be cheap
    except OutOfResourcesError as exc:
        log.error("refusing C-STORE: %s", exc)
        return _status(OUT_OF_RESOURCES, "out of disk space")
    rec = _received(event, st, ctx.min_side)
    if isinstance(rec, Dataset):
        return rec
    sop_uid, modality = rec.sop_instance_uid, rec.modality
    try:
        # The bytes exactly as received, with file meta: compressed pixel data stays byte for byte.
        result = ctx.store.store(rec, event.encoded_dataset(include_meta=True))
    except OutOfResourcesError as exc:
        log.error("cannot store %s: %s", sop_uid, exc)
        return _status(OUT_OF_RESOURCES, "out of resources (disk or database)")
    if result.outcome is StoreOutcome.DUPLICATE:
        log.info("instance %s from %s: duplicate, already stored (not queued again)", sop_uid, _peer(event))
    elif rec.analysable:
        log.info(
            "instance %s stored (%s, %s); job %s queued",
            sop_uid,
            modality,
            rec.transfer_syntax,
            result.job_id,
        )
    else:
        log.info(
            "instance %s stored (%s); job %s skipped: %s", sop_uid, modality, result.job_id, rec.skip_reason
        )
    return _status(SUCCESS)


def handle_requested(event: Event, ctx: ScpContext) -> None:
    """EVT_REQUESTED: note when the association began (the row is written once accepted or rejected)."""
    ctx.state(event.assoc)


def handle_accepted(event: Event, ctx: ScpContext) -> None:
    """EVT_ACCEPTED: record the association as ``accepted``."""
    a = event.assoc
    st = ctx.state(a)
    st.row_id = ctx.associations.open(
        a.requestor.ae_title.strip(),
        a.acceptor.ae_title.strip(),
        str(a.requestor.address),
        int(a.requestor.port),
        AssociationStatus.ACCEPTED,
        started_at=st.started_at,
    )
    log.info("association %s accepted from %s", st.row_id, _peer(event))


def handle_rejected(event: Event, ctx: ScpContext) -> None:
    """EVT_REJECTED: record the association as ``rejected`` with the reason of its A-ASSOCIATE-RJ, and the
    called AE title the peer asked for."""
    a = event.assoc
    st = ctx.state(a)
    rj = a.acceptor.primitive
    ours = a.acceptor.ae_title.strip()
    rq = a.requestor.primitive
    called = str(getattr(rq, "called_ae_title", "") or ours).strip()
    try:
        if rj.result_source == 0x01 and rj.diagnostic == _CALLED_AE_NOT_RECOGNISED:
            reason = f"called AE title {called!r} is not this node's ({ours})"
        else:
            reason = f"{rj.result_str}, {rj.source_str}: {rj.reason_str}"
    except Exception:  # only for the log text
        reason = "rejected"
    st.row_id = ctx.associations.open(
        a.requestor.ae_title.strip(),
        called,
        str(a.requestor.address),
        int(a.requestor.port),
        AssociationStatus.REJECTED,
        reason=reason,
        started_at=st.started_at,
    )
    log.warning("association rejected from %s: %s", _peer(event), reason)


def _ended(event: Event, ctx: ScpContext, status: AssociationStatus, reason: str | None) -> None:
    st = ctx.state(event.assoc)
    ctx.associations.close(st.row_id, status, reason)
    log.info(
        "association %s %s%s (%d stored, %d refused)",
        st.row_id,
        status.value,
        f": {reason}" if reason else "",
        st.stored,
        st.failed,
    )


def handle_released(event: Event, ctx: ScpContext) -> None:
    """EVT_RELEASED: the peer released the association."""
    _ended(event, ctx, AssociationStatus.RELEASED, None)


def handle_aborted(event: Event, ctx: ScpContext) -> None:
    """EVT_ABORTED: the association was aborted (by the peer, or by us on a timeout)."""
    _ended(event, ctx, AssociationStatus.ABORTED, "A-ABORT")


def handle_conn_close(event: Event, ctx: ScpContext) -> None:
    """EVT_CONN_CLOSE: an association still open when its TCP connection closes is recorded as aborted."""
    a = event.assoc
    if a.is_established and not (a.is_released or a.is_aborted):
        st = ctx.state(a)
        ctx.associations.close(st.row_id, AssociationStatus.ABORTED, CONN_CLOSED_REASON)


def make_handlers(ctx: ScpContext) -> list[tuple[Any, Any, list[Any]]]:
    """The event handlers, each bound to ``ctx``."""
    return [
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_ACCEPTED, handle_accepted, [ctx]),
        (evt.EVT_REJECTED, handle_rejected, [ctx]),
        (evt.EVT_RELEASED, handle_released, [ctx]),
        (evt.EVT_ABORTED, handle_aborted, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_conn_close, [ctx]),
    ]


def build_ae(node: NodeConfig) -> AE:
    """The AE: every storage SOP class plus Verification, with the transfer syntaxes above; associations
    must call ``node.ae_title`` and, when ``allowed_calling_aets`` is set, come from one of those."""
    configure_pynetdicom()
    ae = AE(ae_title=node.ae_title)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, list(TRANSFER_SYNTAXES))
    # A peer that calls another AE title has the wrong node (or a typo in its configuration): refused with
    # A-ASSOCIATE-RJ rejected-permanent, service user, "called AE title not recognised".
    ae.require_called_aet = True
    if node.allowed_calling_aets:
        # pynetdicom answers others with A-ASSOCIATE-RJ: rejected-permanent, service user,
        # "calling AE title not recognised".
        ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.maximum_pdu_size = node.max_pdu
    return ae


def start_scp(
    node: NodeConfig,
    sessions: sessionmaker,
    job_signal: JobSignal,
    content_key: str | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
) -> ThreadedAssociationServer:
    """Start listening on ``node.bind:node.port`` (returns at once; ``server.shutdown()`` stops it).

    ``content_key``: see :class:`node.receive.store.InstanceStore` (images received again are re-analysed when
    their results were made with another configuration); ``min_side``: ``[preprocess] min_side``.

    With ``node.tls`` the port takes DICOM over TLS only (:mod:`node.tls`: the handshake in the
    connection's own thread, within ``acse_timeout_s``; a failed one is a warning naming the peer).

    Raises :class:`OSError` when the address cannot be bound, :class:`~gradcam.errors.ConfigError` naming
    the key and the file when a ``[node.tls]`` file cannot be used.
    """
    ctx = ScpContext(
        node=node,
        store=InstanceStore(
            node.storage_dir, sessions, job_signal, node.min_free_disk_mb * 2**20, content_key
        ),
        associations=AssociationLog(sessions),
        min_side=min_side,
    )
    ae = build_ae(node)
    if node.tls is None:
        return ae.start_server((node.bind, node.port), block=False, evt_handlers=make_handlers(ctx))
    return start_tls_server(ae, (node.bind, node.port), node.tls, make_handlers(ctx), node.acse_timeout_s)
