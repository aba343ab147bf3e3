# Two set-up commands: `make run` and `make test` each create .venv on first use and reuse it after.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits.yaml

.PHONY: run test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/hardbatch run $(CONFIG) $(ARGS)

# Two pytest workers: one runs the end-to-end jobs (tests/e2e, one after the other, on one Ray head),
# the other everything else meanwhile (tests/conftest.py), in the CPU time the jobs leave idle (about
# 14 % of it); about 650 s on 2 cores, against 720 s in one process (README "Tests").
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)

# The edit loop: everything but the end-to-end jobs (tests/e2e); `make test` still runs them all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) hardbatch_results mlflow.db mlruns
