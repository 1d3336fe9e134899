"""DICOM TLS for both sides of the node: the SCP's context from ``[node.tls]``, the sender's from a
destination's ``tls`` table, the start-up check of their files, the SCP's TLS server and plain words for a
failed handshake.

Both sides: TLS 1.2 or later, certificates verified against the configured CA file (never the system's
store: a PACS's CA is the site's own). The SCP asks clients for a certificate and refuses one without a
valid one unless ``require_client_certificate = false``; the sender checks the destination's name
(``server_name``, else its ``host``) unless ``verify_hostname = false``. The files are read when a context
is made: at start for the SCP, at each association for the sender (a renewed certificate is used at the
next association, without a restart).

A failed handshake is one WARNING line naming the peer and why (the SCP), or the send's recorded error
(the sender); it never stops the server. pynetdicom's own server makes the handshake in the thread that
accepts connections, with no deadline, and drops a failure without a word; :class:`TlsAssociationServer`
makes it in the connection's own thread, within ``acse_timeout_s``.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from gradcam.errors import ConfigError
from node.config import DestinationTls, NodeTls, Settings

__all__ = [
    "MIN_VERSION",
    "ClientContext",
    "server_context",
    "client_context",
    "tls_args",
    "check_files",
    "expiry_warning",
    "describe_tls_error",
    "TlsAssociationServer",
    "start_tls_server",
]

log = logging.getLogger(__name__)

MIN_VERSION = ssl.TLSVersion.TLSv1_2
_TLS_HANDSHAKE = 0x16  # first byte of a TLS record carrying a handshake (a ClientHello)
_A_ASSOCIATE_RQ = 0x01  # first byte of a plain DICOM association request
_AE_TITLES_END = 42  # its called (bytes 10-25) and calling (26-41) AE titles end here (PS3.8 9.3.2)
_EXPIRY_WARNING_DAYS = 14


class _EncryptedKey(Exception):
    """Raised by the password callback: the node cannot ask anyone for a key's password."""


def _no_password() -> bytes:
    raise _EncryptedKey


def _load_ca(ctx: ssl.SSLContext, path: Path, config_file: str, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except OSError as exc:
        raise _file_error(exc, path, config_file, key, "a PEM file of CA certificates") from None


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path, config_file: str, prefix: str) -> None:
    """The certificate, then its key, so that a failure names the file at fault."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(cert))  # parses every certificate in the file
    except OSError as exc:
        raise _file_error(exc, cert, config_file, f"{prefix}.certificate", "a PEM certificate") from None
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            config_file,
            f"{prefix}.key",
            f"{key} is encrypted: the node needs an unencrypted key (protect it by its file permissions, "
            f"chmod 600; decrypt with: openssl pkey -in {key} -out KEY.pem)",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            expected = f"{key} is not the key of {prefix}.certificate {cert}"
        else:
            expected = f"{key} is not a PEM private key ({_ssl_text(exc)})"
        raise ConfigError(config_file, f"{prefix}.key", expected) from None
    except OSError as exc:
        raise _file_error(exc, key, config_file, f"{prefix}.key", "a PEM private key") from None


def _file_error(exc: OSError, path: Path, config_file: str, key: str, what: str) -> ConfigError:
    if isinstance(exc, ssl.SSLError):
        detail = f"is not {what} ({_ssl_text(exc)})"
    elif path.is_dir():
        detail = f"is a folder, not {what}"
    else:
        detail = f"cannot be read ({exc.strerror or exc})"
    return ConfigError(config_file, key, f"{path} {detail}")


def server_context(tls: NodeTls) -> ssl.SSLContext:
    """The SCP's context; raises :class:`ConfigError` naming the key and the file that cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load_pair(ctx, tls.certificate, tls.key, tls.config_file, "node.tls")
    if tls.ca is not None:
        _load_ca(ctx, tls.ca, tls.config_file, "node.tls.ca")
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL  # no certificate is fine; an invalid one is not
    return ctx


class _RecordingSocket(ssl.SSLSocket):
    """Notes the first TLS error on its context: pynetdicom logs it (silenced in the node) and keeps only
    "not established", and the sender wants to say why."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._note(exc)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:  # ssl.SSLSocket's signature
        try:
            return super().read(len, buffer)
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate arrives after the handshake
            self._note(exc)
            raise

    def _note(self, exc: OSError) -> None:
        ctx = self.context
        if isinstance(ctx, ClientContext) and ctx.error is None:
            ctx.error = exc


class ClientContext(ssl.SSLContext):
    """A client context that keeps the first TLS error of its connection in :attr:`error`; one context
    per association."""

    error: OSError | None = None


def client_context(tls: DestinationTls) -> ClientContext:
    """The sender's context for one association with a destination; raises :class:`ConfigError`."""
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslsocket_class = _RecordingSocket
    ctx.minimum_version = MIN_VERSION
    ctx.check_hostname = tls.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, tls.ca, tls.config_file, f"{tls.key_prefix}.ca")
    if tls.certificate is not None and tls.key is not None:
        _load_pair(ctx, tls.certificate, tls.key, tls.config_file, tls.key_prefix)
    return ctx


def tls_args(tls: DestinationTls, host: str) -> tuple[ClientContext, str]:
    """pynetdicom's ``tls_args`` for an association with ``host``: a fresh context, and the name the
    destination's certificate must carry (``server_name``, else ``host``)."""
    return client_context(tls), tls.server_name or host


def check_files(settings: Settings) -> None:
    """Read every TLS file of the configuration (the SCP's and each destination's): raises
    :class:`ConfigError` naming the key and the file at fault; logs a warning for a destination's client
    certificate that has expired or expires within two weeks (the node's own is told when its server starts,
    :func:`start_tls_server`: once)."""
    if settings.node.tls is not None:
        server_context(settings.node.tls)
    for dest in settings.destinations:
        if dest.tls is not None:
            client_context(dest.tls)
            if dest.tls.certificate is not None:
                _warn_expiry(dest.tls.certificate, f"{dest.tls.key_prefix}.certificate")


def expiry_warning(cert: Path, key: str, now: datetime | None = None) -> str | None:
    """A warning when ``cert`` has expired or expires within two weeks; None otherwise (or when the date
    cannot be read)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's, no public one
    try:
        not_after = datetime.fromtimestamp(ssl.cert_time_to_seconds(decode(str(cert))["notAfter"]), UTC)
    except Exception:  # noqa: BLE001 - only a warning: unknown format, other Python
        return None
    now = now or datetime.now(UTC)
    if not_after <= now:
        return f"{key} {cert} expired on {not_after:%Y-%m-%d}: peers will refuse it; renew it"
    days = (not_after - now).days
    if days < _EXPIRY_WARNING_DAYS:
        return f"{key} {cert} expires on {not_after:%Y-%m-%d} (in {days} days): renew it"
    return None


def _warn_expiry(cert: Path, key: str) -> None:
    warning = expiry_warning(cert, key)
    if warning:
        log.warning("%s", warning)


# --- what a failed handshake means ---------------------------------------------------------------------

_SSL_NOISE = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] |^\[[A-Z0-9_]+\] | \(_ssl\.c:\d+\)$")

# OpenSSL's reason -> what it means; {peer} is the other end ("the client", "the destination")
_REASONS: dict[str, str] = {
    "WRONG_VERSION_NUMBER": "{peer} did not answer in TLS (is TLS enabled on its port?)",
    "UNEXPECTED_EOF_WHILE_READING": "{peer} closed the connection during the handshake",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "{peer} sent no certificate, and one is required",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "{peer} requires a client certificate (tls.certificate, tls.key)",
    "TLSV1_ALERT_UNKNOWN_CA": "{peer} does not trust the CA that signed the node's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "{peer} refused the node's certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "{peer} refused the node's certificate: it has expired",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "{peer} found no TLS version or cipher in common",
    "TLSV1_ALERT_PROTOCOL_VERSION": "{peer} found no TLS version in common (1.2 or later here)",
    "NO_SHARED_CIPHER": "no cipher in common with {peer}",
    "UNSUPPORTED_PROTOCOL": "{peer} offered only TLS versions older than 1.2",
}
_UNKNOWN_ISSUER = ("local issuer", "self-signed", "self signed", "first certificate", "signature failure")


def _ssl_text(exc: BaseException) -> str:
    """OpenSSL's message without the bracketed codes and the C source line."""
    text = str(exc.args[1]) if isinstance(exc, OSError) and len(exc.args) > 1 else str(exc)
    return _SSL_NOISE.sub("", text).strip() or type(exc).__name__


def _verify_failure(exc: ssl.SSLCertVerificationError, peer: str, ca_key: str) -> str:
    message = str(exc.verify_message or _ssl_text(exc))
    if any(s in message for s in _UNKNOWN_ISSUER):
        return f"{peer}'s certificate is not signed by a CA in {ca_key} ({message})"
    if "expired" in message:
        return f"{peer}'s certificate has expired"
    if "not yet valid" in message:
        return f"{peer}'s certificate is not valid yet (check both clocks)"
    if "mismatch" in message:
        return (
            f"{peer}'s certificate is not for this name ({message}): set tls.server_name to a name in it, "
            "or tls.verify_hostname = false"
        )
    return f"{peer}'s certificate failed verification: {message}"


def describe_tls_error(exc: BaseException, peer: str = "the peer", ca_key: str = "the CA file") -> str:
    """Why a handshake failed, in a clause: ``peer`` names the other end (``the client``), ``ca_key`` the
    setting that holds the CA its certificate is checked against (``node.tls.ca``)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _verify_failure(exc, peer, ca_key)
    if isinstance(exc, ssl.SSLEOFError | ConnectionError):
        return f"{peer} closed the connection during the handshake (does it speak TLS on this port?)"
    if isinstance(exc, TimeoutError):
        return f"no TLS answer from {peer} in time"
    if isinstance(exc, ssl.SSLError):
        meaning = _REASONS.get(str(exc.reason or ""))
        text = _ssl_text(exc)
        return f"{meaning.format(peer=peer)} ({text})" if meaning else text
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


# --- the SCP's TLS server --------------------------------------------------------------------------------


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with each connection's TLS handshake in that connection's thread.

    The listening thread only accepts; the connection's thread looks at the first byte (a plain DICOM
    association request is named as such), makes the handshake within ``handshake_timeout_s`` and hands
    the TLS socket to pynetdicom. A failure is one WARNING line with the peer's address and the reason,
    and the connection is closed; nothing else is affected.
    """

    def __init__(self, *args: Any, handshake_timeout_s: float = 30.0, **kwargs: Any) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # TLS is set up in the connection's thread (process_request_thread)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        tls = self._handshake(request, client_address)
        if tls is not None:
            super().process_request_thread(tls, client_address)

    def _handshake(self, raw: socket.socket, address: Any) -> ssl.SSLSocket | None:
        peer = f"{address[0]}:{address[1]}"
        assert self.ssl_context is not None
        timeout = raw.gettimeout()
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(self.handshake_timeout_s)
            first = raw.recv(1, socket.MSG_PEEK)
            if not first:
                log.debug("connection from %s closed before any TLS handshake", peer)
            elif first[0] != _TLS_HANDSHAKE:
                what = _plain_request(raw) if first[0] == _A_ASSOCIATE_RQ else "no TLS"
                log.warning(
                    "connection from %s refused: it sent %s, but this port takes DICOM over TLS only "
                    "([node.tls]): the peer must use TLS",
                    peer,
                    what,
                )
            else:
                tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                tls.do_handshake()
                tls.settimeout(timeout)
                return tls
        except OSError as exc:  # ssl.SSLError and timeouts included
            reason = describe_tls_error(exc, "the client", "node.tls.ca")
            log.warning("TLS handshake with %s failed: %s; connection closed", peer, reason)
        _close(tls if tls is not None else raw)
        return None


def _plain_request(raw: socket.socket) -> str:
    """What a plain A-ASSOCIATE-RQ asks for, from its header (peeked: nothing is consumed), so that the
    administrator can tell which peer lacks TLS."""
    what = "a plain DICOM association request"
    try:
        head = raw.recv(_AE_TITLES_END, socket.MSG_PEEK)
    except OSError:
        return what
    if len(head) < _AE_TITLES_END:
        return what
    called, calling = (head[i : i + 16].decode("ascii", "replace").strip() for i in (10, 26))
    return f"{what} (calling AE {calling!r}, called AE {called!r})"


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
    sock.close()


def start_tls_server(
    ae: AE,
    address: tuple[str, int],
    tls: NodeTls,
    evt_handlers: list[Any],
    handshake_timeout_s: float,
) -> TlsAssociationServer:
    """``ae.start_server(address, block=False, ssl_context=..., evt_handlers=...)`` with a
    :class:`TlsAssociationServer` and the context of ``tls``; ``server.shutdown()`` stops it.

    Raises :class:`ConfigError` naming the key and the file that cannot be used, :class:`OSError` when the
    address cannot be bound.
    """
    context = server_context(tls)
    _warn_expiry(tls.certificate, "node.tls.certificate")
    if tls.require_client_certificate:
        clients = f"clients need a certificate signed by a CA in {tls.ca}"
    elif tls.ca is not None:
        clients = f"client certificates optional (checked against {tls.ca} when sent)"
    else:
        clients = "client certificates not asked for"
    log.info("DICOM over TLS only (TLS 1.2 or later), certificate %s; %s", tls.certificate, clients)
    server = ae.make_server(
        address,
        ssl_context=context,
        evt_handlers=evt_handlers,
        server_class=TlsAssociationServer,
        handshake_timeout_s=handshake_timeout_s,
    )
    serve: Callable[[], None] = make_target(server.serve_forever)
    thread = threading.Thread(target=serve, name=f"TlsAcceptorServer@{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it again
    return server
