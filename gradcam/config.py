"""Typed configuration of the imaging and model core, parsed once from TOML.

The node adds its own sections (see ``node.config``) with the same :class:`TableReader`, so every bad
value, wherever it is, stops the program with the file, the key and what was expected.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam.errors import ConfigError

__all__ = [
    "REPO_ROOT",
    "DEFAULT_CONFIG",
    "Window",
    "ModelConfig",
    "PreprocessConfig",
    "RenderConfig",
    "CoreConfig",
    "TableReader",
    "read_toml",
    "parse_core",
    "load_core_config",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "node.toml"

_MISSING = object()


@dataclass(frozen=True)
class Window:
    """A fixed VOI window (centre and width, in modality units)."""

    center: float
    width: float


@dataclass(frozen=True)
class ModelConfig:
    """One ``[models.NAME]`` table."""

    name: str
    builder: str
    checkpoint: Path
    target_layer: str
    input_size: int = 224
    threshold: float = 0.5
    enabled: bool = True
    window: Window | None = None
    config_file: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class PreprocessConfig:
    """``[preprocess]``: limits applied before any decoding.

    ``min_side``: fewest rows and columns of an image the models analyse (:mod:`gradcam.eligibility`).
    """

    max_pixels: int = 60_000_000
    min_side: int = 64


@dataclass(frozen=True)
class RenderConfig:
    """``[render]``: how overlays look."""

    max_side: int = 1024
    opacity: float = 0.4
    colormap: str = "jet"


@dataclass(frozen=True)
class CoreConfig:
    """Everything the imaging and model core needs."""

    path: Path
    models: tuple[ModelConfig, ...]
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    @property
    def enabled_models(self) -> tuple[ModelConfig, ...]:
        return tuple(m for m in self.models if m.enabled)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models)
        raise ConfigError(str(self.path), f"models.{name}", f"no such model (configured: {known})")


class TableReader:
    """Reads typed values from one TOML table and reports bad ones with file and dotted key."""

    def __init__(self, file: Path | str, prefix: str, table: Any) -> None:
        self.file = str(file)
        self.prefix = prefix
        if not isinstance(table, Mapping):
            raise ConfigError(self.file, prefix, f"expected a table, got {type(table).__name__}")
        self.table = dict(table)
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, expected: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), expected)

    def _get(self, name: str, default: Any) -> Any:
        self._seen.add(name)
        if name in self.table:
            return self.table[name]
        if default is _MISSING:
            raise self.error(name, "required key is missing")
        return default

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        """The value as TOML gave it, of whatever type (the caller checks it)."""
        return self._get(name, default)

    def str(self, name: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self._get(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        if choices and value not in choices:
            raise self.error(name, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def int(self, name: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        return self._check_range(name, value, lo, hi)

    def float(
        self, name: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None
    ) -> Any:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, f"expected a number, got {value!r}")
        return self._check_range(name, float(value), lo, hi)

    def str_list(self, name: str, default: Any = _MISSING) -> list[str]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return list(value)

    def table_of(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is None:
            return None
        return TableReader(self.file, self.key(name), value)

    def path(self, name: str, default: Any = _MISSING) -> Path:
        value = Path(self.str(name, default))
        return value if value.is_absolute() else REPO_ROOT / value

    def _check_range(self, name: str, value: Any, lo: Any, hi: Any) -> Any:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (
                f"between {lo} and {hi}"
                if lo is not None and hi is not None
                else (f"at least {lo}" if lo is not None else f"at most {hi}")
            )
            raise self.error(name, f"expected a value {bounds}, got {value!r}")
        return value

    def finish(self) -> None:
        """Refuse keys nobody asked for: a typo must not silently become a default."""
        unknown = sorted(set(self.table) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt?)")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into a :class:`ConfigError` naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "configuration file not found") from None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"not valid TOML: {exc}") from None


def _parse_model(path: Path, name: str, table: Any) -> ModelConfig:
    r = TableReader(path, f"models.{name}", table)
    window = None
    w = r.table_of("window", None)
    if w is not None:
        window = Window(center=w.float("center"), width=w.float("width", lo=1e-6))
        w.finish()
    model = ModelConfig(
        name=name,
        builder=r.str("builder"),
        checkpoint=r.path("checkpoint"),
        target_layer=r.str("target_layer"),
        input_size=r.int("input_size", 224, lo=32, hi=2048),
        threshold=r.float("threshold", lo=0.0, hi=1.0),
        enabled=r.bool("enabled", True),
        window=window,
        config_file=str(path),
    )
    r.finish()
    return model


def parse_core(path: Path, data: Mapping[str, Any]) -> CoreConfig:
    """Build the core configuration from a parsed TOML document (other sections are ignored here)."""
    root = TableReader(path, "", data)
    models_table = root.table_of("models")
    models = tuple(_parse_model(path, name, t) for name, t in models_table.table.items())
    if not models:
        raise ConfigError(str(path), "models", "at least one [models.NAME] table is required")
    if not any(m.enabled for m in models):
        raise ConfigError(str(path), "models", "at least one model must be enabled")

    pre = root.table_of("preprocess", {})
    preprocess = PreprocessConfig(
        max_pixels=pre.int("max_pixels", 60_000_000, lo=1),
        min_side=pre.int("min_side", PreprocessConfig.min_side, lo=1, hi=65535),
    )
    pre.finish()

    ren = root.table_of("render", {})
    render = RenderConfig(
        max_side=ren.int("max_side", 1024, lo=64, hi=8192),
        opacity=ren.float("opacity", 0.4, lo=0.0, hi=1.0),
        colormap=ren.str("colormap", "jet", choices=tuple(COLORMAPS)),
    )
    ren.finish()
    return CoreConfig(path=path, models=models, preprocess=preprocess, render=render)


def load_core_config(path: Path | None = None) -> CoreConfig:
    """Read and validate only the core sections of a configuration file."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    return parse_core(path, read_toml(path))


# OpenCV colour maps by name; kept here so the config check needs no cv2 import.
COLORMAPS = {
    "jet": 2,
    "turbo": 20,
    "inferno": 14,
    "hot": 11,
    "viridis": 16,
}
