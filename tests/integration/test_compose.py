"""docker-compose.yml, the Dockerfile and the configurations agree with each other.

There is no Docker engine in CI, so nothing is built or started; instead every value that one file relies on
in another (services, ports, AE titles, paths, volumes, the Lua script's location, health checks) is checked,
and the health-check commands are run for real against local peers (the node's against a real node).
The scale-out override (docker-compose.scale.yml: PostgreSQL and worker containers, config/docker-scale.toml)
is checked the same way, and with `docker compose config` where the docker CLI has the compose plugin.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

import helpers
import pytest

from node.config import WorkerConfig, load_settings
from node.ops.node_toml import derived_node_config
from node.ops.orthanc import (
    ORTHANC_CONFIG,
    ORTHANC_LUA,
    load_orthanc_config,
    local_orthanc_config,
    lua_setting,
    strip_json_comments,
)
from node.outputs import MANUFACTURER

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCALE = ROOT / "docker-compose.scale.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_TOML = ROOT / "config" / "docker.toml"
SCALE_TOML = ROOT / "config" / "docker-scale.toml"
NODE_TOML = ROOT / "config" / "node.toml"
ORTHANC_SERVICE = "orthanc"
NODE_SERVICE = "gradcam-node"
POSTGRES_SERVICE = "postgres"
WORKER_SERVICE = "worker"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _compose_file(path: Path) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason=f"PyYAML reads {path.name} (test extra 'pyyaml')")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and "services" in data
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _compose_file(COMPOSE)


@pytest.fixture(scope="module")
def scale() -> dict[str, Any]:
    return _compose_file(SCALE)


@pytest.fixture(scope="module")
def orthanc_cfg() -> dict[str, Any]:
    return load_orthanc_config(ORTHANC_CONFIG)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instr, _, args = line.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _volumes(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        source, target = parts[0], parts[1]
        out[target] = (source, parts[2] if len(parts) > 2 else "rw")
    return out


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def _node_modality(orthanc_cfg: dict[str, Any]) -> dict[str, Any]:
    name = lua_setting(ORTHANC_LUA.read_text(encoding="utf-8"), "NODE_MODALITY")
    return orthanc_cfg["DicomModalities"][name]


def _healthcheck_code(test: list[str]) -> str:
    assert test[0] == "CMD" and test[2] == "-c", test
    return test[3]


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {ORTHANC_SERVICE, NODE_SERVICE}
    image = services[ORTHANC_SERVICE]["image"]
    assert re.fullmatch(r"orthancteam/orthanc:\d+\.\d+\.\d+", image), f"pin Orthanc's image tag: {image}"
    node = services[NODE_SERVICE]
    assert node["build"] in (".", {"context": "."}) and DOCKERFILE.is_file()
    for name in (ORTHANC_SERVICE, NODE_SERVICE):
        assert services[name].get("restart") == "unless-stopped"
        assert "healthcheck" in services[name]
    named = set(compose.get("volumes", {}))
    for svc in services.values():
        for source, _ in _volumes(svc).values():
            if not source.startswith(("./", "/")):
                assert source in named, f"volume {source} is not declared at top level"


def test_orthanc_service_matches_orthanc_json(compose: dict[str, Any], orthanc_cfg: dict[str, Any]) -> None:
    svc = compose["services"][ORTHANC_SERVICE]
    assert _container_ports(svc) == {orthanc_cfg["DicomPort"], orthanc_cfg["HttpPort"]}
    documented = (4242, 8042, "ORTHANC")  # the ports and AE title the README and the demo announce
    assert (orthanc_cfg["DicomPort"], orthanc_cfg["HttpPort"], orthanc_cfg["DicomAet"]) == documented
    vols = _volumes(svc)
    assert vols["/etc/orthanc/orthanc.json"] == ("./config/orthanc/orthanc.json", "ro")
    lua_targets = orthanc_cfg["LuaScripts"]
    assert len(lua_targets) == 1 and vols[lua_targets[0]] == ("./config/orthanc/autorouting.lua", "ro")
    # storage on a named volume, where orthanc.json puts both the files and the index
    assert orthanc_cfg["StorageDirectory"] == orthanc_cfg["IndexDirectory"]
    source, mode = vols[orthanc_cfg["StorageDirectory"]]
    assert mode == "rw" and not source.startswith(("./", "/"))
    # reachable through the docker bridge, and then never without a login
    assert orthanc_cfg["RemoteAccessAllowed"] is True and orthanc_cfg["AuthenticationEnabled"] is True
    assert orthanc_cfg["RegisteredUsers"]
    # Orthanc's image has no "Plugins" key of ours to clash with
    assert "Plugins" not in orthanc_cfg


def test_node_service_matches_docker_toml(compose: dict[str, Any], dockerfile: list[tuple[str, str]]) -> None:
    svc = compose["services"][NODE_SERVICE]
    settings = load_settings(DOCKER_TOML)
    command = svc["command"]
    config_path = command[command.index("--config") + 1]
    assert command[-1] == "serve"
    vols = _volumes(svc)
    assert vols[config_path] == ("./config/docker.toml", "ro")
    env = dict(a.split("=", 1) for instr, a in dockerfile if instr == "ENV" and a.startswith("GRADCAM_NODE"))
    assert env == {"GRADCAM_NODE_CONFIG": config_path}
    assert settings.node.bind == "0.0.0.0"
    # DICOM and the status page (whose /healthz the health check asks), listening on the container's
    # addresses so that the published ports reach them
    assert settings.http.enabled and settings.http.bind == "0.0.0.0"
    assert _container_ports(svc) == {settings.node.port, settings.http.port}
    exposed = {int(p) for instr, a in dockerfile if instr == "EXPOSE" for p in a.split()}
    assert exposed == {settings.node.port, settings.http.port}
    # spool and database on the var volume
    var_target = next(t for t, (s, _) in vols.items() if not s.startswith(("./", "/")))
    var = PurePosixPath(var_target)
    assert PurePosixPath(settings.node.storage_dir).is_relative_to(var)
    assert settings.node.database_url.startswith("sqlite:///")
    assert PurePosixPath(settings.node.database_url.removeprefix("sqlite:///")).is_relative_to(var)
    # weights from the mounted checkpoints folder, read-only
    ckpt_target = next(t for t, (s, _) in vols.items() if s == "./checkpoints")
    assert vols[ckpt_target][1] == "ro"
    for m in settings.core.models:
        assert PurePosixPath(m.checkpoint).parent == PurePosixPath(ckpt_target), m


def test_node_and_orthanc_point_at_each_other(orthanc_cfg: dict[str, Any]) -> None:
    lua = ORTHANC_LUA.read_text(encoding="utf-8")
    modality = _node_modality(orthanc_cfg)
    for path, host in ((DOCKER_TOML, ORTHANC_SERVICE), (NODE_TOML, "127.0.0.1")):
        s = load_settings(path)
        dest = s.destination(s.default_destination or "")
        # results go back to Orthanc's AE title and DICOM port
        orthanc_address = (orthanc_cfg["DicomAet"], host, orthanc_cfg["DicomPort"])
        assert (dest.ae_title, dest.host, dest.port) == orthanc_address
        # Orthanc routes to the node's AE title and port; the Lua script knows the AE of returned results
        assert (modality["AET"], modality["Port"]) == (s.node.ae_title, s.node.port), path
        assert lua_setting(lua, "NODE_AET") == s.node.ae_title
        # when the node restricts callers, Orthanc (which calls with its DicomAet) is allowed
        if s.node.allowed_calling_aets:
            assert orthanc_cfg["DicomAet"] in s.node.allowed_calling_aets
    # the script also recognises the node's outputs by their Manufacturer
    assert lua_setting(lua, "NODE_MANUFACTURER") == MANUFACTURER
    assert modality["Host"] == NODE_SERVICE
    assert modality["AllowStore"] is True  # the node's results are stored through this entry
    # only listed modalities may store, and the node is one of them
    assert orthanc_cfg["DicomAlwaysAllowStore"] is False


def test_docker_models_equal_default_models() -> None:
    """The image runs the same models with the same thresholds as the default configuration."""
    docker = tomllib.loads(DOCKER_TOML.read_text(encoding="utf-8"))
    default = tomllib.loads(NODE_TOML.read_text(encoding="utf-8"))
    assert docker["models"].keys() == default["models"].keys()
    for name, table in default["models"].items():
        d = dict(docker["models"][name])
        assert PurePosixPath(d.pop("checkpoint")).name == PurePosixPath(table["checkpoint"]).name
        assert d == {k: v for k, v in table.items() if k != "checkpoint"}, name
    for section in ("worker", "outputs", "outbox", "preprocess", "render"):
        assert docker.get(section) == default.get(section), section


def test_dockerfile(dockerfile: list[tuple[str, str]]) -> None:
    instrs = [i for i, _ in dockerfile]
    args = {i: [a for j, a in dockerfile if j == i] for i in set(instrs)}
    assert args["FROM"] == ["python:3.11-slim"]
    runs = " ".join(args["RUN"])
    # torch's CPU build unless the build says otherwise (--build-arg TORCH_INDEX=..., for GPU workers)
    assert f"TORCH_INDEX={CPU_TORCH_INDEX}" in args["ARG"]
    assert '--index-url "${TORCH_INDEX}"' in runs and "pip install ." in runs
    copied = {shlex.split(a)[0] for a in args["COPY"]}
    assert {"config", "checkpoints", "gradcam", "node", "pyproject.toml"} <= copied
    # weights are never downloaded: no fetch tools, no URL other than the CPU wheel index (and the node's
    # own /healthz on loopback, for the health check)
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert not re.search(r"\b(curl|wget)\b", text)
    urls = set(re.findall(r"https?://[^\s'\"]+", text))
    assert {u for u in urls if not u.startswith("http://127.0.0.1:")} == {
        CPU_TORCH_INDEX,
        "https://pypi.org/simple",  # named in a comment: the CUDA build, for GPU workers
    }
    assert args["USER"] and args["USER"][0] != "root"
    assert args["ENTRYPOINT"] == ['["gradcam-node"]'] and args["CMD"] == ['["serve"]']
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & {"config", "checkpoints", "gradcam", "node", "pyproject.toml", "README.md"}


def test_ports_are_published_on_loopback_with_the_line_to_change(compose: dict[str, Any]) -> None:
    """Nothing is reachable from the network by default; each port's line says how a site opens it."""
    lines = COMPOSE.read_text(encoding="utf-8").splitlines()
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1" and host_port == container_port, (name, port)
            at = next(i for i, line in enumerate(lines) if f'"{port}"' in line)
            start = at  # the comment is on the line, or in the comment lines right above it
            while lines[start - 1].lstrip().startswith("#"):
                start -= 1
            comment = " ".join(line.partition("#")[2] for line in lines[start : at + 1])
            assert "SITE" in comment, (name, port, lines[start : at + 1])


def test_node_healthcheck_is_the_dockerfile_one_and_asks_healthz(
    compose: dict[str, Any], dockerfile: list[tuple[str, str]], tmp_path: Path, checkpoint_root: Path
) -> None:
    """The node's health check asks its /healthz: run it for real against a running node (its status page
    on a free port), then against the stopped node."""
    settings = load_settings(DOCKER_TOML)
    compose_code = _healthcheck_code(compose["services"][NODE_SERVICE]["healthcheck"]["test"])
    hc = next(a for i, a in dockerfile if i == "HEALTHCHECK")
    assert compose_code in hc
    url = f"http://127.0.0.1:{settings.http.port}/healthz"
    assert f"'{url}'" in compose_code

    port = helpers.free_port()
    code = compose_code.replace(url, f"http://127.0.0.1:{port}/healthz")
    node = helpers.start_node(
        tmp_path / "node",
        helpers.checkpoints_for(checkpoint_root, ("ResNet18",)),
        http={"enabled": True, "bind": "127.0.0.1", "port": port},
    )
    try:
        up = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
    finally:
        assert node.stop() == 0
    down = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert down.returncode != 0
    assert "Connection refused" in down.stderr


def test_orthanc_healthcheck_probes_both_ports(compose: dict[str, Any], orthanc_cfg: dict[str, Any]) -> None:
    """The Orthanc health check connects to the DICOM and HTTP ports: passes on listeners, fails without."""
    import socket

    code = _healthcheck_code(compose["services"][ORTHANC_SERVICE]["healthcheck"]["test"])
    wanted = (orthanc_cfg["DicomPort"], orthanc_cfg["HttpPort"])
    assert f"for p in {wanted}" in code
    listeners = []
    for _ in wanted:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        listeners.append(s)
    local = tuple(s.getsockname()[1] for s in listeners)
    try:
        ok = subprocess.run([sys.executable, "-c", code.replace(str(wanted), str(local))], timeout=30)
        assert ok.returncode == 0
        listeners.pop().close()
        bad = subprocess.run(
            [sys.executable, "-c", code.replace(str(wanted), str(local))], capture_output=True, timeout=30
        )
        assert bad.returncode != 0
    finally:
        for s in listeners:
            s.close()


def test_json_comments_are_stripped_outside_strings() -> None:
    text = '/* head */ {"a": "x//y", // c\n "b": "/*z*/", "c": "q\\"/*"} /* tail'
    with pytest.raises(ValueError, match="unterminated"):
        strip_json_comments(text)
    assert json.loads(strip_json_comments(text + " */")) == {"a": "x//y", "b": "/*z*/", "c": 'q"/*'}


def test_local_orthanc_config_changes_only_the_local_values(
    tmp_path: Path, orthanc_cfg: dict[str, Any]
) -> None:
    """What the demo, the tests and the bench run is the deployed orthanc.json with local values only."""
    local = local_orthanc_config(
        dicom_port=1111, http_port=2222, storage_dir=tmp_path, lua_path=tmp_path / "r.lua", node_port=3333
    )
    changed = {k for k in local.keys() | orthanc_cfg.keys() if local.get(k) != orthanc_cfg.get(k)}
    assert changed == {
        "DicomPort",
        "HttpPort",
        "StorageDirectory",
        "IndexDirectory",
        "LuaScripts",
        "RemoteAccessAllowed",
        "AuthenticationEnabled",
        "RegisteredUsers",
        "DicomCheckModalityHost",
        "DicomModalities",
    }
    assert (local["RemoteAccessAllowed"], local["AuthenticationEnabled"]) == (False, False)
    assert local["DicomCheckModalityHost"] is True
    node = _node_modality(local)
    assert (node["Host"], node["Port"], node["AET"]) == (
        "127.0.0.1",
        3333,
        _node_modality(orthanc_cfg)["AET"],
    )
    assert {m["Host"] for m in local["DicomModalities"].values()} == {"127.0.0.1"}


@pytest.mark.parametrize("path", [NODE_TOML, DOCKER_TOML], ids=["node.toml", "docker.toml"])
def test_derived_node_config_round_trips(tmp_path: Path, path: Path) -> None:
    """The demo and the bench rewrite node configurations: nothing but the overridden values changes."""
    original = load_settings(path)
    out = derived_node_config(path, tmp_path / "derived.toml", {"node": {"port": 12345}})
    derived = load_settings(out)
    assert derived.node == replace(original.node, port=12345)
    assert derived.core.models == original.core.models
    assert (derived.core.preprocess, derived.core.render) == (original.core.preprocess, original.core.render)
    assert (derived.worker, derived.outputs, derived.outbox) == (
        original.worker,
        original.outputs,
        original.outbox,
    )
    assert (derived.destinations, derived.default_destination) == (
        original.destinations,
        original.default_destination,
    )


# --- docker-compose.scale.yml: PostgreSQL and worker containers ------------------------------------------


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A service's depends_on in long syntax (the short list means condition service_started)."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _merged_service(compose: dict[str, Any], scale: dict[str, Any], name: str) -> dict[str, Any]:
    """A service as `docker compose -f docker-compose.yml -f docker-compose.scale.yml` sees it, for the keys
    these tests read: the override's command, environment and healthcheck replace the base's, volumes are
    merged by container path, depends_on by service."""
    base = dict(compose["services"].get(name, {}))
    over = scale["services"][name]
    merged = {**base, **over}
    merged["volumes"] = [f"{s}:{t}:{m}" for t, (s, m) in {**_volumes(base), **_volumes(over)}.items()]
    merged["depends_on"] = {**_depends_on(base), **_depends_on(over)}
    return merged


def _config_path(service: dict[str, Any]) -> str:
    command = service["command"]
    return command[command.index("--config") + 1]


def _postgres_env(scale: dict[str, Any]) -> dict[str, str]:
    env = scale["services"][POSTGRES_SERVICE]["environment"]
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _toml_differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two parsed TOML documents."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in a.keys() | b.keys():
            out |= _toml_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def _has_processes_key() -> bool:
    """Whether node.config knows [worker] processes yet (it lands with `gradcam-node work`)."""
    return "processes" in {f.name for f in fields(WorkerConfig)}


def test_scale_services_extend_the_base(compose: dict[str, Any], scale: dict[str, Any]) -> None:
    """The override adds postgres and worker, changes gradcam-node, and leaves Orthanc alone; every file and
    named volume it mounts exists."""
    services = scale["services"]
    assert set(services) == {POSTGRES_SERVICE, NODE_SERVICE, WORKER_SERVICE}
    assert "name" not in scale and "version" not in scale  # the project is docker-compose.yml's
    named = set(compose.get("volumes", {})) | set(scale.get("volumes", {}))
    for name, svc in services.items():
        for source, _ in _volumes(svc).values():
            if source.startswith(("./", "/")):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in named, f"{name}: volume {source} is not declared at top level"
    # the receiver keeps the base's image, ports and health check; only its configuration changes
    assert not {"image", "build", "ports", "healthcheck"} & set(services[NODE_SERVICE])


def test_scale_postgres_service(scale: dict[str, Any]) -> None:
    svc = scale["services"][POSTGRES_SERVICE]
    image = svc["image"]
    assert re.fullmatch(r"postgres:\d+\.\d+(-[a-z]+)?", image), f"pin PostgreSQL's image tag: {image}"
    # PostgreSQL 18's image keeps its data in /var/lib/postgresql, no longer in .../data as mounted here
    assert int(image.split(":")[1].split(".")[0]) < 18, image
    assert svc.get("restart") == "unless-stopped"
    env = _postgres_env(scale)
    assert env.keys() >= {"POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"}
    # the data on a named volume
    source, mode = _volumes(svc)["/var/lib/postgresql/data"]
    assert mode == "rw" and source in scale["volumes"]
    # reached by the other services only: no published port
    assert "ports" not in svc
    # the health check is pg_isready for the node's user and database, over TCP
    test = svc["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready", test
    args = dict(zip(test[2::2], test[3::2], strict=True))
    assert args == {"-h": "127.0.0.1", "-p": "5432", "-U": env["POSTGRES_USER"], "-d": env["POSTGRES_DB"]}
    # the password a site sets is documented where it is used
    lines = SCALE.read_text(encoding="utf-8").splitlines()
    line = next(ln for ln in lines if ln.strip().startswith("POSTGRES_PASSWORD:"))
    assert "SITE" in line and "GRADCAM_DB_PASSWORD" in line


# the password: one variable, required (no password ships), given to PostgreSQL and to the node's driver
DB_PASSWORD = re.compile(r"\$\{GRADCAM_DB_PASSWORD:\?[^}]*GRADCAM_DB_PASSWORD[^}]*\.env[^}]*\}")


def test_scale_database_url_matches_postgres_env(compose: dict[str, Any], scale: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(tomllib.loads(SCALE_TOML.read_text(encoding="utf-8"))["node"]["database_url"])
    env = _postgres_env(scale)
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port) == (POSTGRES_SERVICE, 5432)
    assert (url.username, url.password, url.database) == (env["POSTGRES_USER"], None, env["POSTGRES_DB"])
    assert DB_PASSWORD.fullmatch(env["POSTGRES_PASSWORD"]), env["POSTGRES_PASSWORD"]
    for name in (NODE_SERVICE, WORKER_SERVICE):  # libpq reads PGPASSWORD: the URL names none
        svc = _merged_service(compose, scale, name)
        assert svc["environment"]["PGPASSWORD"] == env["POSTGRES_PASSWORD"], name


def test_scale_receiver_and_workers_share_config_spool_and_checkpoints(
    compose: dict[str, Any], scale: dict[str, Any], dockerfile: list[tuple[str, str]]
) -> None:
    node = _merged_service(compose, scale, NODE_SERVICE)
    worker = scale["services"][WORKER_SERVICE]
    assert node["command"][-1] == "serve" and worker["command"] == ["--config", _config_path(node), "work"]
    settings = tomllib.loads(SCALE_TOML.read_text(encoding="utf-8"))
    node_vols, worker_vols = _volumes(node), _volumes(worker)
    for svc, vols in ((node, node_vols), (worker, worker_vols)):
        path = _config_path(svc)
        assert vols[path] == ("./config/docker-scale.toml", "ro")
        # the operator commands (docker compose exec ... gradcam-node jobs) read the same file
        assert svc["environment"] == {
            "GRADCAM_NODE_CONFIG": path,
            "PGPASSWORD": _postgres_env(scale)["POSTGRES_PASSWORD"],
        }
        assert _depends_on(svc)[POSTGRES_SERVICE] == {"condition": "service_healthy"}
    # a worker mounts what the receiver mounts, but for docker.toml (the single-container configuration)
    assert worker_vols == {t: v for t, v in node_vols.items() if v[0] != "./config/docker.toml"}
    # the spool: one named volume, read-write, at the same path, holding [node] storage_dir
    storage_dir = PurePosixPath(settings["node"]["storage_dir"])
    spool = [t for t in worker_vols if storage_dir.is_relative_to(t)]
    assert len(spool) == 1
    source, mode = worker_vols[spool[0]]
    assert node_vols[spool[0]] == (source, "rw") and mode == "rw"
    assert not source.startswith(("./", "/")) and source in compose["volumes"]
    # the checkpoints, read-only, where the configuration looks for them
    ckpt = next(t for t, (s, _) in worker_vols.items() if s == "./checkpoints")
    assert worker_vols[ckpt][1] == "ro"
    for name, table in settings["models"].items():
        assert PurePosixPath(table["checkpoint"]).parent == PurePosixPath(ckpt), name
    # the image's health check asks the status page, which a worker does not serve
    assert any(i == "HEALTHCHECK" for i, _ in dockerfile)
    assert worker["healthcheck"] == {"disable": True}


def test_scale_worker_service_is_scalable(compose: dict[str, Any], scale: dict[str, Any]) -> None:
    worker = scale["services"][WORKER_SERVICE]
    # the image the gradcam-node service builds, not a second build of it
    assert worker["image"] == compose["services"][NODE_SERVICE]["image"] and "build" not in worker
    # --scale worker=N: nothing that one container alone may have
    assert not {"container_name", "ports", "hostname"} & set(worker)
    assert worker.get("restart") == "unless-stopped"
    assert re.fullmatch(r"\d+s", str(worker.get("stop_grace_period", "")))
    # how to give it a GPU is written down next to it
    text = SCALE.read_text(encoding="utf-8")
    assert "driver: nvidia" in text and "reservations:" in text and "[worker] device" in text


def test_scale_toml_is_docker_toml_with_postgres_and_no_local_workers(tmp_path: Path) -> None:
    """docker-scale.toml differs from docker.toml in [node] database_url and [worker] processes only, and the
    node's own loader accepts it."""
    docker_raw = tomllib.loads(DOCKER_TOML.read_text(encoding="utf-8"))
    text = SCALE_TOML.read_text(encoding="utf-8")
    scale_raw = tomllib.loads(text)
    assert _toml_differences(docker_raw, scale_raw) == {"node.database_url", "worker.processes"}
    assert scale_raw["worker"]["processes"] == 0  # the worker containers analyse; serve starts none
    assert scale_raw["node"]["database_url"].startswith("postgresql+psycopg://")

    docker = load_settings(DOCKER_TOML)
    if _has_processes_key():
        scale = load_settings(SCALE_TOML)
        assert scale.worker == replace(docker.worker, processes=0)
    else:
        # node.config does not know [worker] processes yet: load the file without that one line (its paths
        # are absolute, so the copy may lie anywhere)
        stripped, count = re.subn(r"(?m)^processes\s*=.*\n", "", text)
        assert count == 1
        copy = tmp_path / SCALE_TOML.name
        copy.write_text(stripped, encoding="utf-8")
        scale = replace(load_settings(copy), path=SCALE_TOML)
        assert scale.worker == docker.worker
    assert scale.node == replace(docker.node, database_url=scale_raw["node"]["database_url"])
    core = replace(scale.core, path=docker.core.path)  # the models, preprocessing, drawing
    assert replace(scale, path=docker.path, core=core, node=docker.node, worker=docker.worker) == docker


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin (`docker compose version` failed)")
    return [docker, "compose"]


def test_docker_compose_accepts_the_merged_files() -> None:
    """`docker compose config` (no engine needed) merges the two files as the tests above assume."""
    command = [*_docker_compose(), "-f", str(COMPOSE), "-f", str(SCALE), "config", "--format", "json"]
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_DB_PASSWORD"}
    unset = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert unset.returncode != 0 and "set GRADCAM_DB_PASSWORD" in unset.stderr, unset.stderr
    env["GRADCAM_DB_PASSWORD"] = "pw-of-the-site"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    for name in (NODE_SERVICE, WORKER_SERVICE):
        assert services[name]["environment"]["PGPASSWORD"] == "pw-of-the-site"
    assert services[POSTGRES_SERVICE]["environment"]["POSTGRES_PASSWORD"] == "pw-of-the-site"
    assert set(services) == {ORTHANC_SERVICE, NODE_SERVICE, POSTGRES_SERVICE, WORKER_SERVICE}
    node, worker = services[NODE_SERVICE], services[WORKER_SERVICE]
    assert node["depends_on"][ORTHANC_SERVICE]["condition"] == "service_started"
    for svc in (node, worker):
        assert svc["depends_on"][POSTGRES_SERVICE]["condition"] == "service_healthy"
        assert svc["command"][:2] == ["--config", "/app/config/docker-scale.toml"]
    targets = {v["target"] for v in node["volumes"]}
    assert targets >= {"/app/config/docker.toml", "/app/config/docker-scale.toml"}
    assert not worker.get("ports") and node.get("ports")
    alone = subprocess.run(
        [*_docker_compose(), "-f", str(COMPOSE), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 0, alone.stderr
