"""``[node.tls]`` and a destination's ``tls`` table: parsing, the start-up check of the files (missing,
unreadable, not PEM, mismatched, encrypted, expired) and what a failed handshake is called.

Certificates are made here with ``cryptography`` (:class:`Pki`, also used by
``tests/integration/test_tls.py``): a CA, certificates it signs, an expired one, a second CA.
"""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gradcam.errors import ConfigError
from node.config import DestinationTls, NodeTls, load_settings
from node.tls import check_files, client_context, describe_tls_error, expiry_warning, server_context
from tests import helpers

__all__ = ["Pki"]


class Pki:
    """Certificates in ``directory``: ``ca.crt`` (and its key) signing what :meth:`issue` makes.

    RSA 2048 keys (what PACS certificates mostly are; DCMTK's default TLS profile takes them); the
    private keys are written unencrypted, PEM.
    """

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gradcam-node test {name}")])
        now = datetime.now(UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = self.dir / f"{name}.crt"
        self.cert.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        *,
        hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
        expired: bool = False,
        password: bytes | None = None,
    ) -> tuple[Path, Path]:
        """``(NAME.crt, NAME.key)``: a certificate for servers and clients alike, naming ``hosts``
        (DNS names and IP addresses); ``expired``: valid until yesterday; ``password``: encrypted key."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.now(UTC)
        if expired:
            start, end = now - timedelta(days=10), now - timedelta(days=1)
        else:
            start, end = now - timedelta(days=1), now + timedelta(days=30)
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(IPv4Address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        crt, pem = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        encryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        pem.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        )
        pem.chmod(0o600)
        return crt, pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _config(tmp_path: Path, node_tls: str = "", destination_tls: str = "") -> Path:
    """A test configuration with ``node_tls`` appended to ``[node]`` as ``[node.tls]`` and one destination
    whose ``tls`` table is ``destination_tls`` (TOML text of the table's body)."""
    path = helpers.write_test_config(
        tmp_path / "node.toml",
        checkpoints={"ResNet18": tmp_path / "resnet18.pt"},
        port=11112,
        storage_dir=tmp_path / "spool",
        database_url=f"sqlite:///{tmp_path / 'node.db'}",
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    )
    text = path.read_text(encoding="utf-8")
    if node_tls:
        text += f"\n[node.tls]\n{node_tls}\n"
    if destination_tls:
        text += f"\n[destinations.tls]\n{destination_tls}\n"  # the last [[destinations]] entry's
    path.write_text(text, encoding="utf-8")
    return path


def _toml(**values: str | bool) -> str:
    """The body of a TOML table: strings and booleans."""
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())  # JSON's are TOML's here


# --- parsing ---------------------------------------------------------------------------------------------


def test_no_tls_tables_means_plain_dicom(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path))
    assert settings.node.tls is None and settings.destinations[0].tls is None


def test_node_tls_is_parsed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _toml(certificate="/c/node.crt", key="/c/node.key", ca="/c/ca.crt"))
    tls = load_settings(cfg).node.tls
    assert tls == NodeTls(Path("/c/node.crt"), Path("/c/node.key"), Path("/c/ca.crt"), True, str(cfg))


def test_node_tls_relative_paths_are_from_the_repository(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _toml(certificate="tls/node.crt", key="tls/node.key", ca="tls/ca.crt"))
    tls = load_settings(cfg).node.tls
    assert tls is not None and tls.certificate == helpers.REPO_ROOT / "tls" / "node.crt"


def test_node_tls_enabled_false_turns_it_off(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _toml(enabled=False, certificate="/c/n.crt", key="/c/n.key", ca="/c/ca.crt"))
    assert load_settings(cfg).node.tls is None


def test_node_tls_without_client_certificates_needs_no_ca(tmp_path: Path) -> None:
    body = _toml(certificate="/c/n.crt", key="/c/n.key", require_client_certificate=False)
    tls = load_settings(_config(tmp_path, body)).node.tls
    assert tls is not None and tls.ca is None and not tls.require_client_certificate


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        (_toml(key="/k", ca="/ca"), "node.tls.certificate", "required key is missing"),
        (_toml(certificate="/c", ca="/ca"), "node.tls.key", "required key is missing"),
        (_toml(certificate="/c", key="/k"), "node.tls.ca", "required with require_client_certificate"),
        (_toml(certificate="", key="/k", ca="/ca"), "node.tls.certificate", "empty"),
        (
            _toml(certificate="/c", key="/k", ca="/ca", require_client_cert=True),
            "node.tls.require_client_cert",
            "unknown key",
        ),
        (
            'certificate = "/c"\nkey = "/k"\nca = "/ca"\nrequire_client_certificate = "yes"',
            "node.tls.require_client_certificate",
            "true or false",
        ),
    ],
)
def test_node_tls_errors_name_the_key(tmp_path: Path, body: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, body))
    assert err.value.key == key and expected in err.value.expected


def test_destination_tls_is_parsed(tmp_path: Path) -> None:
    body = _toml(ca="/c/ca.crt", certificate="/c/n.crt", key="/c/n.key", server_name="pacs.example.org")
    cfg = _config(tmp_path, destination_tls=body)
    tls = load_settings(cfg).destinations[0].tls
    assert tls == DestinationTls(
        Path("/c/ca.crt"),
        Path("/c/n.crt"),
        Path("/c/n.key"),
        "pacs.example.org",
        True,
        str(cfg),
        "destinations[0].tls",
    )


@pytest.mark.parametrize(
    ("body", "key", "expected"),
    [
        (_toml(certificate="/c", key="/k"), "destinations[0].tls.ca", "required key is missing"),
        (_toml(ca="/ca", certificate="/c"), "destinations[0].tls.key", "together"),
        (_toml(ca="/ca", key="/k"), "destinations[0].tls.certificate", "together"),
        (_toml(ca="/ca", server_name="a b"), "destinations[0].tls.server_name", "without spaces"),
        (_toml(ca="/ca", verify_host=False), "destinations[0].tls.verify_host", "unknown key"),
    ],
)
def test_destination_tls_errors_name_the_key(tmp_path: Path, body: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, destination_tls=body))
    assert err.value.key == key and expected in err.value.expected


# --- the files, checked at start ----------------------------------------------------------------------------


def _node_tls(cert: Path, key: Path, ca: Path | None, config: str = "node.toml") -> NodeTls:
    return NodeTls(cert, key, ca, ca is not None, config)


def test_good_files_make_both_contexts(pki: Pki) -> None:
    cert, key = pki.issue("node")
    ctx = server_context(_node_tls(cert, key, pki.cert))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_context(
        DestinationTls(pki.cert, cert, key, "", False, "node.toml", "destinations[0].tls")
    )
    assert client.verify_mode == ssl.CERT_REQUIRED and not client.check_hostname
    assert client_context(DestinationTls(pki.cert)).check_hostname


def test_optional_client_certificates(pki: Pki) -> None:
    cert, key = pki.issue("node-optional")
    assert server_context(NodeTls(cert, key, None, False)).verify_mode == ssl.CERT_NONE
    assert server_context(NodeTls(cert, key, pki.cert, False)).verify_mode == ssl.CERT_OPTIONAL


def _error(tls: NodeTls) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        server_context(tls)
    return err.value


def test_missing_certificate_names_key_and_file(pki: Pki, tmp_path: Path) -> None:
    _, key = pki.issue("node-missing")
    err = _error(_node_tls(tmp_path / "nope.crt", key, pki.cert))
    assert (err.file, err.key) == ("node.toml", "node.tls.certificate")
    assert str(tmp_path / "nope.crt") in err.expected and "No such file" in err.expected
    assert "\n" not in str(err)


def test_unreadable_key_names_key_and_file(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("node-unreadable")
    key.chmod(0)
    try:
        if key.read_bytes():  # running as root: permissions do not apply
            pytest.skip("files are readable whatever their mode (root)")
    except PermissionError:
        pass
    try:
        err = _error(_node_tls(cert, key, pki.cert))
    finally:
        key.chmod(0o600)
    assert err.key == "node.tls.key" and "cannot be read (Permission denied)" in err.expected


def test_folder_instead_of_a_key(pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.issue("node-folder")
    err = _error(_node_tls(cert, tmp_path, pki.cert))
    assert err.key == "node.tls.key" and err.expected == f"{tmp_path} is a folder, not a PEM private key"


def test_mismatched_key(pki: Pki) -> None:
    cert, _ = pki.issue("node-a")
    _, other_key = pki.issue("node-b")
    err = _error(_node_tls(cert, other_key, pki.cert))
    assert err.key == "node.tls.key"
    assert err.expected == f"{other_key} is not the key of node.tls.certificate {cert}"


def test_certificate_and_key_swapped(pki: Pki) -> None:
    cert, key = pki.issue("node-swapped")
    err = _error(_node_tls(key, cert, pki.cert))
    assert err.key == "node.tls.certificate" and "is not a PEM certificate" in err.expected


def test_encrypted_key_is_refused_without_a_prompt(pki: Pki) -> None:
    cert, key = pki.issue("node-encrypted", password=b"secret")
    err = _error(_node_tls(cert, key, pki.cert))
    assert err.key == "node.tls.key" and "is encrypted" in err.expected


def test_ca_that_is_no_certificate(pki: Pki) -> None:
    cert, key = pki.issue("node-badca")
    err = _error(_node_tls(cert, key, key))
    assert err.key == "node.tls.ca" and "is not a PEM file of CA certificates" in err.expected


def test_check_files_covers_destinations(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("node-dest")
    body = _toml(ca=str(pki.cert), certificate=str(cert), key=str(tmp_path / "gone.key"))
    settings = load_settings(_config(tmp_path, destination_tls=body))
    with pytest.raises(ConfigError) as err:
        check_files(settings)
    assert err.value.key == "destinations[0].tls.key" and "gone.key" in err.value.expected


def test_expired_certificate_is_warned_about(pki: Pki) -> None:
    cert, _ = pki.issue("node-expired", expired=True)
    warning = expiry_warning(cert, "node.tls.certificate")
    assert warning is not None and "expired on" in warning and str(cert) in warning
    good, _ = pki.issue("node-fresh")
    assert expiry_warning(good, "node.tls.certificate") is None
    soon = expiry_warning(good, "node.tls.certificate", now=datetime.now(UTC) + timedelta(days=25))
    assert soon is not None and "expires on" in soon


# --- what a failed handshake is called -------------------------------------------------------------------


def _verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    exc.verify_message = message
    return exc


def test_describe_tls_errors() -> None:
    unknown_ca = _verify_error("unable to get local issuer certificate")
    assert describe_tls_error(unknown_ca, "the client", "node.tls.ca") == (
        "the client's certificate is not signed by a CA in node.tls.ca "
        "(unable to get local issuer certificate)"
    )
    assert describe_tls_error(_verify_error("certificate has expired"), "the destination") == (
        "the destination's certificate has expired"
    )
    mismatch = _verify_error("Hostname mismatch, certificate is not valid for 'x'.")
    assert "tls.server_name" in describe_tls_error(mismatch)
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert describe_tls_error(plain, "the destination") == (
        "the destination did not answer in TLS (is TLS enabled on its port?) (wrong version number)"
    )
    assert "closed the connection" in describe_tls_error(ssl.SSLEOFError(8, "EOF occurred"), "the client")
