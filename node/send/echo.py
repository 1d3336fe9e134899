"""``gradcam-node echo DEST``: a C-ECHO to a configured destination, and why it failed if it did."""

from __future__ import annotations

import logging
import time

from pynetdicom import evt

from gradcam.errors import ConfigError
from node.config import Destination, Settings
from node.send.association import (
    VERIFICATION_SOP_CLASS,
    connect_error,
    destination_tls,
    make_ae,
    not_established,
    tls_failure,
)

__all__ = ["echo", "echo_command"]


def echo(settings: Settings, dest: Destination) -> tuple[bool, str, float]:
    """C-ECHO a destination; returns success, a reason on failure, and the round trip in ms."""
    ae = make_ae(settings)
    ae.add_requested_context(VERIFICATION_SOP_CLASS)
    opened: list[bool] = []
    try:
        tls = destination_tls(settings, dest.name, dest.host)
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
        return False, connect_error(exc, settings, dest.name, dest.host, dest.port), 0.0
    if not assoc.is_established:
        failure = tls_failure(tls, dest.name, dest.host, dest.port)
        if failure:
            return False, failure, 0.0
        timeout, elapsed = settings.node.acse_timeout_s, time.perf_counter() - t0
        return False, not_established(assoc, dest.host, dest.port, timeout, bool(opened), elapsed), 0.0
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
