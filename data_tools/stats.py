"""The JSON stats sidecar written next to every `.bin/.idx` pair (`PREFIX.stats.json`)."""
from __future__ import annotations

import json
import os
from typing import Optional

from data_tools.errors import DataToolsError

STATS_FORMAT = "megatron-align/indexed-stats/v1"
_REQUIRED = ("format", "prefix", "documents", "tokens", "dtype", "tokenizer", "inputs", "skipped", "text_field")


def stats_path(prefix: str) -> str:
    return prefix + ".stats.json"


def read_stats(prefix: str) -> dict:
    """Load and check `PREFIX.stats.json`; errors name the file."""
    path = stats_path(prefix)
    if not os.path.exists(path):
        raise DataToolsError(f"{path}: stats sidecar not found (was {prefix} made by `data-tools preprocess`?)")
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataToolsError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(stats, dict):
        raise DataToolsError(f"{path}: expected a JSON object")
    missing = [key for key in _REQUIRED if key not in stats]
    if missing:
        raise DataToolsError(f"{path}: missing key {missing[0]!r}")
    if stats["format"] != STATS_FORMAT:
        raise DataToolsError(f"{path}: format {stats['format']!r} is not {STATS_FORMAT!r}")
    return stats


def write_json_atomic(path: str, obj: dict, tmp_suffix: Optional[str] = None) -> None:
    tmp = f"{path}.tmp-{os.getpid()}" if tmp_suffix is None else path + tmp_suffix
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
