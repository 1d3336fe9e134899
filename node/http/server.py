"""The HTTP server inside ``gradcam-node serve``: status page, job detail, thumbnails, metrics, health.

A standard-library :class:`~http.server.ThreadingHTTPServer` on a daemon thread; GET only. Endpoints:

================  ======  ================================================================================
``/``             token   the status page (:mod:`node.http.page`), refreshing itself
``/job/<id>``     token   one job: instance, association, results, outputs, sends and their attempts
``/thumb/<id>.png`` token a picture output (summary or per-model SC), downscaled (:mod:`node.http.thumbs`)
``/metrics``      token   Prometheus text format (:mod:`node.http.metrics`)
``/healthz``      open    200 "ok" when receiver, worker, sender run and the database answers, else 503
================  ======  ================================================================================

Authentication, when ``[http] token`` is set: ``Authorization: Bearer TOKEN`` (Prometheus:
``authorization: {credentials: TOKEN}``); a browser, which cannot send that header when it navigates, opens
any page once with ``?token=TOKEN`` and is redirected to the same page without it and with an HttpOnly,
SameSite=Strict cookie (a hash of the token, not the token) that the following requests carry. ``/metrics``
is behind the token too: it names the models and the traffic. ``/healthz`` says only what is down.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node.config import Settings
from node.http.health import Liveness, check_health
from node.http.metrics import make_registry, render
from node.http.page import job_page, message_page, overview_page
from node.http.reading import read_only_sessions
from node.http.status import job_detail, overview
from node.http.thumbs import ThumbnailError, Thumbnails

__all__ = ["Response", "StatusApp", "StatusServer", "start_http"]

log = logging.getLogger("node.http")

_JOB = re.compile(r"^/job/([0-9]{1,18})$")
_THUMB = re.compile(r"^/thumb/([0-9]{1,18})\.png$")
_OPEN = ("/healthz",)
_LOCAL_PATH = re.compile(r"^/(?![/\\])[A-Za-z0-9/._-]*$")
_REQUEST_TIMEOUT_S = 15.0  # a client that sends nothing does not keep a thread forever


@dataclass
class Response:
    """What a request gets: status, body and headers (Content-Type included)."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: int, text: str, **headers: str) -> Response:
    return Response(status, (text + "\n").encode("utf-8"), headers=dict(headers))


class StatusApp:
    """Routes a GET to its answer; no sockets here, so that it can be tested on its own."""

    def __init__(self, settings: Settings, sessions: sessionmaker, liveness: Liveness) -> None:
        self.settings = settings
        self.sessions = sessions  # the node's: /healthz checks that it can take the write lock
        self.liveness = liveness
        self.reads, self._reader = read_only_sessions(sessions)  # page, metrics, thumbnails
        self.registry = make_registry(self.reads, settings, liveness)
        self.thumbnails = Thumbnails(self.reads, settings.node.storage_dir)
        self.title = f"gradcam-node {settings.node.ae_title}"
        token = settings.http.token
        self._token = token.encode("utf-8") if token else None
        # the cookie is per host, not per port: two nodes on one host must not overwrite each other's
        self.cookie_name = f"gradcam_node_{settings.http.port}"
        self._cookie_value = (
            hashlib.sha256(b"gradcam-node status page\0" + self._token).hexdigest() if token else ""
        )

    def close(self) -> None:
        """Let go of the reading engine, if one was made."""
        if self._reader is not None:
            self._reader.dispose()

    # --- authentication ------------------------------------------------------------------------------

    def _bearer_ok(self, headers: Mapping[str, str]) -> bool:
        scheme, _, value = (headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and self._token_ok(value.strip())

    def _token_ok(self, value: str) -> bool:
        return self._token is not None and hmac.compare_digest(value.encode("utf-8"), self._token)

    def _cookie_ok(self, headers: Mapping[str, str]) -> bool:
        try:
            jar = SimpleCookie(headers.get("Cookie") or "")
        except CookieError:
            return False
        morsel = jar.get(self.cookie_name)
        return morsel is not None and hmac.compare_digest(morsel.value, self._cookie_value)

    def _authenticate(
        self, path: str, query: dict[str, list[str]], headers: Mapping[str, str]
    ) -> Response | None:
        """None when the request may go on; else the 401, or the redirect that sets the cookie."""
        if self._token is None or path in _OPEN:
            return None
        if "token" in query:
            if not self._token_ok(query["token"][-1]):
                return self._unauthorised("the token in the URL is not this node's")
            rest = {k: v for k, v in query.items() if k != "token"}
            # back to a page of this server only: "/\\host" or "//host" would leave it
            location = path if _LOCAL_PATH.match(path) else "/"
            location += "?" + urlencode(rest, doseq=True) if rest else ""
            cookie = f"{self.cookie_name}={self._cookie_value}; Path=/; HttpOnly; SameSite=Strict"
            return Response(HTTPStatus.SEE_OTHER, b"", headers={"Location": location, "Set-Cookie": cookie})
        if self._bearer_ok(headers) or self._cookie_ok(headers):
            return None
        return self._unauthorised("this node's status pages need its token")

    def _unauthorised(self, why: str) -> Response:
        return _text(
            HTTPStatus.UNAUTHORIZED,
            f"401 unauthorised: {why}: send 'Authorization: Bearer TOKEN', or open the page once with "
            "?token=TOKEN in a browser ([http] token in the node's configuration)",
            **{"WWW-Authenticate": 'Bearer realm="gradcam-node"'},
        )

    # --- routing --------------------------------------------------------------------------------------

    def get(self, target: str, headers: Mapping[str, str]) -> Response:
        """The answer to ``GET target``."""
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query, keep_blank_values=True)
        denied = self._authenticate(path, query, headers)
        if denied is not None:
            return denied
        try:
            if path == "/healthz":
                return self._health()
            if path == "/metrics":
                return Response(HTTPStatus.OK, render(self.registry), CONTENT_TYPE_LATEST)
            if path in ("/", "/index.html"):
                return self._overview()
            if m := _JOB.match(path):
                return self._job(int(m.group(1)))
            if m := _THUMB.match(path):
                return self._thumb(int(m.group(1)))
        except SQLAlchemyError as exc:
            log.warning("status page: the database could not be read: %s", exc)
            return self._html(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "database unavailable",
                "the database does not answer; see the node's log",
            )
        return self._html(HTTPStatus.NOT_FOUND, "not found", f"nothing at {path}")

    def _html(self, status: int, title: str, message: str) -> Response:
        nonce = secrets.token_urlsafe(16)
        return self._page(status, message_page(f"{status} {title}", message, nonce), nonce)

    def _page(self, status: int, html: str, nonce: str) -> Response:
        csp = (
            f"default-src 'none'; img-src 'self'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        return Response(
            status, html.encode("utf-8"), "text/html; charset=utf-8", {"Content-Security-Policy": csp}
        )

    def _health(self) -> Response:
        health = check_health(self.liveness, self.sessions)
        if health.ok:
            return _text(HTTPStatus.OK, "ok: " + ", ".join(f"{name} up" for name in health.parts))
        return _text(HTTPStatus.SERVICE_UNAVAILABLE, "unhealthy: " + "; ".join(health.problems))

    def _overview(self) -> Response:
        with self.reads() as s:
            o = overview(s, self.settings, self.settings.http.recent)
        nonce = secrets.token_urlsafe(16)
        return self._page(HTTPStatus.OK, overview_page(o, self.title, nonce), nonce)

    def _job(self, job_id: int) -> Response:
        with self.reads() as s:
            record = job_detail(s, job_id)
        if record is None:
            return self._html(HTTPStatus.NOT_FOUND, "not found", f"no job {job_id}")
        nonce = secrets.token_urlsafe(16)
        return self._page(HTTPStatus.OK, job_page(record, self.title, nonce), nonce)

    def _thumb(self, output_id: int) -> Response:
        try:
            png = self.thumbnails.png(output_id)
        except ThumbnailError as exc:
            if exc.status >= 500:
                log.warning("status page: no thumbnail: %s", exc)
            return _text(exc.status, str(exc))
        return Response(HTTPStatus.OK, png, "image/png", {"Cache-Control": "private, max-age=3600"})


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = _REQUEST_TIMEOUT_S
    server_version = "gradcam-node"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        try:
            response = self.server.app.get(self.path, self.headers)
        except Exception:  # the client gets a 500, the log the traceback; the server goes on
            log.exception("status page: error answering %s %s", self.command, urlsplit(self.path).path)
            response = _text(HTTPStatus.INTERNAL_SERVER_ERROR, "500 internal error: see the node's log")
        self.send_response(response.status)
        headers = {
            "Content-Type": response.content_type,
            "Content-Length": str(len(response.body)),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            **response.headers,
        }
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: StatusApp

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's name (socket.getfqdn), which can hang for
        # seconds where no DNS answers; the name is never used here
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


class StatusServer:
    """The running HTTP server; :meth:`stop` closes it."""

    def __init__(self, app: StatusApp, bind: str, port: int) -> None:
        family = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._server = server_class((bind, port), _Handler)  # binds: OSError when it cannot
        self._server.app = app
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket (requests in flight finish on their daemon threads)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
        self._server.app.close()


def start_http(settings: Settings, sessions: sessionmaker, liveness: Liveness) -> StatusServer | None:
    """Start the server of ``[http]``; None when ``enabled = false``.

    Raises :class:`OSError` when ``bind:port`` cannot be bound (``socket.gaierror`` for a bad name).
    """
    cfg = settings.http
    if not cfg.enabled:
        return None
    server = StatusServer(StatusApp(settings, sessions, liveness), cfg.bind, cfg.port)
    host, port = server.address
    auth = "bearer token required" if cfg.token else "no token"
    log.info("status page on http://%s:%d/ (%s; /metrics, /healthz)", host, port, auth)
    if not cfg.token and cfg.bind not in ("127.0.0.1", "::1", "localhost"):
        log.warning(
            "[http] bind is %s and [http] token is empty: whoever reaches port %d sees the jobs' UIDs",
            cfg.bind,
            port,
        )
    return server
