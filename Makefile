# Airlock's entry points. Each target installs what it needs first (scripts/setup.sh is
# quick when nothing is missing), so `make run` and `make test` work on a fresh Debian 12.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

BIN := .venv/bin
# Tests wait on VMs, browsers and deadlines more than they compute: three workers on two cores
# (pytest-xdist; worksteal evens out the long tests) took the suite from 20 min 53 s to 9 min
# here. TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 3
PYTEST_ARGS ?= -q -ra --durations=15 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)
# The test suite needs PostgreSQL, and QEMU for the qemu runtime's tests.
TEST_SETUP_FLAGS ?= --with-postgres --with-qemu
BENCH_ARGS ?=
# Which benchmarks `make bench` runs (bench/run.py's names, e.g. BENCH=fleet); empty: all.
BENCH ?=

.PHONY: help setup run test lint bench clean

# Every linter runs even when an earlier one complains, so one run shows all the problems.
LINT = failed=""; \
	echo "== ruff check" >&2; $(BIN)/ruff check . || failed="$$failed ruff-check"; \
	echo "== ruff format --check" >&2; $(BIN)/ruff format --check . || failed="$$failed ruff-format"; \
	echo "== mypy" >&2; $(BIN)/mypy || failed="$$failed mypy"; \
	echo "== lint-imports" >&2; $(BIN)/lint-imports --no-cache --no-logo || failed="$$failed lint-imports"; \
	if [ -n "$$failed" ]; then echo "make lint: FAILED:$$failed" >&2; exit 1; fi; \
	echo "make lint: clean" >&2

help:
	@echo "make run     install what is missing, then serve the UI and API on http://127.0.0.1:4000 (demo mode)"
	@echo "make test    install what is missing, start a throwaway PostgreSQL, lint, run the tests"
	@echo "make lint    ruff check, ruff format --check, mypy, lint-imports"
	@echo "make bench   run the benchmarks (BENCH=fleet: only that one; see bench/run.py)"
	@echo "make setup   only install what is missing (system packages, .venv)"
	@echo "make clean   remove caches and the throwaway PostgreSQL cluster"
	@echo "PYTEST_ARGS='...' overrides the pytest options (default: $(PYTEST_ARGS))"

setup:
	@bash scripts/setup.sh

run: setup
	$(BIN)/airlock serve --demo

# Lint and tests both run, so one CI run reports both; the target fails if either did.
# pytest's exit code 5 (nothing collected) fails it like any other, and is named.
test:
	@bash scripts/setup.sh $(TEST_SETUP_FLAGS)
	@if [ -z "$${AIRLOCK_TEST_POSTGRES_URL:-}" ]; then \
	  AIRLOCK_TEST_POSTGRES_URL="$$(bash scripts/postgres.sh)"; \
	fi; \
	export AIRLOCK_TEST_POSTGRES_URL; \
	echo "make test: PostgreSQL for the tests: $$AIRLOCK_TEST_POSTGRES_URL" >&2; \
	lint=ok; ( $(LINT) ) || lint=FAILED; \
	echo "make test: the minimal and cli guest images for the qemu tests (cached; cold: 2-3 min each)" >&2; \
	$(BIN)/airlock image build --flavor minimal >&2 || echo "make test: image build failed (the qemu tests say why)" >&2; \
	$(BIN)/airlock image build --flavor cli >&2 || echo "make test: cli image build failed (the qemu tests say why)" >&2; \
	log="$$(mktemp)"; trap 'rm -f "$$log"' EXIT; \
	color=no; if [ -t 1 ]; then color=yes; fi; \
	rc=0; $(BIN)/pytest --color=$$color $(PYTEST_ARGS) 2>&1 | tee "$$log" || rc=$$?; \
	if [ $$rc -eq 5 ] || tail -n 1 "$$log" | grep -q "no tests ran"; then \
	  echo "make test: pytest collected no tests: that is a failure" >&2; rc=5; \
	fi; \
	tests=ok; if [ $$rc -ne 0 ]; then tests="FAILED (pytest exit code $$rc)"; fi; \
	echo "make test: lint $$lint, tests $$tests" >&2; \
	[ $$lint = ok ] && [ $$rc -eq 0 ]

lint: setup
	@$(LINT)

bench: setup
	@if [ -f bench/run.py ]; then \
	  exec $(BIN)/python bench/run.py $(BENCH) $(BENCH_ARGS); \
	elif [ -f bench/__main__.py ]; then \
	  exec $(BIN)/python -m bench $(BENCH_ARGS); \
	else \
	  echo "make bench: no benchmark yet (expected bench/run.py or bench/__main__.py)" >&2; exit 1; \
	fi

# Keeps .venv and data/ (your local controller's database and keys).
clean:
	@bash scripts/postgres.sh purge
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache test-artifacts build
	rm -rf src/*.egg-info
	find src tests bench -name __pycache__ -type d -prune -exec rm -rf {} +
