"""The database every process of the node shares: its tables (:mod:`node.db.tables`), the connection of
a process (:mod:`node.db.engine`), the leases by which processes hold jobs and sends
(:mod:`node.db.leases`) and the schema's revisions (:mod:`node.db.migrations`)."""

from node.db.engine import BUSY_TIMEOUT_MS, create_schema, make_engine, missing_sqlite_file, session_factory
from node.db.leases import LeaseKeeper, holder_id, recover
from node.db.tables import (
    Association,
    AssociationStatus,
    Base,
    Delivery,
    Instance,
    InstanceStatus,
    Job,
    JobStatus,
    Operation,
    Output,
    Result,
    Send,
    SendAttempt,
    SendStatus,
    Setting,
    UtcDateTime,
    WorkerState,
    utcnow,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
    "missing_sqlite_file",
    "Base",
    "UtcDateTime",
    "AssociationStatus",
    "InstanceStatus",
    "JobStatus",
    "SendStatus",
    "Association",
    "Instance",
    "Job",
    "Result",
    "Output",
    "Setting",
    "Send",
    "SendAttempt",
    "Delivery",
    "Operation",
    "WorkerState",
    "utcnow",
    "make_engine",
    "create_schema",
    "session_factory",
    "recover",
    "holder_id",
    "LeaseKeeper",
]
