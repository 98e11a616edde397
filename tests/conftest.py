import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SLURM_LOCAL_ENV = Path(__file__).resolve().parents[1] / ".slurm-local" / "env"


def pytest_collection_modifyitems(config, items):
    """CPU-only tests run on every machine without CUDA (CI); with CUDA they are skipped."""
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is None:
            continue
        reason = marker.kwargs.get("reason")
        if not reason:
            raise pytest.UsageError(f"{item.nodeid}: cpu_only needs reason=...")
        if torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=f"CPU only: {reason}"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def slurm_cluster() -> dict:
    """The local SLURM cluster's environment (SLURM_CONF, the node interface name), from the file
    `make slurm-local` writes. Without it the test fails in CI (CI=true) and is skipped elsewhere."""
    if not SLURM_LOCAL_ENV.is_file():
        message = f"no local SLURM cluster: {SLURM_LOCAL_ENV} is missing (run `make slurm-local`)"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    env = {}
    for line in SLURM_LOCAL_ENV.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                          env={**os.environ, **env})
    if ping.returncode != 0:
        message = (f"the local SLURM cluster of {SLURM_LOCAL_ENV} does not answer "
                   f"(`make slurm-local` starts it again): {ping.stdout}{ping.stderr}")
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return env


@pytest.fixture(autouse=True)
def _slurm_marked_tests_need_the_cluster(request):
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")
