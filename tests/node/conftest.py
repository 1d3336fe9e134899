"""Fixtures of the node's unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from node.db import create_schema, make_engine, session_factory


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker]:
    """Sessions on a new SQLite database file, at the current schema."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    create_schema(engine)
    yield session_factory(engine)
    engine.dispose()
