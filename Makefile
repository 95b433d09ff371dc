# corral — two commands on a fresh machine:
#   make run    set up .venv, start an embedded NATS, run the demo fleet to completion
#   make test   set up .venv, lint, and run the whole test suite against a real nats-server
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench soak clean help

help:
	@echo "make run    run the demo fleet (no API key needed)"
	@echo "make test   lint + the whole test suite"
	@echo "make lint   ruff + mypy --strict + compose.yaml schema check + deploy/ checks"
	@echo "make bench  benchmarks (prints tables, writes bench/results.json), then 1 server vs 3 nodes,"
	@echo "           then the agent fleet in one process vs as \`corral up\` processes"
	@echo "make soak   the fuzz suite at 100,000 messages, the cluster faults at 60 tasks each"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "corral needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_compose.py -k "not as_processes"  # deploy/: rules, dashboards

# Three workers (pytest-xdist) on two cores: most tests wait on processes and servers, not
# the CPU (measured: 6-9 min of pytest against 8-9 with two; four were no faster).
test: $(STAMP) lint
	$(BIN)/python -m pytest -n $${CORRAL_TEST_WORKERS:-3}

# Every figure on one server, then what R3 costs: one server against a 3-node cluster,
# then the agent figures with the fleet in this process against it run as processes.
bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.cluster
	$(BIN)/python -m bench.processes

# The fuzz suite (tests/test_fuzz.py) at soak size; `make test` runs it at 2,000.
# And the canary routing check at the issue's 1,000 tasks; `make test` runs 300.
# The cluster faults (tests/test_cluster.py) each on a cluster of its own, CORRAL_CLUSTER_N
# tasks per fault (default 60; `make test` runs the four in turn on one cluster, 6 each).
soak: $(STAMP)
	CORRAL_FUZZ_N=$${CORRAL_FUZZ_N:-100000} $(BIN)/python -m pytest -q -s tests/test_fuzz.py
	CORRAL_ROLLOUT_N=$${CORRAL_ROLLOUT_N:-1000} $(BIN)/python -m pytest -q -s tests/test_rollouts.py -k canary
	CORRAL_CLUSTER_SOAK=1 $(BIN)/python -m pytest -q -s -o timeout=900 tests/test_cluster.py

clean:
	rm -rf $(VENV) .corral .mypy_cache .ruff_cache .pytest_cache *.egg-info
