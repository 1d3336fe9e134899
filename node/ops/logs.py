"""``[logging]``: where the log lines of every command go, set up once per process.

- ``file = ""`` (the default): stderr. Under systemd that is the journal: when stderr is the journal's
  stream (``JOURNAL_STREAM``), each line starts with its syslog priority (``<4>`` for a warning), which
  journald stores as the entry's priority (``journalctl -p warning``), and without a timestamp of our own
  (journald keeps its own). Under compose, ``docker compose logs``.
- ``file = "PATH"``: ``serve`` writes there, rotating at ``max_mb`` and keeping ``backups`` old files.
  Other commands (an operator's ``resend``...) append their lines to the same file, so the log tells the
  whole story, and keep stderr too; only ``serve`` rotates.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

from gradcam.errors import ConfigError
from node.config import LoggingConfig

__all__ = ["FORMAT", "setup_logging", "stderr_is_journal"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Our own handlers log every association, store and send once; the libraries would repeat them.
_QUIET = {"pynetdicom": logging.CRITICAL, "highdicom": logging.WARNING, "alembic": logging.WARNING}


def stderr_is_journal() -> bool:
    """Whether stderr is connected to systemd's journal (``JOURNAL_STREAM`` names its device and inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalFormatter(logging.Formatter):
    """sd-daemon(3) priority prefixes: journald reads ``<N>`` at the start of a line as its priority."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        priority = self._PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JournalFormatter(_JOURNAL_FORMAT) if stderr_is_journal() else logging.Formatter(FORMAT)
    )
    return handler


def _file_handler(cfg: LoggingConfig, serving: bool) -> logging.Handler:
    assert cfg.file is not None
    cfg.file.parent.mkdir(parents=True, exist_ok=True)
    if serving:
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            cfg.file, maxBytes=cfg.max_mb * 2**20, backupCount=cfg.backups, encoding="utf-8"
        )
    else:
        handler = logging.FileHandler(cfg.file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def setup_logging(
    cfg: LoggingConfig | None = None, *, debug: bool = False, serving: bool = False, config_file: str = ""
) -> None:
    """Send the process's log lines where ``cfg`` says (stderr when None, before the configuration is
    read); ``debug`` logs everything, the libraries' lines too. Replaces any earlier set-up.

    Raises
    ------
    ConfigError
        ``serve`` cannot write its log file. Another command that cannot (an operator without the right
        to) logs to stderr only, with a warning.
    """
    cfg = cfg or LoggingConfig()
    handlers: list[logging.Handler] = []
    unwritable = None
    if cfg.file is not None:
        try:
            handlers.append(_file_handler(cfg, serving))
        except OSError as exc:
            unwritable = f"cannot write the log file {cfg.file}: {exc.strerror or exc}"
            if serving:
                raise ConfigError(config_file, "logging.file", unwritable) from exc
    if cfg.file is None or not serving:
        handlers.append(_stderr_handler())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else getattr(logging, cfg.level))
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(logging.NOTSET if debug else level)
    if unwritable:
        logging.getLogger("node.ops").warning("%s: logging to stderr only", unwritable)
