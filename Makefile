# Fresh-machine entry points (see README): `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DSS_DATA_DIR ?= $(abspath ../shared/data/dss)
export DSS_DATA_DIR
# CPU jobs: with libtpu installed (test extra, for dss-plan) jax would otherwise probe for a TPU first.
export JAX_PLATFORMS ?= cpu

.PHONY: setup quickstart test test-fast test-durations lint typecheck

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 (test extra) is the CPU build this machine keeps on disk; a bare `torch` pulls CUDA.
$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# DSS on e-SNLI with a tiny T5 from scratch, then standard finetuning with the same inputs per step, steps and
# seed; each run prints its table (train subset / validation / test, trivial baselines), then both side by side.
QS ?= outputs/quickstart
quickstart: setup
	$(BIN)/dss-train --gin_file=runs/quickstart.gin --model_dir=$(QS)/dss
	$(BIN)/dss-train --gin_file=runs/quickstart_finetune.gin --model_dir=$(QS)/finetune
	$(BIN)/dss-report --runs $(QS)/dss $(QS)/finetune

# The whole suite (README, .ci/run). Tests that train or run CLIs in subprocesses are marked `slow`. Each worker
# runs whole files (module fixtures are built once), longest first by tests/durations.json (tests/conftest.py).
# Three workers on two cores: tests that wait on a subprocess, a server or a lock leave a core idle that the third
# fills (the whole suite, cold on a fresh clone on 2 cores: 569-586 s over three runs).
PYTEST := $(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder
test: setup lint
	$(PYTEST) tests

# While working: lint, the format check and every test not marked slow (about 2 minutes cold on 2 cores).
test-fast: setup lint
	$(PYTEST) -m "not slow" tests

# After adding or much changing tests: the whole suite, then each file's seconds written to tests/durations.json.
test-durations: setup
	$(PYTEST) --store-durations tests

lint: setup
	$(BIN)/ruff check dss_jax tasks tests bench launch
	$(BIN)/ruff format --check dss_jax tasks tests bench launch
	$(MAKE) typecheck

# mypy finds modules by folder, and setup.py installs tasks/ as dss_jax.tasks: it reads a tree of links that puts
# tasks/ at dss_jax/tasks (errors name dss_jax/tasks/<file> for tasks/<file>). Settings: setup.cfg's [mypy].
TYPECHECK := build/typecheck
typecheck: setup
	rm -rf $(TYPECHECK)/dss_jax && mkdir -p $(TYPECHECK)/dss_jax
	ln -s $(abspath dss_jax)/* $(TYPECHECK)/dss_jax/ && ln -s $(abspath tasks) $(TYPECHECK)/dss_jax/tasks
	cd $(TYPECHECK) && $(abspath $(BIN))/mypy --config-file $(abspath setup.cfg) --python-executable $(abspath $(BIN))/python -p dss_jax
