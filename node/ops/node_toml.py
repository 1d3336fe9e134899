"""A node configuration written from another with some values replaced, for the demo, the tests and the
benches: ``tomllib`` reads TOML, the standard library writes none.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["toml_value", "dump_node_toml", "derived_node_config"]


def toml_value(v: Any) -> str:
    """``v`` (bool, number, string or path, list, table) written as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def dump_node_toml(data: dict[str, Any]) -> str:
    """TOML text of a node configuration as ``tomllib`` reads it (tables, ``[[destinations]]``, models)."""
    out: list[str] = []
    for name, value in data.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"\n[[{_toml_key(name)}]]")
                out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, dict) and value and all(isinstance(x, dict) for x in value.values()):
            for sub, table in value.items():  # [models."NAME"]
                out.append(f"\n[{_toml_key(name)}.{_toml_key(sub)}]")
                out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
        elif isinstance(value, dict):
            out.append(f"\n[{_toml_key(name)}]")
            out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        else:
            out.insert(0, f"{_toml_key(name)} = {toml_value(value)}")
    return "\n".join(out).lstrip("\n") + "\n"


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def derived_node_config(base: Path, out: Path, overrides: dict[str, Any]) -> Path:
    """Write a copy of the node configuration ``base`` with values replaced by ``overrides``.

    ``overrides`` is merged table by table (``{"node": {"port": 11113}}``, ``{"models": {"ResNet18":
    {"checkpoint": "/tmp/r.pt"}}}``); a list (``destinations``) replaces the whole list. Relative paths keep
    their meaning (they are relative to the repository, not to the file). The result is loaded once, so a
    bad value fails here, naming the key.
    """
    from node.config import load_settings

    data = tomllib.loads(base.read_text(encoding="utf-8"))
    _merge(data, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated from {base}; edit that file instead.\n"
    out.write_text(header + dump_node_toml(data), encoding="utf-8")
    load_settings(out)
    return out
