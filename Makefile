# Two commands from a fresh clone:  `make run`  (install + default simulation)  and  `make test`.
VENV      ?= .venv
PYTHON    ?= python3
DATA_ROOT ?= $(if $(wildcard ../shared/data/medmnist/bloodmnist.npz),../shared/data/medmnist,data/medmnist)
SITES     ?= 10
RUN_CONFIG ?=

.PHONY: install run test lint stop

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## The default simulation: FusedSpaceFed on BloodMNIST, 10 sites, Dirichlet alpha 0.05.
run: install
	scripts/simulate.sh --run-config "data-root='$(DATA_ROOT)' $(RUN_CONFIG)" --federation-config "num-supernodes=$(SITES)"

test: install
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

stop:
	scripts/stop-local-superlink.sh
