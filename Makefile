# Two commands from a fresh clone:  `make run`  (install + the default comparison)  and  `make test`.
VENV      ?= .venv
PYTHON    ?= python3
DATA_ROOT ?= $(if $(wildcard ../shared/data/medmnist/bloodmnist.npz),../shared/data/medmnist,data/medmnist)
SITES     ?= 10
RUN_CONFIG ?=

.PHONY: install run published test test-fast lint stop print-test-workers

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## The default job: FusedSpaceFed and FedAvg side by side on a small non-IID federation
## (BloodMNIST, 2 sites, alpha 0.5, 2 rounds of 1 local epoch; about 250 s on 2 cores: README "Times, measured"), a comparison and a plot.
run: install
	RUN_CONFIG="$(RUN_CONFIG)" scripts/demo.sh "$(DATA_ROOT)"

## The published protocol: FusedSpaceFed on BloodMNIST, 10 sites, Dirichlet alpha 0.05, 50 rounds,
## 3 local epochs, 2 warm-up epochs (hours on a CPU; see README "Devices and GPUs").
published: install
	scripts/simulate.sh --run-config "data-root='$(DATA_ROOT)' num-server-rounds=50 warmup-epochs=2 batch-size=256 $(RUN_CONFIG)" \
	  --federation-config "num-supernodes=$(SITES)"

## Everything (what CI runs): pytest-xdist workers, one per core but at least 3 (the pilot's
## integration tests, in three groups each one test at a time on one worker, mostly wait:
## tests/conftest.py); the rest spread (README "Times, measured").
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(max(3, n or 1))" 2>/dev/null || echo 3)
test: install
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadgroup

## make test's worker count (benchmarks/suite_cpu.py runs make test's command with it)
print-test-workers:
	@echo $(TEST_WORKERS)

## Unit and small integration tests, without the `slow` and `integration` ones (flwr, Ray, the
## pilot), one pytest worker per core (pytest-xdist), for the edit-test loop (times: README).
test-fast: install
	$(VENV)/bin/pytest -n auto -m "not slow and not integration"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

stop:
	scripts/stop-local-superlink.sh
