"""What determines the content of the node's outputs, as keys that output UIDs are derived from.

An output's pixels and numbers depend on the models (checkpoint, threshold, input size, window, target
layer), on how maps are drawn (``[render]``), on which outputs are made and how they are labelled
(``[outputs]``) and on the software itself. :class:`OutputContext` holds all of that for one running
configuration; its :attr:`~OutputContext.content_key` changes whenever any of it does, so a changed
configuration can never put new content under an old SOP Instance UID (a PACS that already holds the old
one would keep serving it), while the same configuration on a fresh node gives the same UIDs again.

The device UID is identity, not content: it is not part of any key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from gradcam.config import ModelConfig, RenderConfig
from node.config import OutputsConfig
from node.outputs.common import SOFTWARE_VERSION

__all__ = ["ModelIdentity", "OutputContext", "checkpoint_version", "revised_key"]


def _digest(value: object) -> str:
    # JSON keeps the fields apart unambiguously; sorted keys make it independent of declaration order
    text = json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def revised_key(content_key: str, revision: int) -> str:
    """The content key of the outputs of a source's ``revision`` (1: as first received; a higher one when
    the same SOP Instance UID came again with other content, :mod:`node.receive.revision`): the key itself
    for the first, another for each later one, so that new content never takes an old output's UID."""
    return content_key if revision <= 1 else _digest([content_key, "source revision", revision])


def checkpoint_version(checkpoint_sha256: str) -> str:
    """The version of a model as the outputs name it: its checkpoint's short SHA-256."""
    return f"sha256:{checkpoint_sha256[:12]}" if checkpoint_sha256 else "unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """Everything about one model that decides its probability and its map."""

    name: str
    builder: str
    checkpoint_sha256: str
    threshold: float
    input_size: int
    target_layer: str
    window: tuple[float, float] | None = None

    @classmethod
    def of(cls, cfg: ModelConfig, checkpoint_sha256: str) -> ModelIdentity:
        """The identity of a configured model whose checkpoint file has ``checkpoint_sha256``."""
        window = None if cfg.window is None else (float(cfg.window.center), float(cfg.window.width))
        return cls(
            name=cfg.name,
            builder=cfg.builder,
            checkpoint_sha256=checkpoint_sha256,
            threshold=float(cfg.threshold),
            input_size=int(cfg.input_size),
            target_layer=cfg.target_layer,
            window=window,
        )

    @property
    def version(self) -> str:
        """TID 4019 Algorithm Version: the checkpoint, not the node's software version."""
        return checkpoint_version(self.checkpoint_sha256)


@dataclass(frozen=True)
class OutputContext:
    """The configuration outputs are made with: models, drawing, output settings, software, device."""

    models: tuple[ModelIdentity, ...]
    render: RenderConfig
    outputs: OutputsConfig
    device_uid: str
    software_version: str = SOFTWARE_VERSION
    source_revision: int = 1  # the revision of the source image these outputs are made from

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: at least one model identity is needed")
        if not self.device_uid:
            raise ValueError("device_uid: empty")

    @classmethod
    def of(
        cls,
        models: Iterable[tuple[ModelConfig, str]],
        render: RenderConfig,
        outputs: OutputsConfig,
        device_uid: str,
    ) -> OutputContext:
        """From ``(model config, checkpoint sha256)`` pairs and the ``[render]``/``[outputs]`` sections."""
        identities = tuple(sorted((ModelIdentity.of(c, sha) for c, sha in models), key=lambda m: m.name))
        return cls(models=identities, render=render, outputs=outputs, device_uid=device_uid)

    def model(self, name: str) -> ModelIdentity:
        """The identity of the model called ``name`` (KeyError if it is not one of this context's)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @cached_property
    def analysis_key(self) -> str:
        """What decides the findings (models and software): 64 hex digits, stored with each job."""
        return _digest([self.software_version, [dataclasses.asdict(m) for m in self.models]])

    @cached_property
    def content_key(self) -> str:
        """What decides every output's content: the findings, how maps are drawn, which outputs are made
        and how they are labelled."""
        key = _digest([self.analysis_key, dataclasses.asdict(self.render), dataclasses.asdict(self.outputs)])
        return revised_key(key, self.source_revision)

    def of_revision(self, revision: int) -> OutputContext:
        """This context for the outputs of a source's ``revision`` (itself for the first)."""
        return (
            self if revision == self.source_revision else dataclasses.replace(self, source_revision=revision)
        )
