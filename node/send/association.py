"""Associations from the node to a destination: the AE the node calls with, the TCP settings of its
sockets, TLS, and what a refused or failed association means, said so that an administrator can act on it.
Shared by the sender (:mod:`node.send.link`) and ``gradcam-node echo`` (:mod:`node.send.echo`).
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association

from node.config import Settings
from node.dicom_net import configure_pynetdicom
from node.outputs.heatmap import SEGMENTATION_SOP_CLASS
from node.outputs.sc import SC_SOP_CLASS
from node.outputs.sr import SR_SOP_CLASS
from node.tls import ClientContext, describe_tls_error, tls_args

__all__ = [
    "SC_SOP_CLASS",
    "SR_SOP_CLASS",
    "SEG_SOP_CLASS",
    "OUTPUT_SOP_CLASSES",
    "VERIFICATION_SOP_CLASS",
    "STORED_STATUSES",
    "make_ae",
    "prompt_tcp",
    "not_established",
    "connect_error",
    "destination_tls",
    "tls_failure",
]

SEG_SOP_CLASS = SEGMENTATION_SOP_CLASS  # the classes of the node's outputs are their builders'
# Every class the node's outputs can have: proposed on every association, so that a lingering one
# serves the next job's results whatever kinds they are.
OUTPUT_SOP_CLASSES = frozenset({SC_SOP_CLASS, SR_SOP_CLASS, SEG_SOP_CLASS})
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Success, and the warnings that still mean "stored" (coercion, elements discarded, not fully validated).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


def make_ae(settings: Settings) -> AE:
    configure_pynetdicom()
    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = settings.node.acse_timeout_s
    ae.dimse_timeout = settings.node.dimse_timeout_s
    ae.network_timeout = settings.node.network_timeout_s
    ae.connection_timeout = settings.node.acse_timeout_s
    return ae


def prompt_tcp(assoc: Association) -> None:
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


def not_established(
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


def connect_error(exc: OSError, settings: Settings, name: str, host: str, port: int) -> str:
    """What ``ae.associate`` raising means: pynetdicom resolves the host name before it connects."""
    if isinstance(exc, socket.gaierror):
        where = f"the host of [[destinations]] {name!r} in {settings.path}"
        return f"cannot resolve host {host!r}: {exc.strerror or exc}: check {where}"
    return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def destination_tls(settings: Settings, name: str, host: str) -> tuple[ClientContext, str] | None:
    """pynetdicom's ``tls_args`` for the destination called ``name`` (a fresh context: its files are read
    again, so a renewed certificate needs no restart); None for plain DICOM. Raises :class:`ConfigError`."""
    dest = next((d for d in settings.destinations if d.name == name), None)
    if dest is None or dest.tls is None:
        return None
    return tls_args(dest.tls, host)


def tls_failure(args: tuple[ClientContext, str] | None, name: str, host: str, port: int) -> str | None:
    """Why the TLS handshake with a destination failed; None when it did not (or there was no TLS)."""
    if args is None or args[0].error is None:
        return None
    reason = describe_tls_error(args[0].error, "the destination", f"tls.ca of destination {name!r}")
    return f"TLS handshake with {host}:{port} failed: {reason}"
