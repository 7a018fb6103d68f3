# Every target creates the virtualenv and installs the package by itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

.PHONY: demo test test-slow test-faults test-soak test-cluster test-ui lint ui bench bench-quality bench-timing bench-gpu bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	$(BIN)/python -c "import tskd_tune, torch, monai, ray, mlflow, optuna"
	touch $@

demo: $(STAMP)  ## the main job on the embedded default: a search on real brain MRI (mni152) with the LiteMedSAM teacher, recorded in runs/mlflow.db
	$(BIN)/tskd-tune launch search_spaces/demo.yaml --name demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest -q --durations=20

test-slow: $(STAMP)  ## only the slow tests
	$(BIN)/python -m pytest -q -m slow

test-faults: $(STAMP)  ## fault-injection tests: killed workers and drivers, NaN, MLflow outages, hangs (minutes)
	$(BIN)/python -m pytest -q -m faults

test-soak: $(STAMP)  ## a 100-trial search at concurrency 2: worker memory, descriptors, threads, overhead, MLflow counts
	$(BIN)/python -m pytest -q -s -m soak

test-cluster: $(STAMP)  ## two-node loopback Ray cluster + MLflow server on PostgreSQL (needs Debian's postgresql)
	$(BIN)/python -m pytest -q -m cluster

test-ui: $(STAMP)  ## a small search looked at in MLflow's UI with headless Chromium (needs Debian's chromium)
	$(BIN)/python -m pytest -q -m ui

ui: $(STAMP)  ## the MLflow UI on the local store (127.0.0.1:5000)
	$(BIN)/tskd-tune ui

bench: $(STAMP)  ## search-speed benchmark (minutes; prints ratios, writes benchmarks/results/)
	$(BIN)/python benchmarks/search_speed.py --set synthetic.generator=none

bench-quality: $(STAMP)  ## issue 20's grid on mni152: both students, teacher/scratch/TA-KD/MAE/TS-KD(+synth), N in {10,40}, 3 seeds (a GPU's worth; resumable)
	$(BIN)/python benchmarks/kd_methods.py

bench-timing: $(STAMP)  ## every timing benchmark (hours on 2 cores; run on a quiet machine)
	$(BIN)/python benchmarks/search_speed.py --set synthetic.generator=none
	$(BIN)/python benchmarks/search_efficiency.py
	$(BIN)/python benchmarks/staged_search.py
	$(BIN)/python benchmarks/scaling.py --two-node
	$(BIN)/python benchmarks/students.py --dice
	$(BIN)/python benchmarks/cpu_bf16.py
	$(BIN)/python benchmarks/cpu_malloc.py

bench-gpu: $(STAMP)  ## GPU throughput (1, 2, 4 trials per GPU, mixed precision off/on); says so and exits without a GPU
	$(BIN)/python benchmarks/gpu.py

bench-quick: $(STAMP)  ## smoke run of every benchmark (--quick; results go to *.quick.json, not committed)
	$(BIN)/python benchmarks/kd_methods.py --quick
	$(BIN)/python benchmarks/search_speed.py --quick
	$(BIN)/python benchmarks/search_efficiency.py --quick --trials 2
	$(BIN)/python benchmarks/staged_search.py --quick
	$(BIN)/python benchmarks/scaling.py --quick --two-node
	$(BIN)/python benchmarks/students.py --quick
	$(BIN)/python benchmarks/gpu.py --quick
	$(BIN)/python benchmarks/cpu_bf16.py --quick
	$(BIN)/python benchmarks/cpu_malloc.py --quick
	$(BIN)/python benchmarks/synth_ratio.py --quick

lint: $(STAMP)
	$(BIN)/ruff check tskd_tune tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
