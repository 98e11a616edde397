"""YAML + ``key=value`` overrides -> typed dataclasses, with errors that name the file and key."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any process group starts."""


def load_config(cls: type[T], path: Optional[str] = None, overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``a.b=value`` overrides (YAML-typed values)."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.iterations=10)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value != "" else None, item)
    return from_dict(cls, raw, source)


def from_dict(cls: type[T], raw: dict, source: str = "<dict>", prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"{source}: unknown key '{where}' (known under '{prefix or '<top>'}': "
            f"{', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, source, f"{prefix}{name}")
    return cls(**values)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _set_dotted(raw: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _coerce(hint, value, source: str, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, source, key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return from_dict(hint, value, source, prefix=f"{key}.")
    if value is None:
        raise ConfigError(f"{source}: '{key}' must not be empty")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '3e-4' as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value
