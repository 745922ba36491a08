# gancore: `make train` runs the main job, `make test` passes the tests; each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Data: ../shared/data when it is beside the checkout (developers, CI), else ./data (torchvision layout).
GANCORE_DATA ?= $(if $(wildcard ../shared/data/mnist.npz),$(abspath ../shared/data),$(abspath data))
export GANCORE_DATA
CONFIG ?= configs/quickstart.yaml
# ARGS: extra arguments for every target that runs a command (train, test, test-fast, ui, reproduce, sweep,
# dashboard); PYTEST_ARGS, REPRO_ARGS and SWEEP_ARGS are deprecated aliases.
ARGS ?=
PORT ?= 5000

.PHONY: venv train test test-fast ui clean-runs

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)  ## the main job: configs/quickstart.yaml (MNIST DCGAN, a few minutes on a CPU)
	$(PY) jobs/train.py --config $(CONFIG) $(ARGS)

TEST_WORKERS ?= 2
test: $(STAMP)  ## the whole suite (CPU) on TEST_WORKERS processes (0: one process); .ci/run calls this
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile -m "not slow and not slurm" $(PYTEST_ARGS) $(ARGS)

ui: $(STAMP)  ## MLflow UI on 127.0.0.1 over the default store (mlruns/)
	mkdir -p mlruns/artifacts
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --workers 1 --backend-store-uri sqlite:///$(abspath mlruns/mlflow.db) \
		--artifacts-destination $(abspath mlruns/artifacts) --host 127.0.0.1 --port $(PORT) $(ARGS)

clean-runs:  ## delete local runs and the MLflow store (asks first)
	@read -p "delete runs/ and mlruns/ ? [y/N] " a && [ "$$a" = y ] && rm -rf runs mlruns/mlflow.db mlruns/artifacts || true

# `make reproduce SUITE=mnist|cifar10|families|bests|all`: every experiment of the suite trained (or reused) and evaluated
# under one protocol -> results/<suite>.md/.csv/_fid.png; run again to continue. ARGS="--epochs 3" is the
# reduced budget, "--dry-run" the plan and its estimated time, "--protocol inception" the Inception FID.
SUITE ?= mnist
REPRO_ARGS ?=
.PHONY: reproduce

reproduce: $(STAMP)  ## reproduce a suite of reference experiments (SUITE=mnist ARGS="--epochs 3")
	$(PY) jobs/reproduce.py $(SUITE) $(REPRO_ARGS) $(ARGS)

# `make sweep`: the Optuna study of sweeps/mnist_dcgan.yaml on local worker processes (sized for a GPU; the sweep
# file's `workers: auto` = the measured best trials per GPU, bench/trials_per_device.py; WORKERS=n overrides);
# `make sweep SMOKE=1`: the same search on a tiny budget, minutes on a 2-core CPU. Run again: the study continues.
SWEEP ?= sweeps/mnist_dcgan.yaml
WORKERS ?=
SMOKE ?=
SWEEP_ARGS ?=
.PHONY: sweep

sweep: $(STAMP)  ## Optuna sweep (SWEEP=file WORKERS=n SMOKE=1 ARGS="--storage URL --n-trials N")
	$(PY) jobs/sweep.py $(if $(SMOKE),sweeps/mnist_dcgan_smoke.yaml,$(SWEEP)) $(if $(WORKERS),--workers $(WORKERS)) $(SWEEP_ARGS) $(ARGS)

# `make dashboard`: optuna-dashboard on the sweep's study storage (the sweep file's `storage:`, else its sqlite file
# under the sweep dir; STORAGE=URL overrides), on 127.0.0.1:8080 (PORT=n). The study must exist: run the sweep first.
STORAGE ?=
.PHONY: dashboard

dashboard: $(STAMP)  ## optuna-dashboard on 127.0.0.1 (SWEEP=file SMOKE=1 STORAGE=URL PORT=n)
	$(PY) jobs/sweep.py $(if $(SMOKE),sweeps/mnist_dcgan_smoke.yaml,$(SWEEP)) --dashboard \
		--port $(if $(filter file,$(origin PORT)),8080,$(PORT)) $(if $(STORAGE),--storage '$(STORAGE)') $(ARGS)
