"""What a user sees when ``gradcam-node`` cannot do its job: one line, exit code 1, as real subprocesses.

Each start-up failure of ``serve`` (a checkpoint that is missing, of another architecture or no checkpoint
at all; the port taken; a spool that cannot be written; a database that cannot be used) must end in one
``gradcam-node: error: ...`` line on stderr that says what to do, exit code 1, and no traceback unless
``--debug``. Also: ``--config`` after the subcommand, ``echo`` to an unknown host, and a reader that goes
away (``gradcam-node jobs | head``).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helpers
import pytest

pytestmark = pytest.mark.integration

ERROR = "gradcam-node: error: "
# the node's own log lines (logging's format in node.cli): all stderr may hold besides the error
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) [\w.]+: ")


def _config(base: Path, checkpoints: Mapping[str, Path], **overrides: Any) -> Path:
    """``base/node.toml``: a free port, ``base/spool`` and ``base/node.db`` unless ``overrides`` differ."""
    options: dict[str, Any] = {
        "port": helpers.free_port(),
        "storage_dir": base / "spool",
        "database_url": f"sqlite:///{base / 'node.db'}",
    }
    options.update(overrides)
    return helpers.write_test_config(base / "node.toml", checkpoints=checkpoints, **options)


def _cli(*args: str | Path, timeout: float = helpers.START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *map(str, args)],
        cwd=helpers.REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_error(res: subprocess.CompletedProcess[str]) -> str:
    """The error line of a failed command (exit code 1, no traceback, nothing else but log lines)."""
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith(ERROR)]
    others = [
        line for line in res.stderr.splitlines() if not line.startswith(ERROR) and not LOG_LINE.match(line)
    ]
    assert len(errors) == 1 and not others, res.stderr
    return errors[0][len(ERROR) :]


@pytest.fixture
def resnet(checkpoint_root: Path) -> Path:
    return helpers.checkpoints_for(checkpoint_root, ("ResNet18",))["ResNet18"]


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pt"
    cfg = _config(tmp_path, {"ResNet18": absent})
    error = _one_error(_cli("--config", cfg, "serve"))
    assert error == (
        f"model ResNet18: checkpoint {absent} not found: train one with `gradcam-node train --model ResNet18 "
        f"--out {absent}` or point `checkpoint` of [models.ResNet18] in {cfg} at an existing file"
    )


def test_checkpoint_of_another_architecture_is_one_line(tmp_path: Path, checkpoint_root: Path) -> None:
    effnet = helpers.checkpoints_for(checkpoint_root, ("EfficientNet-B0",))["EfficientNet-B0"]
    cfg = _config(tmp_path, {"ResNet18": effnet})
    error = _one_error(_cli("--config", cfg, "serve"))
    assert error.startswith(f"model ResNet18: checkpoint {effnet} does not fit the architecture: ")
    assert error.endswith(
        f"point `checkpoint` of [models.ResNet18] in {cfg} at a resnet18 checkpoint or set `builder` to "
        "the checkpoint's architecture"
    )


def test_text_file_as_checkpoint_is_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("these are not weights\n", encoding="utf-8")
    error = _one_error(_cli("--config", _config(tmp_path, {"ResNet18": text}), "serve"))
    assert error.startswith(f"model ResNet18: {text} is not a PyTorch checkpoint file (")
    assert "unpickling" not in error


def test_debug_keeps_the_traceback(tmp_path: Path) -> None:
    res = _cli("--config", _config(tmp_path, {"ResNet18": tmp_path / "absent.pt"}), "serve", "--debug")
    assert res.returncode != 0
    assert "Traceback (most recent call last)" in res.stderr and "CheckpointMissingError" in res.stderr


def test_port_in_use_is_said_before_the_models_load(tmp_path: Path, resnet: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = _config(tmp_path, {"ResNet18": resnet}, port=port)
        res = _cli("--config", cfg, "serve", timeout=60)
    assert _one_error(res) == (
        f"cannot listen on 127.0.0.1:{port}: Address already in use: another program (another "
        f"gradcam-node?) holds the port: stop it or set [node] port in {cfg}"
    )
    assert "loading models" not in res.stderr  # said before, not after the seconds of loading


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_spool_that_cannot_be_a_folder(tmp_path: Path, resnet: Path, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the spool should be", encoding="utf-8")
    spool = blocker if where == "a file" else blocker / "spool"
    cfg = _config(tmp_path, {"ResNet18": resnet}, storage_dir=spool)
    error = _one_error(_cli("--config", cfg, "serve", timeout=60))
    reason = "is a file" if where == "a file" else "cannot be made (Not a directory)"
    assert error == f"spool folder {spool} {reason}: set [node] storage_dir in {cfg} to a writable folder"


def test_file_that_is_no_database(tmp_path: Path, resnet: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not SQLite at all " * 100)
    cfg = _config(tmp_path, {"ResNet18": resnet}, database_url=f"sqlite:///{junk}")
    assert _one_error(_cli("--config", cfg, "serve", timeout=60)) == (
        f"database sqlite:///{junk} cannot be used: file is not a database: it is not a SQLite database: "
        f"point [node] database_url in {cfg} at the node's database or a new file"
    )


def test_database_another_program_keeps_locked(tmp_path: Path, resnet: Path) -> None:
    """Another process holds the SQLite file locked past the busy timeout (30 s): one line, exit 1."""
    import sqlite3

    db = tmp_path / "node.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE other_program (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        cfg = _config(tmp_path, {"ResNet18": resnet})
        line = _one_error(_cli("--config", cfg, "serve", timeout=120))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert line == (
        f"database sqlite:///{db} cannot be used: database is locked: another program holds it locked "
        "(another gradcam-node?): stop it, then start again"
    )


def test_database_in_a_folder_that_cannot_be_made(tmp_path: Path, resnet: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be", encoding="utf-8")
    cfg = _config(tmp_path, {"ResNet18": resnet}, database_url=f"sqlite:///{blocker / 'node.db'}")
    assert _one_error(_cli("--config", cfg, "serve", timeout=60)) == (
        f"database sqlite:///{blocker / 'node.db'}: cannot make its folder ({blocker} is a file): "
        f"point [node] database_url in {cfg} into a writable folder"
    )


def test_database_server_url_is_shown_without_its_password(tmp_path: Path, resnet: Path) -> None:
    """No PostgreSQL here: port 1 has no server, and the driver may not even be installed; either way the
    line names the URL, never the password."""
    url = "postgresql+psycopg://gradcam:s3cret-pw@127.0.0.1:1/gradcam"
    cfg = _config(tmp_path, {"ResNet18": resnet}, database_url=url)
    res = _cli("--config", cfg, "serve", timeout=60)
    error = _one_error(res)
    assert error.startswith("database postgresql+psycopg://gradcam:***@127.0.0.1:1/gradcam")
    assert "s3cret-pw" not in res.stderr + res.stdout
    assert f"[node] database_url in {cfg}" in error


def test_config_after_the_subcommand(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pt"
    cfg = _config(tmp_path, {"ResNet18": absent})
    # what people type; the error proves that this file, and not config/node.toml, was read
    assert f"checkpoint {absent} not found" in _one_error(_cli("serve", "--config", cfg))
    # after the subcommand wins over before it; --debug there too
    res = _cli("--config", tmp_path / "elsewhere.toml", "serve", "--config", cfg, "--debug")
    assert "CheckpointMissingError" in res.stderr and "Traceback" in res.stderr
    # and before it still works, with no value after it to clobber it
    assert f"checkpoint {absent} not found" in _one_error(_cli("--config", cfg, "serve"))


def test_echo_to_an_unknown_host(tmp_path: Path, resnet: Path) -> None:
    dest = {"name": "pacs", "ae_title": "PACS", "host": "no-such-host.invalid", "port": 104}
    cfg = _config(tmp_path, {"ResNet18": resnet}, destinations=[dest], node={"acse_timeout_s": 1})
    res = _cli("echo", "pacs", "--config", cfg, timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stdout.startswith(
        "pacs (PACS@no-such-host.invalid:104): FAILED: cannot resolve host 'no-such-host.invalid'"
    )
    assert "Errno" not in res.stdout + res.stderr


def test_reader_that_goes_away_ends_quietly(tmp_path: Path, resnet: Path) -> None:
    """``gradcam-node jobs | head``: no "Broken pipe" message, the exit code of a tool killed by SIGPIPE."""
    cfg = _config(tmp_path, {"ResNet18": resnet})
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "jobs", "--config", str(cfg)],
        cwd=helpers.REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before the command has printed anything: every write finds the pipe closed
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 141, stderr
    assert stderr == ""


def test_a_gpu_this_machine_has_not_is_one_line(tmp_path: Path, resnet: Path) -> None:
    """`work` and `serve` on [worker] device = "cuda:63": no machine here has 64 GPUs."""
    cfg = _config(tmp_path, {"ResNet18": resnet}, worker={"device": "cuda:63"})
    for command in ("work", "serve"):
        error = _one_error(_cli("--config", cfg, command))
        assert re.fullmatch(
            r'\[worker\] device = "cuda:63", but (torch sees no CUDA GPU here: set device = "auto" or "cpu"'
            r"|this machine has \d+ CUDA GPU\(s\): use cuda:0 to cuda:N-1)",
            error,
        ), error


def test_work_without_its_checkpoint_is_one_line(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pt"
    cfg = _config(tmp_path, {"ResNet18": absent})
    error = _one_error(_cli("--config", cfg, "work"))
    assert error.startswith(f"model ResNet18: checkpoint {absent} not found: ")
