#!/usr/bin/env bash
# Installs megatron-align into a Python that already has torch (an NGC PyTorch image, or a venv
# made with --system-site-packages on top of one) without replacing that torch or anything
# built against it. docker/Dockerfile and docker/apptainer.def run this script; so does the
# test that checks it (tests/test_containers.py).
#
#   docker/install.sh SRC_DIR [PIP_ARGS...]      e.g. docker/install.sh . --dry-run
#
# Environment:
#   PYTHON                 the interpreter to install into (default: python3)
#   EXTRAS                 megatron-align extras, comma-separated (default: hf,eval; empty: none)
#   MEGATRON_CORE_VERSION  pin megatron-core to this release (default: setup.py's range)
#   CONSTRAINTS_OUT        keep the constraints file here (default: a temporary file)
#   INSTALL_REPORT         write pip's JSON installation report here (default: none)
#
# How: every installed package of the torch stack (torch*, triton, apex, TransformerEngine,
# flash-attn, nvidia-*, cuda-*, ...) is pinned at its installed version in a pip constraints
# file, numpy at its installed major version, and pip installs SRC_DIR[EXTRAS] with it. A
# dependency that needs another torch then fails the resolve, naming torch, instead of pulling
# a PyPI build over the image's. torch's version is compared before and after.
#
# Exit: 0 installed; 1 pip failed or torch changed; 2 bad usage or no torch in PYTHON.
set -euo pipefail

if [ $# -lt 1 ] || [ ! -f "$1/setup.py" ]; then
    echo "error: usage: docker/install.sh SRC_DIR [PIP_ARGS...] (SRC_DIR holds megatron-align's setup.py; got '${1:-}')" >&2
    exit 2
fi
src=$1
shift
python=${PYTHON:-python3}
extras=${EXTRAS-hf,eval}

torch_version() {
    "$python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null
}

if ! before=$(torch_version); then
    echo "error: no torch installed in $python: this script installs next to a preinstalled torch (NGC image, or a venv with --system-site-packages); for a plain venv use 'make install' (docs/launch.md#bare-metal-venv)" >&2
    exit 2
fi

constraints=${CONSTRAINTS_OUT:-}
if [ -z "$constraints" ]; then
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
fi
mkdir -p "$(dirname "$constraints")"

stack='torch[a-z0-9_.-]*|pytorch[-_.]triton|triton|apex|transformer[-_.]engine[a-z0-9_.-]*|flash[-_.]attn[a-z0-9_.-]*|nvidia[-_.][a-z0-9_.-]+|nvfuser[a-z0-9_.-]*|cuda[-_.][a-z0-9_.-]+|cupy[a-z0-9_.-]*|tensorrt[a-z0-9_.-]*'
installed=$("$python" -m pip list --format=freeze 2>/dev/null)
{
    echo "# The torch stack found in $python when megatron-align was installed; see docker/install.sh."
    grep -iE "^($stack)==" <<< "$installed" || true
    sed -nE 's/^(numpy)==([0-9]+)\..*/\1==\2.*/ip' <<< "$installed"
    if [ -n "${MEGATRON_CORE_VERSION:-}" ]; then
        echo "megatron-core==$MEGATRON_CORE_VERSION"
    fi
} > "$constraints"
if ! grep -qiE '^torch==' "$constraints"; then
    echo "error: pip in $python does not list torch $before; cannot pin it" >&2
    exit 2
fi
echo "install.sh: torch $before stays; constraints ($constraints):"
sed -n 's/^[^#]/  &/p' "$constraints"

target=$src
if [ -n "$extras" ]; then
    target="${src}[${extras}]"
fi
report_args=()
if [ -n "${INSTALL_REPORT:-}" ]; then
    report_args=(--report "$INSTALL_REPORT")
fi

"$python" -m pip install -c "$constraints" "${report_args[@]}" "$target" "$@" || exit 1

after=$(torch_version) || after="(none)"
if [ "$after" != "$before" ]; then
    echo "error: torch changed from $before to $after during the install" >&2
    exit 1
fi
case " $* " in
    *" --dry-run "*) ;;
    *) "$python" -c 'import megatron_align.cli, data_tools.cli' || exit 1 ;;
esac
echo "install.sh: megatron-align installed into $python; torch $after unchanged"
