"""[worker]: worker processes, leases, device and polling, as the configuration file says them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gradcam.errors import ConfigError
from node.config import WorkerConfig, default_processes, load_settings
from tests import helpers


def _settings(tmp_path: Path, **worker: Any) -> Any:
    return load_settings(
        helpers.write_test_config(
            tmp_path / "node.toml",
            checkpoints={"ResNet18": tmp_path / "unused.pt"},  # never loaded here
            port=helpers.free_port(),
            storage_dir=tmp_path / "spool",
            database_url=f"sqlite:///{tmp_path / 'node.db'}",
            worker=worker,
        )
    )


def test_defaults_use_the_machine(tmp_path: Path) -> None:
    w = _settings(tmp_path, processes="auto").worker
    assert (w.processes, w.lease_s, w.device, w.poll_s) == (default_processes(), 30.0, "auto", 1.0)
    assert default_processes() == min(8, max(2, (os.cpu_count() or 2) // 4))


def test_processes_and_device_as_given(tmp_path: Path) -> None:
    w = _settings(tmp_path, processes=0, device="CUDA:1", lease_s=5, poll_s=0.2).worker
    assert (w.processes, w.device, w.lease_s, w.poll_s) == (0, "cuda:1", 5.0, 0.2)
    assert _settings(tmp_path, processes="auto").worker.processes == default_processes()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("processes", -1, 'expected "auto" or a whole number from 0 (no local workers) to 64, got -1'),
        (
            "processes",
            "two",
            "expected \"auto\" or a whole number from 0 (no local workers) to 64, got 'two'",
        ),
        ("processes", True, 'expected "auto" or a whole number from 0 (no local workers) to 64, got True'),
        ("device", "gpu", 'expected "auto", "cpu", "cuda" or "cuda:N" (N: the GPU\'s index), got \'gpu\''),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, **{key: value})
    assert (info.value.key, info.value.expected) == (f"worker.{key}", expected)


def test_lease_s_has_a_floor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(tmp_path, lease_s=0.5)
    assert info.value.key == "worker.lease_s"


def test_model_threads_are_shared_among_the_worker_processes() -> None:
    cores = os.cpu_count() or 2
    assert WorkerConfig(processes=1).threads() == max(1, cores - 1)
    assert WorkerConfig(processes=2).threads() == max(1, (cores - 1) // 2)
    assert WorkerConfig(processes=0).threads() == max(1, cores - 1)  # a `work` process of its own
    assert WorkerConfig(processes=2, inference_threads=3).threads() == 3
