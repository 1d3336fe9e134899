"""The node's device UID: one per installation, shared by every process (Device Observer UID of the SRs,
Device Serial Number of the outputs' equipment)."""

from __future__ import annotations

import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.db.tables import Setting

__all__ = ["device_uid"]

_DEVICE_UID = "device_uid"


def device_uid(factory: sessionmaker[Session], configured: str = "") -> str:
    """The node's device UID: ``[node] device_uid`` if set, else the one generated at the first start of
    this installation and kept in the database (every process of the node shares it)."""
    if configured:
        return configured
    for _ in range(2):
        with factory.begin() as s:
            row = s.get(Setting, _DEVICE_UID)
            if row is not None:
                return row.value
        try:
            with factory.begin() as s:
                s.add(Setting(name=_DEVICE_UID, value=f"2.25.{uuid.uuid4().int}"))
        except IntegrityError:
            continue  # another process made it first: read theirs
    with factory() as s:
        return s.get_one(Setting, _DEVICE_UID).value
