# vodpush: `make run` starts the service, `make test` checks the layers (import-linter
# contracts in pyproject.toml), builds the client's own wheel (`make client-wheel`) and runs
# the whole suite, `make fuzz`
# fuzzes the API (FUZZ_SECONDS=120 by default; not part of `make test`), `make soak` runs
# load and injected faults against PostgreSQL, moto and real processes, then checks the
# targets of issue 9 (SOAK_SECONDS=600 by default, SOAK_ARGS for more; not part of `make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# What serving needs (the package alone), and what the demo adds (moto, a local S3 server):
# `make run` does not wait for the test and benchmark tools.
SERVE_STAMP := $(VENV)/.installed-serve
DEMO_STAMP := $(VENV)/.installed-demo

# The client distribution (client/pyproject.toml): its wheel, and the wheels of what it
# needs (httpx and its own), which tests/test_client_dist.py installs with no index into a
# fresh virtualenv.
CLIENT_DIST := dist/client

FUZZ_SECONDS ?= 120
SOAK_SECONDS ?= 600
SOAK_ARGS ?=

.PHONY: run demo test test-fast client-wheel lint format bench bench-status bench-upload bench-accounts bench-slowloris fuzz soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@ $(SERVE_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@ $(SERVE_STAMP) $(DEMO_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/vodpush serve

# A local S3 server (moto), a demo account pointed at it, `vodpush serve`, one upload
# queued and read back from S3; then both keep running until Ctrl-C.
demo: $(DEMO_STAMP)
	$(BIN)/python demo/run.py

# pytest runs the suite on TEST_WORKERS processes (pytest-xdist; each has its own moto
# server and PostgreSQL template): most of the suite's time is spent waiting on worker
# processes, leases, timeouts and the network, not on the CPU. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3

test: $(STAMP) client-wheel
	$(BIN)/ruff check src client/src tests bench demo
	$(BIN)/ruff format --check src client/src tests bench demo
	$(BIN)/lint-imports
	VODPUSH_CLIENT_DIST=$(CURDIR)/$(CLIENT_DIST) $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

# pip fetches httpx and its dependencies from the package index (or its cache).
client-wheel: $(STAMP)
	rm -rf $(CLIENT_DIST) client/build
	$(BIN)/python -m pip wheel --quiet -w $(CLIENT_DIST) ./client

# The fast tier while changing code: unit and store-contract tests (no database server, no
# S3 process, no sockets: the suite itself refuses a socket there), in about 15 s.
test-fast: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check src client/src tests bench demo
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix src client/src tests bench demo
	$(BIN)/ruff format src client/src tests bench demo

bench: bench-status bench-upload bench-accounts

bench-status: $(STAMP)
	command -v wrk >/dev/null || apt-get install -y -qq wrk
	$(BIN)/python bench/status_bench.py

bench-upload: $(STAMP)
	$(BIN)/python bench/upload_bench.py

# Drain rate of two workers with 1 account and with 100 (half on their own S3 keys, half on
# the operator's) under mixed API load, on a fresh PostgreSQL database (VODPUSH_TEST_PG_URL,
# default postgres@127.0.0.1:5432) and a moto process; target: 100 >= 0.9 x 1.
bench-accounts: $(STAMP)
	$(BIN)/python bench/many_accounts.py --repeat 2

fuzz: $(STAMP)
	$(BIN)/python bench/fuzz_api.py --seconds $(FUZZ_SECONDS)

# Exits 1 when a target is missed (duplicates, orphaned multipart uploads, callbacks
# delivered twice, ...): the seed it prints replays the same choices (--seed N in SOAK_ARGS).
soak: $(STAMP)
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)

# 300 slow-header and 300 slow-body connections against `vodpush serve` with its default
# bounds: RSS growth, health-check latency, when each connection was closed.
bench-slowloris: $(STAMP)
	$(BIN)/python bench/slowloris.py --mode headers,body --connections 300 --duration 40

clean:
	rm -rf $(VENV) .demo build dist *.egg-info src/*.egg-info client/build client/src/*.egg-info .pytest_cache .ruff_cache .import_linter_cache
