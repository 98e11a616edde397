# `make demo` and `make test` install on their own when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo toy-study test test-fast bench clean slurm-local slurm-local-stop

install: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# CPU machines: the pinned CPU torch first, so nothing below pulls a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_CPU); fi
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m megatron_align.demo

# The CPU toy study (3 arms x 3 training seeds, 55 jobs, ~29 min on 2 cores); re-running resumes.
toy-study: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/megatron-align study run configs/studies/toy.yaml --executor local --jobs 2 --out toy_study
	$(BIN)/megatron-align study report toy_study

# --durations: the slowest tests in every log, to keep the suite within its time budget
test: $(STAMP)
	$(BIN)/python -m pytest -q tests --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not multiprocess" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# A real two-node SLURM on this machine for the `slurm` tests (root, Debian: installs slurm-wlm
# and munge when absent). Writes .slurm-local/env; `slurm-local-stop` removes all of it.
slurm-local:
	bash launch/local_cluster/slurm_local.sh start

slurm-local-stop:
	bash launch/local_cluster/slurm_local.sh stop

clean:
	rm -rf $(VENV) build *.egg-info demo_output
