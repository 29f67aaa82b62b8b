# Wattplane developer entry points. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit cluster-binaries protos crds constraints chaos soak bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip==25.3"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The main job: simulate the bundled quickstart scenario (synthetic load, no cluster, no data).
demo: $(STAMP)
	$(BIN)/wattplane simulate examples/scenarios/quickstart.yaml --out out/quickstart

## The whole suite: lint, types, layering, then pytest incl. the real local test cluster.
test: $(STAMP) cluster-binaries lint typecheck
	WATTPLANE_TESTCLUSTER_BIN="$${WATTPLANE_TESTCLUSTER_BIN:-$$(bash hack/testcluster/build.sh | tail -n1)}" \
	  $(BIN)/python -m pytest -q -m "not chaos" $(PYTEST_ARGS)

## Build (once per machine, cached in ~/.cache/wattplane) the Go test-cluster binaries.
cluster-binaries:
	bash hack/testcluster/build.sh >/dev/null

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy policies/

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster and not ray and not chaos" $(PYTEST_ARGS)

protos: $(STAMP)
	$(BIN)/python -m protos.generate

crds: $(STAMP)
	$(BIN)/wattplane crds --out helm/wattplane/crds

constraints: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | sed '1i # transitive pins: regenerate with make constraints' > constraints.txt

## Faults on the real test cluster (controller SIGKILLed at named points and at random times,
## kube-apiserver/etcd restarts, a paused leader), network faults, overload, TLS rotation (root +
## iproute2 for network namespaces; ~12 min). Each test prints what it tried and what survived and
## appends a record to $(CHAOS_RESULTS); the summary prints one table from it (and fails on any fault
## not survived or data lost). Not part of `make test`; results are recorded in docs/reliability.md.
CHAOS_RESULTS ?= out/chaos-results.jsonl
chaos: $(STAMP) cluster-binaries
	mkdir -p $(dir $(CHAOS_RESULTS)) && rm -f $(CHAOS_RESULTS)
	WATTPLANE_CHAOS_RESULTS="$(abspath $(CHAOS_RESULTS))" \
	WATTPLANE_TESTCLUSTER_BIN="$$(bash hack/testcluster/build.sh | tail -n1)" \
	  $(BIN)/python -m pytest -s -q tests/chaos tests/telemetry/test_tls.py $(PYTEST_ARGS); \
	  rc=$$?; $(BIN)/python -m tests.chaos.records $(CHAOS_RESULTS) || rc=1; exit $$rc

## Soak (long: ~1 h + ~35 min on 2 cores): the 10,000-GPU simulated fleet for 24 simulated hours, then the
## controller on the test cluster under 30 min of ModelDeployment/node churn. Each prints memory growth and
## latency drift and fails past its bounds (see `wattplane soak sim|churn --help`); docs/reliability.md "## Soak".
soak: $(STAMP) cluster-binaries
	nice -n 10 $(BIN)/wattplane soak sim --hours 24 --out out/soak/sim24.json --rows out/soak/sim24.rows.jsonl
	WATTPLANE_TESTCLUSTER_BIN="$$(bash hack/testcluster/build.sh | tail -n1)" \
	  nice -n 10 $(BIN)/wattplane soak churn --minutes 30 --out out/soak/churn30.json

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
