"""Operating the node: the operator's commands and what ``serve`` does on its own to keep going.

- :mod:`node.ops.resend`: ``gradcam-node resend``: send existing outputs again;
- :mod:`node.ops.reprocess`: ``gradcam-node reprocess``: analyse received instances again;
- :mod:`node.ops.purge`: ``gradcam-node purge`` and ``[retention]``: delete old spool files, keep the rows;
- :mod:`node.ops.record`: every one of them is written to the ``operations`` table and to the log;
- :mod:`node.ops.commands`: the command-line side (open the database, print, exit codes);
- :mod:`node.ops.housekeeping`: the thread of ``serve`` that runs the retention and picks up work that
  another process (an operator command) queued;
- :mod:`node.ops.logs`: ``[logging]``: stderr (journald, ``docker logs``) or a rotating file;
- :mod:`node.ops.report`: ``gradcam-node jobs``: what the node received, did and sent;
- :mod:`node.ops.demo`: ``gradcam-node demo``, on :mod:`node.ops.orthanc` (Orthanc on this machine),
  :mod:`node.ops.peers` (DCMTK's tools, the node as a child process, free ports) and
  :mod:`node.ops.node_toml` (a node configuration derived from another), which the integration tests and
  the benches use too.

The commands change only the database (and, for ``purge``, the spool): a running node notices new work by
polling (:class:`~node.ops.housekeeping.Housekeeping`), so they need no channel to it.
"""

from __future__ import annotations

__all__: list[str] = []  # import the modules themselves; this package loads nothing (`--help` stays quick)
