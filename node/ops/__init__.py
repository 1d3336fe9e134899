"""Operating the node: the operator's commands and what ``serve`` does on its own to keep going.

- :mod:`node.ops.resend`: ``gradcam-node resend``: send existing outputs again;
- :mod:`node.ops.reprocess`: ``gradcam-node reprocess``: analyse received instances again;
- :mod:`node.ops.purge`: ``gradcam-node purge`` and ``[retention]``: delete old spool files, keep the rows;
- :mod:`node.ops.record`: every one of them is written to the ``operations`` table and to the log;
- :mod:`node.ops.commands`: the command-line side (open the database, print, exit codes);
- :mod:`node.ops.housekeeping`: the thread of ``serve`` that runs the retention and picks up work that
  another process (an operator command) queued;
- :mod:`node.ops.logs`: ``[logging]``: stderr (journald, ``docker logs``) or a rotating file.

The commands change only the database (and, for ``purge``, the spool): a running node notices new work by
polling (:class:`~node.ops.housekeeping.Housekeeping`), so they need no channel to it.
"""

from __future__ import annotations

__all__: list[str] = []  # import the modules themselves; this package loads nothing (`--help` stays quick)
