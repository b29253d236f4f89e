# residual-lightning: the commands a new user and CI need. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install lint format test test-fast demo bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the package with its dev extra (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install  ## the whole test suite, slow tests included (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## the suite without the slow tests
	$(PY) -m pytest -q -m "not slow"

demo: install  ## the offline quickstart: extract, fit, test (random weights, bundled digits data)
	$(VENV)/bin/residual-lightning fit --config configs/quickstart.yaml

bench: install  ## speed and memory benchmarks, each target beside its measurement (ratios from one run; ~40 min on 2 cores)
	$(PY) benchmarks/decompose.py
	$(PY) benchmarks/cache.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/pca.py
	$(PY) benchmarks/twonn.py
	$(PY) benchmarks/gpu.py

clean:  ## remove caches and logs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache lightning_logs runs
