"""Typed configuration of the DICOM node: ``[node]``, ``[worker]``, ``[outputs]``, ``[outbox]``,
``[routing]``, ``[[destinations]]``, ``[http]``, ``[retention]`` and ``[logging]``, on top of the core's
model sections."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gradcam.config import DEFAULT_CONFIG, REPO_ROOT, CoreConfig, TableReader, parse_core, read_toml
from gradcam.errors import ConfigError

__all__ = [
    "NodeConfig",
    "WorkerConfig",
    "OutputsConfig",
    "OUTPUT_KINDS",
    "OutboxConfig",
    "Destination",
    "NodeTls",
    "DestinationTls",
    "HttpConfig",
    "RetentionConfig",
    "LoggingConfig",
    "LOG_LEVELS",
    "Settings",
    "resolve_config_path",
    "load_settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


@dataclass(frozen=True)
class NodeTls:
    """``[node.tls]``: the SCP takes TLS only (TLS 1.2 or later); :mod:`node.tls` reads the files."""

    certificate: Path  # PEM, the node's certificate (then any intermediates)
    key: Path  # PEM, its private key, unencrypted
    ca: Path | None = None  # PEM, the CA(s) that client certificates must chain to
    require_client_certificate: bool = True  # mutual TLS: a client without a valid certificate is refused
    config_file: str = ""  # for error messages: the file these keys are in


@dataclass(frozen=True)
class DestinationTls:
    """A ``[[destinations]]`` entry's ``tls`` table: the sender speaks TLS to it (:mod:`node.tls`)."""

    ca: Path  # PEM, the CA(s) the destination's certificate must chain to
    certificate: Path | None = None  # PEM, the node's client certificate, for a destination that asks one
    key: Path | None = None
    server_name: str = ""  # the name its certificate must carry; empty: the destination's host
    verify_hostname: bool = True  # false: any name, as long as the certificate chains to ca
    config_file: str = ""
    key_prefix: str = ""  # e.g. destinations[0].tls


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "GRADCAM"
    bind: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 8
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu: int = 262144
    storage_dir: Path = REPO_ROOT / "var" / "spool"
    database_url: str = ""
    min_free_disk_mb: int = 512
    device_uid: str = ""  # empty: generated once per installation and kept in the database
    tls: NodeTls | None = None  # [node.tls]: None, plain DICOM


def default_processes() -> int:
    """``[worker] processes = "auto"``: two worker processes up to 8 cores, then one per 4 cores (at most
    8). Two workers keep both model processes busy while the other does its Python work (decoding,
    outputs, database): on 2 cores, bench/node.py measured 14.7-14.8 instances/s with two against
    12.8-13.0 with one (each model process with one torch thread; two threads in one process spent 97 ms
    of CPU per image instead of 55, competing with the node's Python work)."""
    return min(8, max(2, (os.cpu_count() or 2) // 4))


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 4
    max_attempts: int = 3
    retry_delay_s: float = 5.0
    # torch threads of each model process; 0: the cores but one, shared among the worker processes
    inference_threads: int = 0
    processes: int = 1  # worker processes `serve` starts ("auto": default_processes()); 0: none
    lease_s: float = 30.0  # a claimed job is held this long, renewed while it runs
    device: str = "auto"  # where the models run: auto (CUDA when there is one), cpu, cuda, cuda:N
    poll_s: float = 1.0  # an idle worker looks for jobs this often (those queued by other machines)

    def threads(self) -> int:
        """The torch threads of one worker's model process."""
        if self.inference_threads > 0:
            return self.inference_threads
        return max(1, ((os.cpu_count() or 2) - 1) // max(1, self.processes))


# The output kinds the node can make for one image (see node.outputs.build):
#   summary  one Secondary Capture: every model's decision and map side by side, and the consensus
#   sc       one Secondary Capture per model with a map (the overlay at full resolution)
#   heatmap  one FRACTIONAL Segmentation per model with a map: the Grad-CAM at the source's geometry
#   sr       one Comprehensive 3D SR (TID 1500) with every finding, regions and references
OUTPUT_KINDS = ("summary", "sc", "heatmap", "sr")


@dataclass(frozen=True)
class OutputsConfig:
    kinds: tuple[str, ...] = OUTPUT_KINDS
    # a negative decision's Grad-CAM shows what the model took as evidence for NORMAL: off by default, as
    # a map over the lungs of a negative study misleads; when on, drawn in its own colours and labelled
    negative_maps: bool = False
    sc_series_number: int = 9901
    sc_series_description: str = "AI Grad-CAM heatmap - research only, not for diagnostic use"
    sr_series_number: int = 9902
    sr_series_description: str = "AI pneumonia findings - research only, not for diagnostic use"
    heatmap_series_number: int = 9903
    heatmap_series_description: str = "AI Grad-CAM maps (overlay) - research only, not diagnostic"


@dataclass(frozen=True)
class OutboxConfig:
    max_attempts: int = 12
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    associations: int = 2  # sending threads, each with its own association


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: DestinationTls | None = None  # its tls table: None, plain DICOM


@dataclass(frozen=True)
class HttpConfig:
    """The status page, ``/metrics`` and ``/healthz`` inside ``serve`` (:mod:`node.http`)."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = 8080
    token: str = ""  # empty: no authentication; else the bearer token for every endpoint but /healthz
    recent: int = 20  # jobs listed on the page


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: spool files deleted after so many days by ``serve`` (rows kept; :mod:`node.ops`)."""

    received_days: float = 0.0  # received instances whose jobs are all finished; 0: kept for ever
    outputs_days: float = 0.0  # outputs whose sends are all finished (or that have none); 0: kept for ever
    interval_h: float = 24.0  # how often serve looks (first at start)

    @property
    def enabled(self) -> bool:
        return self.received_days > 0 or self.outputs_days > 0


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class LoggingConfig:
    """``[logging]``: where log lines go (:func:`node.ops.logs.setup_logging`)."""

    file: Path | None = None  # None: stderr (journald under systemd, `docker logs` under compose)
    max_mb: int = 50  # the file is rotated at this size ...
    backups: int = 5  # ... keeping this many old ones (FILE.1 ... FILE.N)
    level: str = "INFO"


_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")  # URL-safe: it may travel in ?token=


@dataclass(frozen=True)
class Settings:
    """The whole configuration file, parsed and checked."""

    path: Path
    core: CoreConfig
    node: NodeConfig = field(default_factory=NodeConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    destinations: tuple[Destination, ...] = ()
    default_destination: str | None = None
    http: HttpConfig = field(default_factory=HttpConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def database_url(self) -> str:
        if self.node.database_url:
            return self.node.database_url
        return f"sqlite:///{REPO_ROOT / 'var' / 'gradcam-node.db'}"

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise ConfigError(str(self.path), "destinations", f"no destination named {name!r} (known: {known})")

    def destination_for_caller(self, calling_ae: str) -> Destination | None:
        """The destination whose AE title is the caller's, else the default one (or None)."""
        for d in self.destinations:
            if d.ae_title == calling_ae.strip():
                return d
        if self.default_destination:
            return self.destination(self.default_destination)
        return None


def _ae(r: TableReader, name: str, default: object = ...) -> str:
    value = r.str(name) if default is ... else r.str(name, default)
    if not _AE_RE.match(value) or not value.strip():
        raise r.error(name, f"expected a DICOM AE title (1-16 characters, no backslash), got {value!r}")
    return value.strip()


def _lo(r: TableReader, name: str, default: str) -> str:
    """A DICOM LO value: at most 64 characters, no backslash or control characters."""
    value = r.str(name, default)
    if len(value) > 64 or "\\" in value or any(ord(ch) < 32 for ch in value):
        raise r.error(name, f"expected at most 64 characters without backslash (DICOM LO), got {value!r}")
    return value


_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def _uid(r: TableReader, name: str) -> str:
    value = r.str(name, "").strip()
    if value and (len(value) > 64 or not _UID_RE.match(value)):
        raise r.error(name, f"expected a DICOM UID (digits and dots, at most 64 characters), got {value!r}")
    return value


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2})$")


def _processes(w: TableReader) -> int:
    value = w.raw("processes", "auto")
    if value == "auto":
        return default_processes()
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise w.error(
            "processes", f'expected "auto" or a whole number from 0 (no local workers) to 64, got {value!r}'
        )
    return value


DEVICE_CHOICES = 'expected "auto", "cpu", "cuda" or "cuda:N" (N: the GPU\'s index)'


def device_name(text: str) -> str:
    """A ``[worker] device`` value, normalised; ValueError if it is none of :data:`DEVICE_CHOICES`."""
    value = text.strip().lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"{DEVICE_CHOICES}, got {value!r}")
    return value


def _device(w: TableReader) -> str:
    try:
        return device_name(w.str("device", "auto"))
    except ValueError as exc:
        raise w.error("device", str(exc)) from None


def _kinds(r: TableReader, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = r.str_list(name, list(default))
    unknown = [k for k in value if k not in OUTPUT_KINDS]
    if unknown or not value or len(set(value)) != len(value):
        raise r.error(name, f"expected distinct output kinds out of {', '.join(OUTPUT_KINDS)}, got {value!r}")
    return tuple(k for k in OUTPUT_KINDS if k in value)


def _token(r: TableReader, name: str) -> str:
    value = r.str(name, "")
    if value and not _TOKEN_RE.match(value):
        raise r.error(
            name,
            "expected empty (no authentication) or 16-256 URL-safe characters (letters, digits, . _ ~ -), "
            "e.g. from: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        )
    return value


def _retention(root: TableReader) -> RetentionConfig:
    r = root.table_of("retention", {})
    cfg = RetentionConfig(
        received_days=r.float("received_days", 0.0, lo=0.0),
        outputs_days=r.float("outputs_days", 0.0, lo=0.0),
        interval_h=r.float("interval_h", 24.0, lo=0.001),
    )
    r.finish()
    return cfg


def _logging(root: TableReader) -> LoggingConfig:
    g = root.table_of("logging", {})
    cfg = LoggingConfig(
        file=g.path("file") if g.str("file", "") else None,
        max_mb=g.int("max_mb", 50, lo=1),
        backups=g.int("backups", 5, lo=0, hi=1000),
        level=g.str("level", "INFO", choices=LOG_LEVELS),
    )
    g.finish()
    return cfg


def _file(r: TableReader, name: str, required: bool = True) -> Path | None:
    """A file path (relative ones from the repository root, as every path here); None when optional and
    absent. Whether the file can be read is checked when the node starts (``node.tls.check_files``)."""
    if not required and name not in r.table:
        return None
    if not r.str(name).strip():
        raise r.error(name, "expected the path of a PEM file, got an empty string")
    return r.path(name)


def _node_tls(n: TableReader) -> NodeTls | None:
    """``[node.tls]``: present (and not ``enabled = false``) turns TLS on for the SCP's port."""
    t = n.table_of("tls", None)
    if t is None:
        return None
    enabled = t.bool("enabled", True)
    tls = NodeTls(
        certificate=_file(t, "certificate"),
        key=_file(t, "key"),
        ca=_file(t, "ca", required=False),
        require_client_certificate=t.bool("require_client_certificate", True),
        config_file=t.file,
    )
    t.finish()
    if tls.require_client_certificate and tls.ca is None:
        raise t.error(
            "ca",
            "required with require_client_certificate = true: the CA certificate(s) that signed the "
            "clients' certificates (or set require_client_certificate = false)",
        )
    return tls if enabled else None


def _destination_tls(d: TableReader) -> DestinationTls | None:
    """A destination's ``tls`` table: present (and not ``enabled = false``) makes the sender use TLS."""
    t = d.table_of("tls", None)
    if t is None:
        return None
    enabled = t.bool("enabled", True)
    certificate, key = _file(t, "certificate", required=False), _file(t, "key", required=False)
    if (certificate is None) != (key is None):
        missing = "key" if key is None else "certificate"
        raise t.error(
            missing, "expected certificate and key together (the node's client certificate), or neither"
        )
    server_name = t.str("server_name", "").strip()
    if any(ch.isspace() for ch in server_name):
        raise t.error("server_name", f"expected a host name without spaces, got {server_name!r}")
    tls = DestinationTls(
        ca=_file(t, "ca"),
        certificate=certificate,
        key=key,
        server_name=server_name,
        verify_hostname=t.bool("verify_hostname", True),
        config_file=t.file,
        key_prefix=t.prefix,
    )
    t.finish()
    return tls if enabled else None


def resolve_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config`` wins, then ``GRADCAM_NODE_CONFIG``, then ``config/node.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GRADCAM_NODE_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read, parse and check a configuration file; raises :class:`ConfigError` naming file and key."""
    p = resolve_config_path(path)
    data = read_toml(p)
    core = parse_core(p, data)
    root = TableReader(p, "", data)
    for known in ("models", "preprocess", "render"):
        root._get(known, None)

    n = root.table_of("node", {})
    node = NodeConfig(
        ae_title=_ae(n, "ae_title", "GRADCAM"),
        bind=n.str("bind", "127.0.0.1"),
        port=n.int("port", 11112, lo=1, hi=65535),
        allowed_calling_aets=tuple(a.strip() for a in n.str_list("allowed_calling_aets", [])),
        max_associations=n.int("max_associations", 8, lo=1, hi=256),
        acse_timeout_s=n.float("acse_timeout_s", 30.0, lo=0.1),
        dimse_timeout_s=n.float("dimse_timeout_s", 60.0, lo=0.1),
        network_timeout_s=n.float("network_timeout_s", 60.0, lo=0.1),
        max_pdu=n.int("max_pdu", 262144, lo=0),
        storage_dir=n.path("storage_dir", "var/spool"),
        database_url=n.str("database_url", ""),
        min_free_disk_mb=n.int("min_free_disk_mb", 512, lo=0),
        device_uid=_uid(n, "device_uid"),
        tls=_node_tls(n),
    )
    n.finish()

    w = root.table_of("worker", {})
    worker = WorkerConfig(
        batch_size=w.int("batch_size", 4, lo=1, hi=256),
        max_attempts=w.int("max_attempts", 3, lo=1, hi=100),
        retry_delay_s=w.float("retry_delay_s", 5.0, lo=0.0),
        inference_threads=w.int("inference_threads", 0, lo=0, hi=1024),
        processes=_processes(w),
        lease_s=w.float("lease_s", 30.0, lo=1.0, hi=3600.0),
        device=_device(w),
        poll_s=w.float("poll_s", 1.0, lo=0.05, hi=60.0),
    )
    w.finish()

    o = root.table_of("outputs", {})
    defaults = OutputsConfig()
    outputs = OutputsConfig(
        kinds=_kinds(o, "kinds", defaults.kinds),
        negative_maps=o.bool("negative_maps", defaults.negative_maps),
        sc_series_number=o.int("sc_series_number", defaults.sc_series_number, lo=1, hi=2**31 - 1),
        sc_series_description=_lo(o, "sc_series_description", defaults.sc_series_description),
        sr_series_number=o.int("sr_series_number", defaults.sr_series_number, lo=1, hi=2**31 - 1),
        sr_series_description=_lo(o, "sr_series_description", defaults.sr_series_description),
        heatmap_series_number=o.int(
            "heatmap_series_number", defaults.heatmap_series_number, lo=1, hi=2**31 - 1
        ),
        heatmap_series_description=_lo(o, "heatmap_series_description", defaults.heatmap_series_description),
    )
    o.finish()

    b = root.table_of("outbox", {})
    outbox = OutboxConfig(
        max_attempts=b.int("max_attempts", 12, lo=1, hi=1000),
        backoff_initial_s=b.float("backoff_initial_s", 2.0, lo=0.0),
        backoff_max_s=b.float("backoff_max_s", 300.0, lo=0.0),
        associations=b.int("associations", 2, lo=1, hi=16),
    )
    b.finish()

    raw_dests = root._get("destinations", [])
    if not isinstance(raw_dests, list):
        raise ConfigError(str(p), "destinations", "expected [[destinations]] tables")
    dests = []
    for i, t in enumerate(raw_dests):
        d = TableReader(p, f"destinations[{i}]", t)
        dests.append(
            Destination(
                name=d.str("name"),
                ae_title=_ae(d, "ae_title"),
                host=d.str("host"),
                port=d.int("port", lo=1, hi=65535),
                tls=_destination_tls(d),
            )
        )
        d.finish()
    names = [d.name for d in dests]
    if len(set(names)) != len(names):
        raise ConfigError(str(p), "destinations", "destination names must be unique")

    r = root.table_of("routing", {})
    default_destination = r.str("default_destination", None)
    r.finish()
    if default_destination is not None and default_destination not in names:
        raise ConfigError(
            str(p),
            "routing.default_destination",
            f"names no [[destinations]] entry (known: {', '.join(names) or 'none'})",
        )
    h = root.table_of("http", {})
    http = HttpConfig(
        enabled=h.bool("enabled", True),
        bind=h.str("bind", "127.0.0.1"),
        port=h.int("port", 8080, lo=1, hi=65535),
        token=_token(h, "token"),
        recent=h.int("recent", 20, lo=1, hi=500),
    )
    h.finish()
    if http.enabled and http.port == node.port:
        raise h.error("port", f"expected a port other than [node] port ({node.port}): DICOM listens there")
    retention, logging = _retention(root), _logging(root)
    root.finish()
    return Settings(
        path=p,
        core=core,
        node=node,
        worker=worker,
        outputs=outputs,
        outbox=outbox,
        destinations=tuple(dests),
        default_destination=default_destination,
        http=http,
        retention=retention,
        logging=logging,
    )
