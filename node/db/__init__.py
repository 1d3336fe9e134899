"""The database every process of the node shares: its tables (:mod:`node.db.tables`), the connection of a
process (:mod:`node.db.engine`) and the schema's revisions (:mod:`node.db.migrations`)."""

from node.db.engine import BUSY_TIMEOUT_MS, create_schema, make_engine, recover, session_factory
from node.db.tables import (
    Association,
    AssociationStatus,
    Base,
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
    utcnow,
)

__all__ = [
    "BUSY_TIMEOUT_MS",
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
    "Operation",
    "utcnow",
    "make_engine",
    "create_schema",
    "session_factory",
    "recover",
]
