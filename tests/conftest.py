"""Root fixtures of the core's tests: small seeded random models and checkpoints, and a config using them.

Fixtures
--------
``model_factory``
    ``model_factory(builder, target_layer, seed=0, size=64) -> nn.Module``: a seeded random model in eval
    mode whose batch norms are calibrated on synthetic images and whose final Linear has N(0, 1) weights,
    rescaled and shifted so that logits spread by about 2 around 0: maps and decisions are not degenerate
    (raw random networks give vanishing features and saturated, identical probabilities).
``batch_factory``
    ``batch_factory(n, size, seed) -> Tensor``: ``n`` different synthetic grey images as a normalised
    ``(n, 3, size, size)`` model input.
``tiny_checkpoints``
    ``{model name: checkpoint path}`` for the three default models (input size 64), made once a session.
``tiny_config_path`` / ``core_config``
    A complete node configuration file pointing at them (input_size 64) / its parsed core section.
``postgres_server``
    A throw-away PostgreSQL server (:class:`tests.postgres.PostgresServer`), started the first time a test
    asks for it and stopped at the end of the session.
``pg_url``
    The SQLAlchemy URL (``postgresql+psycopg://``) of a new empty database on it, dropped after the test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from gradcam.config import CoreConfig, ModelConfig, load_core_config
from gradcam.models import build_model, save_checkpoint
from tests import helpers
from tests.postgres import PostgresServer

TINY_INPUT = 64
ModelFactory = Callable[..., nn.Module]


def synthetic_batch(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` radiograph-like grey images (two dark lungs, a bright blob at a random place, noise),
    ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        spread = 0.02 + 0.04 * float(torch.rand(1, generator=g))
        cy, cx, shade = torch.rand(3, generator=g).tolist()
        lungs = sum(torch.exp(-((xx - lx) ** 2 + (yy - 0.5) ** 2) / spread) for lx in (0.3, 0.7))
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.01)
        noise = 0.03 * torch.randn(size, size, generator=g)
        images.append((0.6 + 0.3 * shade - 0.5 * lungs + 0.4 * blob + noise).clamp(0, 1))
    x = torch.stack(images)[:, None].expand(-1, 3, -1, -1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def seeded_model(builder: str, target_layer: str, seed: int = 0, size: int = TINY_INPUT) -> nn.Module:
    """See ``model_factory``."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig("test", builder, Path("unused.pt"), target_layer, input_size=size))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(head.weight, std=1.0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass sets the batch's statistics
    model.train()
    with torch.no_grad():
        model(synthetic_batch(16, size, seed + 1000))
        model.eval()
        z = model(synthetic_batch(16, size, seed + 2000)).reshape(-1) - head.bias
        k = 2.0 / float(z.std().clamp_min(1e-6))  # logits of spread ~2: probabilities not all 0 or 1
        head.weight *= k
        head.bias.fill_(-k * float(z.median()))
    return model


@pytest.fixture(scope="session")
def model_factory() -> ModelFactory:
    """Seeded random models (cached; every call returns a fresh copy the test may change)."""
    cache: dict[tuple[str, str, int, int], nn.Module] = {}

    def make(builder: str, target_layer: str, seed: int = 0, size: int = TINY_INPUT) -> nn.Module:
        key = (builder, target_layer, seed, size)
        if key not in cache:
            cache[key] = seeded_model(builder, target_layer, seed, size)
        return copy.deepcopy(cache[key])

    return make


@pytest.fixture(scope="session")
def batch_factory() -> Callable[[int, int, int], torch.Tensor]:
    return synthetic_batch


@pytest.fixture(scope="session")
def tiny_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, model_factory: ModelFactory
) -> dict[str, Path]:
    """Checkpoints (fp16, ``{"model_state_dict", "meta"}``) of the three default models."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    out = {}
    for i, (name, (builder, layer)) in enumerate(helpers.TEST_MODELS.items()):
        path = root / f"{builder}.pt"
        meta = {"architecture": builder, "seed": i, "input_size": TINY_INPUT, "test": True}
        save_checkpoint(model_factory(builder, layer, seed=i), path, meta)
        out[name] = path
    return out


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("tiny-config")
    return helpers.write_test_config(
        root / "node.toml",
        checkpoints=tiny_checkpoints,
        port=11112,
        storage_dir=root / "spool",
        database_url=f"sqlite:///{root / 'node.db'}",
        input_size=TINY_INPUT,
        render={"max_side": 256},
    )


@pytest.fixture(scope="session")
def core_config(tiny_config_path: Path) -> CoreConfig:
    return load_core_config(tiny_config_path)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the session's own (started by the first test that needs it)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database on ``postgres_server``, as a SQLAlchemy URL; dropped (its connections ended
    first) after the test."""
    with postgres_server.fresh_database() as url:
        yield url
