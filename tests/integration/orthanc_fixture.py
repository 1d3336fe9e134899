"""Debian's Orthanc as a test peer: loopback, free ports, temporary storage, the project's config and Lua.

Use in a test module::

    from tests.integration.orthanc_fixture import orthanc_factory_fixture  # noqa: F401  (the fixture)

    def test_x(orthanc_factory):
        orthanc = orthanc_factory(node_port=11112)   # started; stopped at teardown
        orthanc.client.get_json("/system")

The configuration is ``config/orthanc/orthanc.json`` with the ports, storage folder, Lua path and node address
replaced (``node.ops.orthanc.local_orthanc_config``) and the routing script ``config/orthanc/autorouting.lua``
unchanged, so the tests exercise the files a site deploys.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node.ops.orthanc import ORTHANC_BINARY, LocalOrthanc, OrthancClient
from node.ops.peers import STORESCU, free_port

__all__ = [
    "require_orthanc",
    "orthanc_factory_fixture",
    "wait_for",
    "study_series",
    "OrthancFactory",
    "DCMTK",
]

DCMTK = Path("/usr/bin")

OrthancFactory = Callable[..., LocalOrthanc]


def require_orthanc() -> None:
    """Skip (with the reason) when Debian's Orthanc or DCMTK's storescu is not installed."""
    for tool in (ORTHANC_BINARY, STORESCU):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed (apt-get install orthanc dcmtk)")


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(name="orthanc_factory")
def orthanc_factory_fixture(tmp_path: Path) -> Iterator[OrthancFactory]:
    """Start Orthanc instances (``factory(node_port=..., node_host=..., dicom_port=..., http_port=...)``).

    Each is started before it is returned and stopped at teardown; its ``orthanc.log`` is printed when the
    test failed, to show what Orthanc and the Lua script did.
    """
    require_orthanc()
    started: list[LocalOrthanc] = []

    def factory(
        *,
        node_port: int,
        node_host: str = "127.0.0.1",
        dicom_port: int | None = None,
        http_port: int | None = None,
        start: bool = True,
    ) -> LocalOrthanc:
        orthanc = LocalOrthanc(
            tmp_path / f"orthanc{len(started)}",
            dicom_port=dicom_port or free_port(),
            http_port=http_port or free_port(),
            node_port=node_port,
            node_host=node_host,
        )
        started.append(orthanc)
        if start:
            orthanc.start()
        return orthanc

    yield factory
    for orthanc in started:
        orthanc.stop()
        print(f"--- {orthanc.log_path} (tail) ---\n{orthanc.log_tail(6000)}")


def study_series(client: OrthancClient, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Instances of a study grouped by Series Instance UID."""
    out: dict[str, list[dict[str, Any]]] = {}
    for inst in client.study_instances(study_uid):
        out.setdefault(inst["SeriesInstanceUID"], []).append(inst)
    return out
