"""YAML that remembers where every key was written, so that errors read ``file:line: key: message``.

Shared by the run config and the mixture loader: one loader, one error form.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """Bad configuration, reported before any process starts; the message names file, line, key."""


class LineMap(dict):
    """A YAML mapping with the line of the mapping itself and of each of its keys."""

    line: int = 0
    lines: dict


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    mapping = LineMap()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str, what: str = "config", error: type[Exception] = ConfigError) -> Any:
    """Parse a YAML file into plain values whose mappings are :class:`LineMap`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror})") from None
    return parse_yaml(text, path, error)


def parse_yaml(text: str, path: str, error: type[Exception] = ConfigError) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise error(f"{path}{line}: invalid YAML ({problem})") from None


def location(path: str, mapping: Any, key: Optional[str] = None) -> str:
    """``path:line`` of ``key`` in ``mapping`` (or of the mapping), or ``path`` without lines."""
    line = None
    if isinstance(mapping, LineMap):
        line = mapping.lines.get(key, mapping.line) if key is not None else mapping.line
    return f"{path}:{line}" if line else path


def describe_value(value: Any) -> str:
    """A value as an error message shows it."""
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, fail) -> str:
    """``${VAR}`` and ``${VAR:-default}`` from the environment; an unset ``${VAR}`` without a
    default raises ``fail(message)``."""

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise fail(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")

    return _VAR.sub(replace, text)
