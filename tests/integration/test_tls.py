"""DICOM TLS both ways, against DCMTK's own TLS tools, with a CA and certificates made by the test.

One node (``[node.tls]``, client certificates required) for the module, with two destinations on one DCMTK
``storescp +tls`` (which requires the node's client certificate): ``pacs`` trusts the right CA, ``badca``
another one. Callers choose the destination by their AE title. The matrix:

============================================  ========================================================
DCMTK client with a good certificate          echo and store work; results reach storescp over TLS
client trusting another CA                    refused, nothing stored, one warning; the node serves on
client certificate expired / from another CA  refused with one warning naming why
client without a certificate (``+tla``)       refused: "sent no certificate"
plain DICOM to the TLS port                   refused with one warning line, no traceback
node's own certificate expired                DCMTK refuses it (SCP started in this process)
sender to a destination it cannot verify      send fails with a readable last_error, and is retried
``echo`` of a destination                     OK; wrong CA, expired certificate: the reason
============================================  ========================================================
"""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import helpers
import pydicom
import pytest
from helpers import RunningNode, dcmtk, run_tool, wait_until
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from node.config import DestinationTls, NodeConfig, NodeTls, load_settings
from node.db import (
    Instance,
    Job,
    JobStatus,
    Output,
    Send,
    SendStatus,
    create_schema,
    make_engine,
    session_factory,
)
from node.ops.orthanc import load_orthanc_config
from node.queue import JobSignal
from node.receive.scp import start_scp
from node.send.echo import echo
from node.tls import tls_args
from tests.integration.orthanc_fixture import (
    OrthancFactory,
    orthanc_factory_fixture,  # noqa: F401  (the fixture "orthanc_factory")
)
from tests.node.test_tls_config import Pki

pytestmark = pytest.mark.integration

RESULT_TIMEOUT_S = 120
ORTHANC_TLS_EXAMPLE = helpers.REPO_ROOT / "config" / "orthanc" / "orthanc-tls.example.json"


@dataclass(frozen=True)
class Certs:
    ca: Path
    other_ca: Path
    node: tuple[Path, Path]  # (certificate, key)
    client: tuple[Path, Path]
    pacs: tuple[Path, Path]
    expired: tuple[Path, Path]
    other_client: tuple[Path, Path]  # signed by the other CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("pki")
    pki, other = Pki(folder), Pki(folder, "other-ca")
    return Certs(
        ca=pki.cert,
        other_ca=other.cert,
        node=pki.issue("node"),
        client=pki.issue("modality"),
        pacs=pki.issue("pacs"),
        expired=pki.issue("expired", expired=True),
        other_client=other.issue("other-modality"),
    )


class TlsStoreScp:
    """DCMTK ``storescp +tls``: requires a client certificate signed by ``ca`` (its default ``-rc``)."""

    def __init__(self, directory: Path, cert: tuple[Path, Path], ca: Path) -> None:
        self.dir = directory
        self.port = helpers.free_port()
        (directory / "in").mkdir(parents=True)
        self.log_path = directory / "storescp.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [dcmtk("storescp"), "+tls", cert[1], cert[0], "+cf", ca, "-od", directory / "in"]
                + ["+uf", "-fe", ".dcm", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until("storescp to listen", self._listening, 20)

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"storescp exited with {self.proc.returncode}: {self.log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def received(self) -> set[str]:
        """SOP Instance UIDs of the complete files received so far."""
        uids = set()
        for path in (self.dir / "in").glob("*.dcm"):
            try:
                uids.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except Exception:  # noqa: BLE001 - still being written: read again at the next poll
                continue
        return uids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[TlsStoreScp]:
    scp = TlsStoreScp(tmp_path_factory.mktemp("pacs"), certs.pacs, certs.ca)
    yield scp
    scp.stop()


def _tls_echo(node: RunningNode, certs: Certs) -> bool:
    """C-ECHO over TLS with the modality's certificate (pynetdicom as the client)."""
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 5
    args = tls_args(DestinationTls(certs.ca, *certs.client), "localhost")
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, tls_args=args)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def orthanc_port() -> int:
    """The DICOM port of the Orthanc of :func:`test_orthanc_over_tls_both_ways`, a destination of the node."""
    return helpers.free_port()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, certs: Certs, pacs: TlsStoreScp, orthanc_port: int
) -> Iterator[RunningNode]:
    base = tmp_path_factory.mktemp("tls-node")
    client_tls = {"ca": str(certs.ca), "certificate": str(certs.client[0]), "key": str(certs.client[1])}
    running = helpers.start_node(
        base / "node",
        helpers.checkpoints_for(base / "checkpoints", ("ResNet18",)),
        wait=False,
        node={
            "tls": {
                "certificate": str(certs.node[0]),
                "key": str(certs.node[1]),
                "ca": str(certs.ca),
                "require_client_certificate": True,
            }
        },
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "tls": client_tls},
            {
                "name": "badca",
                "ae_title": "BADCA",
                "host": "127.0.0.1",
                "port": pacs.port,
                "tls": {**client_tls, "ca": str(certs.other_ca)},
            },
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc_port,
                "tls": client_tls,
            },
        ],
        outbox={"backoff_initial_s": 0.3, "backoff_max_s": 1.0},
    )
    try:
        quiet = logging.getLogger("pynetdicom")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # "connection refused" until the node listens
        try:
            wait_until(
                "the node to answer a TLS C-ECHO",
                lambda: _alive(running) and _tls_echo(running, certs),
                helpers.START_TIMEOUT_S,
            )
        finally:
            quiet.setLevel(level)
        yield running
    finally:
        running.stop()
        print(running.log_text())


def _alive(node: RunningNode) -> bool:
    if node.proc.poll() is not None:
        pytest.fail(f"node exited with {node.proc.returncode}:\n{node.log_text()}")
    return True


def _tls(cert: tuple[Path, Path], ca: Path) -> list[str | Path]:
    return ["+tls", cert[1], cert[0], "+cf", ca]


def echoscu(node: RunningNode, *options: str | Path) -> subprocess.CompletedProcess[str]:
    return run_tool([dcmtk("echoscu"), *options, "-aec", node.ae_title, "127.0.0.1", str(node.port)])


def storescu(
    node: RunningNode, path: Path, *options: str | Path, calling: str = "PACS"
) -> subprocess.CompletedProcess[str]:
    args = [dcmtk("storescu"), *options, "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port)]
    return run_tool([*args, path])


def _dx(tmp_path: Path, name: str, seed: int) -> tuple[Path, str]:
    ds = helpers.image_dataset(modality="DX", seed=seed)
    return helpers.write_dataset(ds, tmp_path / f"{name}.dcm"), str(ds.SOPInstanceUID)


def _stored(node: RunningNode, sop_uid: str) -> int:
    with node.sessions()() as s:
        return s.scalar(
            select(func.count()).select_from(Instance).where(Instance.sop_instance_uid == sop_uid)
        )


def _job(node: RunningNode, sop_uid: str) -> Job | None:
    with node.sessions()() as s:
        return s.scalar(
            select(Job)
            .join(Instance, Job.instance_id == Instance.id)
            .where(Instance.sop_instance_uid == sop_uid)
        )


def _send(node: RunningNode, job_id: int) -> Send | None:
    with node.sessions()() as s:
        return s.scalar(select(Send).where(Send.job_id == job_id))


def _new_warnings(node: RunningNode, mark: int, needle: str) -> list[str]:
    return [
        line
        for line in node.log_text()[mark:].splitlines()
        if " WARNING node.tls: " in line and needle in line
    ]


def _one_warning(node: RunningNode, mark: int, needle: str) -> str:
    lines = wait_until(f"a warning with {needle!r}", lambda: _new_warnings(node, mark, needle), 10)
    assert len(lines) == 1, lines
    return lines[0]


# --- the node's SCP --------------------------------------------------------------------------------------


def test_good_certificates_store_and_results_go_back_over_tls(
    node: RunningNode, certs: Certs, pacs: TlsStoreScp, tmp_path: Path
) -> None:
    res = echoscu(node, *_tls(certs.client, certs.ca))
    assert res.returncode == 0, res.stdout
    path, uid = _dx(tmp_path, "good", seed=1)
    res = storescu(node, path, *_tls(certs.client, certs.ca))
    assert res.returncode == 0, res.stdout
    assert _stored(node, uid) == 1  # answered only once committed
    job = wait_until(
        "the job to finish", lambda: (j := _job(node, uid)) and j.status == JobStatus.DONE and j, 120
    )
    with node.sessions()() as s:
        outputs = set(s.scalars(select(Output.sop_instance_uid).where(Output.job_id == job.id)))
        assert outputs
    wait_until("every output at the TLS storescp", lambda: outputs <= pacs.received(), RESULT_TIMEOUT_S)
    send = wait_until(
        "the send to be recorded", lambda: (x := _send(node, job.id)) and x.status == "sent" and x, 10
    )
    assert send.destination == "pacs" and send.last_error is None
    assert "Traceback" not in node.log_text()


def test_client_trusting_another_ca_is_refused(node: RunningNode, certs: Certs, tmp_path: Path) -> None:
    mark = len(node.log_text())
    path, uid = _dx(tmp_path, "wrong-ca", seed=2)
    res = storescu(node, path, *_tls(certs.client, certs.other_ca))
    assert res.returncode != 0 and "certificate verify failed" in res.stdout, res.stdout
    assert _stored(node, uid) == 0
    line = _one_warning(node, mark, "TLS handshake with 127.0.0.1:")
    assert "the client does not trust the CA that signed the node's certificate" in line
    assert _tls_echo(node, certs)  # the node still serves


@pytest.mark.parametrize(
    ("which", "reason"),
    [
        ("expired", "the client's certificate has expired"),
        ("other_client", "the client's certificate is not signed by a CA in node.tls.ca"),
    ],
)
def test_bad_client_certificate_is_refused(node: RunningNode, certs: Certs, which: str, reason: str) -> None:
    mark = len(node.log_text())
    res = echoscu(node, *_tls(getattr(certs, which), certs.ca))
    assert res.returncode != 0, res.stdout
    assert reason in _one_warning(node, mark, "TLS handshake with 127.0.0.1:")


def test_client_without_certificate_is_refused(node: RunningNode, certs: Certs) -> None:
    mark = len(node.log_text())
    res = echoscu(node, "+tla", "+cf", certs.ca)  # TLS, but no certificate of its own
    assert res.returncode != 0, res.stdout
    assert "the client sent no certificate, and one is required" in _one_warning(node, mark, "TLS handshake")


def test_plain_dicom_to_the_tls_port_is_one_clear_line(node: RunningNode, certs: Certs) -> None:
    mark = len(node.log_text())
    res = echoscu(node)
    assert res.returncode != 0, res.stdout
    line = _one_warning(node, mark, "connection from 127.0.0.1:")
    assert (
        "it sent a plain DICOM association request (calling AE 'ECHOSCU', called AE 'GRADCAM'), but this "
        "port takes DICOM over TLS only ([node.tls]): the peer must use TLS"
    ) in line
    res = echoscu(node, *_tls(certs.client, certs.ca))
    assert res.returncode == 0, res.stdout
    since = node.log_text()[mark:]
    assert [x for x in since.splitlines() if " WARNING " in x or " ERROR " in x] == [line]
    assert "Traceback" not in since


def test_expired_node_certificate_is_refused_by_clients(
    certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SCP in this process (no models needed): DCMTK will not talk to a node whose certificate has
    expired; the node warns at start and names the refusal."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    tls = NodeTls(*certs.expired, certs.ca, True, "node.toml")
    node_config = NodeConfig(
        port=helpers.free_port(), storage_dir=tmp_path / "spool", acse_timeout_s=5, tls=tls
    )
    caplog.set_level(logging.WARNING, logger="node.tls")
    server = start_scp(node_config, session_factory(engine), JobSignal())
    try:
        assert any("expired on" in r.getMessage() for r in caplog.records)
        res = run_tool(
            [dcmtk("echoscu"), *_tls(certs.client, certs.ca), "-aec", "GRADCAM", "127.0.0.1"]
            + [str(node_config.port)]
        )
        assert res.returncode != 0 and "certificate verify failed" in res.stdout, res.stdout
        wait_until(
            "the refusal to be logged",
            lambda: any(
                "refused the node's certificate: it has expired" in r.getMessage() for r in caplog.records
            ),
            10,
        )
    finally:
        server.shutdown()
        engine.dispose()


# --- the node's sender and echo ---------------------------------------------------------------------------


def test_sender_to_a_destination_it_cannot_verify_fails_readably_and_retries(
    node: RunningNode, certs: Certs, pacs: TlsStoreScp, tmp_path: Path
) -> None:
    path, uid = _dx(tmp_path, "badca", seed=3)
    res = storescu(node, path, *_tls(certs.client, certs.ca), calling="BADCA")
    assert res.returncode == 0, res.stdout
    job = wait_until(
        "the job to finish", lambda: (j := _job(node, uid)) and j.status == JobStatus.DONE and j, 120
    )

    send = wait_until("two failed attempts", lambda: (x := _send(node, job.id)) and x.attempts >= 2 and x, 30)
    assert send.destination == "badca"
    assert send.status in (SendStatus.PENDING, SendStatus.SENDING)  # retried, not given up
    assert send.last_error == (
        f"TLS handshake with 127.0.0.1:{pacs.port} failed: the destination's certificate is not signed by a "
        "CA in tls.ca of destination 'badca' (self-signed certificate in certificate chain)"
    )
    assert node.proc.poll() is None


def test_echo_over_tls(node: RunningNode, certs: Certs, pacs: TlsStoreScp, tmp_path: Path) -> None:
    settings = load_settings(node.config_path)
    ok, reason, _ = echo(settings, settings.destination("pacs"))
    assert ok, reason
    ok, reason, _ = echo(settings, settings.destination("badca"))
    assert not ok and reason.startswith(f"TLS handshake with 127.0.0.1:{pacs.port} failed: ")
    expired = TlsStoreScp(tmp_path / "expired", certs.expired, certs.ca)
    try:
        dest = replace(settings.destination("pacs"), port=expired.port)
        ok, reason, _ = echo(replace(settings, destinations=(dest,)), dest)
    finally:
        expired.stop()
    assert not ok and reason == (
        f"TLS handshake with 127.0.0.1:{expired.port} failed: the destination's certificate has expired"
    )


def test_unusable_certificate_stops_the_start_with_one_line(
    tmp_path: Path, certs: Certs, checkpoint_root: Path
) -> None:
    missing = tmp_path / "missing.key"
    running = helpers.start_node(
        tmp_path / "node",
        helpers.checkpoints_for(checkpoint_root, ("ResNet18",)),
        wait=False,
        node={"tls": {"certificate": str(certs.node[0]), "key": str(missing), "ca": str(certs.ca)}},
    )
    try:
        assert running.proc.wait(helpers.START_TIMEOUT_S) == 1
    finally:
        running.stop()
    last = running.log_text().strip().splitlines()[-1]
    assert last == (
        f"gradcam-node: error: {running.config_path}: node.tls.key: {missing} cannot be read "
        "(No such file or directory)"
    )


def test_orthanc_over_tls_both_ways(
    node: RunningNode, certs: Certs, orthanc_factory: OrthancFactory, orthanc_port: int, tmp_path: Path
) -> None:
    """Debian's Orthanc with the settings of config/orthanc/orthanc-tls.example.json (its files replaced by
    the test's): echo both ways, then a study through the loop (storescu -> Orthanc -> node -> Orthanc),
    all over TLS."""
    example = load_orthanc_config(ORTHANC_TLS_EXAMPLE)
    files = {
        "DicomTlsCertificate": certs.pacs[0],
        "DicomTlsPrivateKey": certs.pacs[1],
        "DicomTlsTrustedCertificates": certs.ca,
    }
    settings_ = {k: str(files[k]) if k in files else v for k, v in example.items() if k != "DicomModalities"}
    assert files.keys() < settings_.keys() and settings_["DicomTlsEnabled"] is True
    orthanc = orthanc_factory(node_port=node.port, dicom_port=orthanc_port, start=False)
    orthanc.config.update(settings_)
    gradcam = example["DicomModalities"]["gradcam"]
    assert gradcam["UseDicomTls"] is True
    orthanc.config["DicomModalities"]["gradcam"].update(
        {k: v for k, v in gradcam.items() if k not in ("Host", "Port")}  # the test's node
    )
    orthanc.start()
    settings = load_settings(node.config_path)
    ok, reason, _ = echo(settings, settings.destination("orthanc"))
    assert ok, reason
    assert orthanc.client.post_json("/modalities/gradcam/echo", {}) == {}
    path, uid = _dx(tmp_path, "via-orthanc", seed=4)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    args = [dcmtk("storescu"), *_tls(certs.client, certs.ca), "-aec", orthanc.aet, "127.0.0.1"]
    res = run_tool([*args, str(orthanc_port), path])
    assert res.returncode == 0, res.stdout
    job = wait_until(
        "the node to analyse the routed image",
        lambda: (j := _job(node, uid)) and j.status == JobStatus.DONE and j,
        RESULT_TIMEOUT_S,
    )
    with node.sessions()() as s:
        outputs = set(s.scalars(select(Output.sop_instance_uid).where(Output.job_id == job.id)))
    wait_until(
        "the results in Orthanc's study",
        lambda: {i["SOPInstanceUID"] for i in orthanc.client.study_instances(study_uid)} == {uid} | outputs,
        RESULT_TIMEOUT_S,
    )
