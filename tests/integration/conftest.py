"""Shared fixtures for tests with real DICOM peers: the node as a real subprocess, DCMTK, test inputs.

Fixtures
--------
``checkpoint_root`` / ``test_checkpoints``
    Session folder of small seeded random test checkpoints / ``{"ResNet18": path}`` made in it once.
``node_factory``
    ``node_factory(**options) -> helpers.RunningNode``: writes a temporary config (free port, tmp spool
    and SQLite, the given models, destinations and overrides), starts ``python -m node.cli --config CFG
    serve``, waits until it answers C-ECHO (polling with a deadline), and at teardown stops it with SIGTERM
    and prints its log (shown when the test failed).
``node``
    A node started with the defaults (any caller accepted, no destinations, ResNet18 only).
``dicom_files``
    ``dicom_files(name, **helpers.image_dataset options) -> Path``: a synthetic DICOM file in tmp_path.

The plain functions (``free_port``, ``dcmtk``, ``run_tool``, ``wait_until``, ``start_node``...) live in
``tests/helpers.py``; this file puts ``tests/`` on ``sys.path`` so that test modules can ``import helpers``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import helpers  # noqa: E402

__all__ = ["NodeFactory"]

NodeFactory = Callable[..., helpers.RunningNode]


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding the test checkpoints (see ``helpers.checkpoints_for``)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def test_checkpoints(checkpoint_root: Path) -> dict[str, Path]:
    """``{"ResNet18": path}``: one small seeded random checkpoint, made once per session."""
    return helpers.checkpoints_for(checkpoint_root, ("ResNet18",))


@pytest.fixture
def node_factory(tmp_path: Path, checkpoint_root: Path) -> Iterator[NodeFactory]:
    """Start nodes: ``node_factory(**options) -> RunningNode``, ready (answers C-ECHO) unless ``wait=False``.

    Options: ``models`` (names from ``helpers.TEST_MODELS``; default ``("ResNet18",)``), ``ae_title``,
    ``port``, ``destinations`` (dicts: name, ae_title, host, port), ``default_destination``,
    ``thresholds``, ``input_size``, ``wait``, ``env`` (extra environment variables), and any config table
    as a dict: ``node={"allowed_calling_aets": ["MODALITY"], "min_free_disk_mb": 10**9}``,
    ``worker={"batch_size": 1}``, ``outbox={"backoff_initial_s": 0.1}``, ``render={"max_side": 256}``.
    Each node gets its own folder ``tmp_path/nodeN`` (``node.toml``, ``spool/``, ``node.db``, ``node.log``).
    """
    started: list[helpers.RunningNode] = []

    def factory(
        *, models: Iterable[str] = ("ResNet18",), wait: bool = True, **options: Any
    ) -> helpers.RunningNode:
        base = tmp_path / f"node{len(started)}"
        checkpoints = helpers.checkpoints_for(checkpoint_root, models)
        running = helpers.start_node(base, checkpoints, wait=False, **options)
        started.append(running)  # registered before waiting, so teardown stops it whatever happens
        if wait:
            running.wait_ready()
        return running

    yield factory
    for running in started:
        running.stop()
        print(f"----- node log {running.log_path} (exit {running.proc.returncode}) -----")
        print(running.log_text())


@pytest.fixture
def node(node_factory: NodeFactory) -> helpers.RunningNode:
    """A node with the default test configuration, ready."""
    return node_factory()


@pytest.fixture
def dicom_files(tmp_path: Path) -> Callable[..., Path]:
    """``dicom_files(name, **helpers.image_dataset options) -> Path``: a synthetic DICOM file.

    ``kind="sr"`` writes a Basic Text SR instead (options ``study_uid``, ``sop_uid``).
    """

    def write(name: str, kind: str = "image", **options: Any) -> Path:
        ds = helpers.sr_dataset(**options) if kind == "sr" else helpers.image_dataset(**options)
        return helpers.write_dataset(ds, tmp_path / "inputs" / f"{name}.dcm")

    return write
