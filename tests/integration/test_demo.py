"""``gradcam-node demo``: its own state, the commands it prints, what ``--exit`` says.

- The demo node's configuration puts its spool and database under the demo's folder, never the default
  node's (results ``make run`` left pending were delivered into the demo's Orthanc).
- The "what the node did" command it prints runs as printed (``gradcam-node`` need not be on PATH) and reads
  the demo's database.
- With ``--exit`` the last lines name no address of the Orthanc that was just stopped (a full demo run with
  Debian's Orthanc and the committed checkpoints, about two minutes on two cores).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from gradcam.config import DEFAULT_CONFIG
from node.config import load_settings
from node.ops.demo import _demo_ports, demo_state_dir, node_command, run_demo
from node.ops.node_toml import derived_node_config
from node.ops.orthanc import OrthancClient
from node.ops.peers import free_port
from tests.integration.orthanc_fixture import require_orthanc


def _run_printed(command: str) -> subprocess.CompletedProcess[str]:
    """Run a command line as a user pastes it into a shell in the current directory."""
    return subprocess.run(
        shlex.split(command), capture_output=True, text=True, timeout=120, check=False, cwd=os.getcwd()
    )


def test_demo_node_has_its_own_spool_and_database(tmp_path: Path) -> None:
    default = load_settings(DEFAULT_CONFIG)
    config, *_ = _demo_ports(default, tmp_path)
    demo = load_settings(config)
    state = demo_state_dir(tmp_path)
    assert state.is_relative_to(tmp_path)
    assert demo.node.storage_dir == state / "spool"
    assert demo.database_url == f"sqlite:///{state / 'gradcam-node.db'}"
    assert demo.node.storage_dir != default.node.storage_dir
    assert demo.database_url != default.database_url
    # everything else is the shipped configuration (models, destinations, AE titles)
    assert demo.node.ae_title == default.node.ae_title
    assert demo.default_destination == default.default_destination


def test_printed_jobs_command_runs_on_the_demo_config(tmp_path: Path) -> None:
    config, *_ = _demo_ports(load_settings(DEFAULT_CONFIG), tmp_path)
    command = node_command("--config", config, "jobs")
    program = shlex.split(command)[0]
    assert os.access(program, os.X_OK), f"{program} is not an executable file"
    assert program.endswith("gradcam-node")  # the installed script next to this interpreter
    done = _run_printed(command)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("  JOB"), done.stdout
    assert not (demo_state_dir(tmp_path) / "gradcam-node.db").exists()  # reading created no database


def test_node_command_without_script_uses_the_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = tmp_path / "env" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(python))
    assert shlex.split(node_command("--config", tmp_path / "a b.toml", "jobs")) == [
        str(python),
        "-m",
        "node.cli",
        "--config",
        str(tmp_path / "a b.toml"),
        "jobs",
    ]


@pytest.mark.integration
def test_demo_exit_names_no_dead_url_and_its_jobs_command_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_orthanc()
    default = load_settings(DEFAULT_CONFIG)
    orthanc_port = free_port()
    ports = derived_node_config(  # free ports: the demo falls back to them anyway, but this way it is sure
        DEFAULT_CONFIG,
        tmp_path / "ports.toml",
        {
            "node": {"port": free_port()},
            "destinations": [
                {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": orthanc_port}
                for d in default.destinations
            ],
        },
    )
    workdir = tmp_path / "demo"

    rc = run_demo(load_settings(ports), keep_running=False, workdir=workdir)

    out = capsys.readouterr().out
    print(out)  # shown when the test fails
    assert rc == 0
    assert "Checked in Orthanc: 4 of 4 studies hold the node's results" in out
    started = re.search(r"HTTP (http://127\.0\.0\.1:\d+)\)", out)
    assert started is not None, "the start line names Orthanc's address while it runs"
    assert not OrthancClient(started.group(1), timeout=2).alive()  # ... and it is dead now
    closing = out[out.index("AI research output - not for diagnostic use.") :]
    assert "http" not in closing and "Explorer:" not in closing
    assert "Orthanc and the node are stopped now (--exit)" in closing
    assert "without --exit" in closing and "make demo" in closing

    line = re.search(r"^What the node did: (.+)$", closing, re.MULTILINE)
    assert line is not None
    assert "--config" in line.group(1)
    done = _run_printed(line.group(1))
    assert done.returncode == 0, done.stderr
    # the demo's own database: its four images, their outputs in the demo's spool
    for dcm in sorted((workdir / "inputs").glob("*.dcm")):
        assert str(pydicom.dcmread(dcm, stop_before_pixels=True).SOPInstanceUID) in done.stdout
    spool = demo_state_dir(workdir) / "spool"
    outputs = re.findall(r"(\S+/outputs/\S+)", done.stdout)
    assert outputs, done.stdout
    assert all(Path(p).resolve().is_relative_to(spool.resolve()) for p in outputs), outputs


@pytest.mark.integration
def test_demo_says_at_once_why_studies_get_no_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A node that cannot analyse any image (here: every image is over [preprocess] max_pixels) ends the
    demo as soon as every study is accounted for, with the node's reasons, instead of waiting 15 minutes."""
    require_orthanc()
    default = load_settings(DEFAULT_CONFIG)
    orthanc_port = free_port()
    ports = derived_node_config(
        DEFAULT_CONFIG,
        tmp_path / "ports.toml",
        {
            "node": {"port": free_port()},
            "preprocess": {"max_pixels": 1},
            "destinations": [
                {"name": d.name, "ae_title": d.ae_title, "host": d.host, "port": orthanc_port}
                for d in default.destinations
            ],
        },
    )

    rc = run_demo(load_settings(ports), keep_running=False, workdir=tmp_path / "demo")

    out = capsys.readouterr().out
    print(out)  # shown when the test fails
    assert rc != 0
    line = re.search(r"^4 of 4 studies will get no results: the node reports (.+)\. Why: (.+)$", out, re.M)
    assert line is not None, "the reason, in one line"
    assert re.fullmatch(r"4 job\(s\) (failed|skipped)", line.group(1)), line.group(1)
    assert "--config" in line.group(2) and " jobs and " in line.group(2)
    assert "within 900 s" not in out
    assert "Orthanc and the node are stopped now (--exit)" in out
