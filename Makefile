# Every target creates the virtualenv and installs the package by itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test test-slow test-faults test-cluster lint ui bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,medsam]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	$(BIN)/python -c "import tskd_tune, torch, monai, ray, mlflow, optuna"
	touch $@

demo: $(STAMP)  ## the main job on the embedded default: a search on the phantom, recorded in runs/mlflow.db
	$(BIN)/tskd-tune launch search_spaces/demo.yaml --name demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## only the slow tests
	$(BIN)/python -m pytest -q -m slow

test-faults: $(STAMP)  ## fault-injection tests: killed workers and drivers, NaN, MLflow outages, hangs (minutes)
	$(BIN)/python -m pytest -q -m faults

test-cluster: $(STAMP)  ## two-node loopback Ray cluster + MLflow server on PostgreSQL (needs Debian's postgresql)
	$(BIN)/python -m pytest -q -m cluster

ui: $(STAMP)  ## the MLflow UI on the local store (127.0.0.1:5000)
	$(BIN)/tskd-tune ui

bench: $(STAMP)  ## search-speed benchmark (minutes; prints ratios, writes benchmarks/results/)
	$(BIN)/python benchmarks/search_speed.py

lint: $(STAMP)
	$(BIN)/ruff check tskd_tune tests

clean:
	rm -rf $(VENV) runs .pytest_cache
