"""A throw-away PostgreSQL server for tests (the ``postgres_server`` and ``pg_url`` fixtures of conftest.py).

:class:`PostgresServer` makes a cluster in a new temporary folder (``initdb``, trust authentication,
superuser ``postgres``), starts it on 127.0.0.1 at a free port with its Unix socket in that folder and
durability off (``fsync``, ``synchronous_commit``, ``full_page_writes``: a crash loses nothing a test
needs), and on :meth:`~PostgresServer.stop` kills it and removes the folder. The programs come from
``PATH`` or else from the newest ``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql``, which
``make test`` installs). PostgreSQL refuses to run as root: as root, ``initdb`` and ``pg_ctl`` run as the
``postgres`` user that the package creates (``runuser``), and the folder is given to it.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "find_programs"]

_DEBIAN = Path("/usr/lib/postgresql")
_USER = "postgres"  # the cluster's superuser and, as root, the OS user that runs it
_NOT_INSTALLED = (
    "PostgreSQL is not installed (no initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin): "
    "`make test` installs it (apt-get install postgresql)"
)


def find_programs() -> tuple[Path, Path]:
    """``initdb`` and ``pg_ctl``: from ``PATH``, else from the newest ``/usr/lib/postgresql/*/bin``.

    Fails the test (not a skip: the tests must not pass without a real server) when there are none.
    """
    on_path = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if all(on_path):
        return Path(on_path[0]), Path(on_path[1])  # type: ignore[arg-type]

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name))

    bindirs = [d for d in _DEBIAN.glob("*/bin") if (d / "initdb").is_file() and (d / "pg_ctl").is_file()]
    if not bindirs:
        pytest.fail(_NOT_INSTALLED, pytrace=False)
    newest = max(bindirs, key=version)
    return newest / "initdb", newest / "pg_ctl"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One PostgreSQL server of the test session, in a temporary folder of its own.

    Attributes
    ----------
    port
        The TCP port on 127.0.0.1 (0 until :meth:`start`).
    root
        The temporary folder: ``data/`` (the cluster), ``socket/`` and ``server.log``.
    startup_s
        How long :meth:`start` took (initdb and start), in seconds.
    """

    def __init__(self) -> None:
        self.port = 0
        self.root: Path | None = None
        self.startup_s = 0.0
        self._pg_ctl: Path | None = None
        self._as_user: list[str] = []  # the command prefix that runs a program as the server's owner

    # -- life -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Make a new cluster and start it (``pg_ctl start -w``); fails the test if it cannot."""
        t0 = time.monotonic()
        initdb, self._pg_ctl = find_programs()
        owner = self._owner()
        self.root = Path(tempfile.mkdtemp(prefix="gradcam-node-pg-"))
        atexit.register(self.stop)  # a session that dies without its teardown leaves no server behind
        (self.root / "socket").mkdir()
        if owner is not None:
            for path in (self.root, self.root / "socket"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        error = self._run(
            [str(initdb), "-D", str(self.data), "-U", _USER, "--auth=trust", "--encoding=UTF8",
             "--locale=C", "--no-sync"],
            "initdb",
        )  # fmt: skip
        if error:
            self._fail(error)
        for attempt in range(3):  # the free port may be taken by someone else before the server binds it
            self.port = _free_port()
            options = [
                "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
                "-c", f"unix_socket_directories={self.root / 'socket'}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ]  # fmt: skip
            error = self._run(
                [str(self._pg_ctl), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                 "-o", shlex.join(options)],
                "pg_ctl start",
            )  # fmt: skip
            if not error:
                break
            if attempt == 2 or "already in use" not in error:
                self._fail(error)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """Kill the server (``pg_ctl stop -m immediate``) and remove its folder; safe to call twice."""
        root, self.root = self.root, None
        if root is None:
            return
        atexit.unregister(self.stop)
        if self._pg_ctl is not None and (root / "data" / "postmaster.pid").exists():
            stop = [str(self._pg_ctl), "stop", "-w", "-m", "immediate", "-D", str(root / "data")]
            subprocess.run([*self._as_user, *stop], cwd=root, capture_output=True, check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        self.port = 0

    # -- use --------------------------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        """The SQLAlchemy URL of database ``dbname`` on this server."""
        return f"postgresql+psycopg://{_USER}@127.0.0.1:{self.port}/{dbname}"

    @contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new empty database with a unique name, as a SQLAlchemy URL; dropped (its connections ended
        first) afterwards."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.create_database(name)
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    def create_database(self, name: str) -> None:
        """``CREATE DATABASE name``."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending the sessions still connected to it first."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def add_password_user(self, name: str, password: str, database: str) -> None:
        """A login role ``name`` that must give ``password`` (scram-sha-256) over TCP, owner of ``database``.
        The server trusts every other user as before."""
        from psycopg import sql

        with self._admin() as conn:
            role = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
            conn.execute(role.format(sql.Identifier(name), sql.Literal(password)))
            owner = sql.SQL("ALTER DATABASE {} OWNER TO {}")
            conn.execute(owner.format(sql.Identifier(database), sql.Identifier(name)))
            hba = self.data / "pg_hba.conf"  # the first line that matches decides
            hba.write_text(f"host all {name} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")

    # -- inside -----------------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "data"

    @property
    def log(self) -> Path:
        assert self.root is not None, "the server is not started"
        return self.root / "server.log"

    def _admin(self):  # noqa: ANN202 - a psycopg.Connection (psycopg is imported only when used)
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user={_USER} dbname=postgres connect_timeout=10"
        return psycopg.connect(conninfo, autocommit=True)

    def _owner(self) -> pwd.struct_passwd | None:
        """The OS user the server runs as when we are root (None: we are not, it runs as us)."""
        if os.geteuid() != 0:
            self._as_user = []
            return None
        try:
            owner = pwd.getpwnam(_USER)
        except KeyError:
            pytest.fail(
                f"running as root, and PostgreSQL refuses to run as root; there is no {_USER!r} user to run"
                " it as (Debian's postgresql package creates it: apt-get install --reinstall postgresql)",
                pytrace=False,
            )
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        self._as_user = [runuser, "-u", _USER, "--"]
        return owner

    def _run(self, command: list[str], what: str) -> str | None:
        """Run ``command`` as the server's owner; None, or what went wrong: its output and the end of the
        server's log."""
        # cwd: the server's folder, which its owner can enter (the caller's folder may be closed to it)
        run = [*self._as_user, *command]
        done = subprocess.run(run, cwd=self.root, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode == 0:
            return None
        return (
            f"{what} failed (exit {done.returncode}): {shlex.join(command)}\n"
            f"{done.stdout}{done.stderr}{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "--- server.log (end) ---\n" + "\n".join(tail) if tail else ""

    def _fail(self, message: str) -> None:
        self.stop()
        pytest.fail(message, pytrace=False)
