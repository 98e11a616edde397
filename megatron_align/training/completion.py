"""The completion marker: ``RUN_DIR/finished.json``, written by rank 0 once ``train.iterations`` is
reached (after the last checkpoint is complete).

A run that stops early (SIGTERM/SIGUSR1, ``train.exit_duration_minutes``) also exits 0, so
launchers read this marker to tell a finished run from one to requeue:

    python -m megatron_align.training.completion RUN_CONFIG [key=value ...]

exits 0 when the run is finished, 1 when it is not (yet), 2 on a bad config or marker.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_align.io import PathLike, write_json_atomic

FINISHED = "finished.json"


class CompletionError(ValueError):
    """An unreadable marker; the message names the file."""


def write_finished(run_dir: PathLike, iteration: int, tokens: int) -> Path:
    record = {"iteration": iteration, "tokens": tokens,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return write_json_atomic(Path(run_dir) / FINISHED, record)


def read_finished(run_dir: PathLike) -> Optional[dict]:
    """The marker's record, or None when the run has not finished."""
    path = Path(run_dir) / FINISHED
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CompletionError(f"{path}: unreadable completion marker ({err})") from err
    if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
        raise CompletionError(f"{path}: completion marker without an integer 'iteration'")
    return record


def is_finished(run_dir: PathLike, iterations: int) -> bool:
    """True once the run in ``run_dir`` has trained ``iterations`` steps (a later, longer config
    of the same run dir is not finished by an earlier, shorter one's marker)."""
    record = read_finished(run_dir)
    return record is not None and record["iteration"] >= iterations


def main(argv=None) -> int:
    from megatron_align.config import ConfigError, load_run_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m megatron_align.training.completion RUN_CONFIG [key=value ...]",
              file=sys.stderr)
        return 2
    config_path, overrides = args[0], args[1:]
    if "=" in config_path and not os.path.exists(config_path):
        config_path, overrides = None, args  # overrides only, as `megatron-align train` takes them
    try:
        config = load_run_config(config_path, overrides)
        record = read_finished(config.run_dir)
    except (ConfigError, CompletionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    iterations = config.train.iterations
    if record is not None and record["iteration"] >= iterations:
        print(f"finished: {config.run_dir} (step {record['iteration']} of {iterations})")
        return 0
    print(f"not finished: {config.run_dir} ({iterations} steps)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
