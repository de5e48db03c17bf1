# Stratus: `make up` runs the platform, `make test` runs every test.
# Both install what is missing first (the venv, RabbitMQ, ZooKeeper,
# Prometheus) and start RabbitMQ, ZooKeeper and Prometheus when they are not
# running (scripts/services.sh). Idempotent.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: up down test test-fast test-docker venv services browser bench clean-state fuzz walls

$(VENV)/.installed: pyproject.toml
	@python3 -c 'import ensurepip, venv' 2>/dev/null || { echo "installing python3-venv"; \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

venv: $(VENV)/.installed

# The walls around tenants' instances on the process runtime (docs/security.md):
# bubblewrap, nftables, and setpriv/prlimit (util-linux), useradd (passwd).
walls:
	@{ command -v bwrap && command -v nft && command -v setpriv && command -v prlimit && command -v useradd && command -v pkill; } >/dev/null 2>&1 \
	  || { echo "installing bubblewrap and nftables"; \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap nftables util-linux passwd procps >/dev/null; }

services:
	@scripts/services.sh start

# Headless Chromium and its driver (Debian's chromium, chromium-driver) for the
# dashboard's browser tests; when they cannot be installed those tests skip
# with a message, and everything else runs.
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || { echo "installing chromium and chromium-driver"; \
	  { $$( [ $$(id -u) = 0 ] || echo sudo ) apt-get update -qq && \
	    $$( [ $$(id -u) = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	  || echo "chromium could not be installed: the dashboard's browser tests will be skipped"; }

# With several broker nodes or ZooKeeper servers, services.sh writes their
# addresses to $STATE_DIR/services.env (docs/cluster.md): the platform takes them.
up: venv walls services
	@set -a; if [ "$${STRATUS_BROKER_NODES:-1}" != 1 ] || [ "$${STRATUS_ZK_NODES:-1}" != 1 ]; then \
	  . "$${STRATUS_STATE_DIR:-var}/services.env"; fi; set +a; \
	  $(VENV)/bin/stratus up $(if $(DETACH),--detach,)

down: venv
	@$(VENV)/bin/stratus down

# The whole suite: unit, integration and end-to-end on processes, then the
# Docker stage (a separate script, skipped with a message when no engine can run).
test: venv walls services browser
	$(PY) -m pytest -q -m "not docker" $(PYTEST_ARGS) tests
	@scripts/docker-stage.sh
	@$(MAKE) --no-print-directory chaos-stage

test-fast: venv walls services browser
	$(PY) -m pytest -q -m "not docker and not slow" $(PYTEST_ARGS) tests

# The property test of the wire protocol with many more generated requests
# than CI runs (STRATUS_FUZZ_EXAMPLES, 2,000 in make test).
fuzz: venv services
	STRATUS_FUZZ_EXAMPLES=$${STRATUS_FUZZ_EXAMPLES:-20000} $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_fuzz_requests.py

test-docker: venv services
	@scripts/docker-stage.sh

# Each benchmark prints its figures and, with --record, appends them (dated,
# with the machine) to docs/benchmarks.md. Run on a quiet machine. HAProxy is
# the gateway benchmark's reference proxy (it runs without it, minus those rows).
bench: venv services
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { echo "installing haproxy"; \
	  $$( [ $$(id -u) = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null \
	  || echo "haproxy could not be installed: the gateway benchmark runs without its reference rows"; }
	$(PY) benchmarks/db_client.py --record
	$(PY) benchmarks/failover.py --record
	$(PY) benchmarks/gateway.py --record
	$(PY) benchmarks/toystore.py --record
	$(PY) benchmarks/snapshot.py --record
	$(PY) benchmarks/promotion_faults.py --record
	$(PY) benchmarks/tenancy.py --record
	$(PY) benchmarks/apps.py --record
	$(PY) benchmarks/dashboard.py --record
	$(PY) benchmarks/scrape_cost.py --record
	$(PY) benchmarks/broker_nodes.py --record

# The fault-injection suite (docs/reliability.md): a seeded schedule of faults
# (kill -9 of the master, a slave, the leading orchestrator, a broker node, a
# ZooKeeper server; partitions through TCP proxies; SIGSTOP of the master)
# while set and register workloads run through the gateway, on the run's own
# RabbitMQ node(s) and ZooKeeper server(s) (STRATUS_BROKER_NODES,
# STRATUS_ZK_NODES). `make chaos` plays STRATUS_CHAOS_SECONDS (600) of it and
# prints the table; CHAOS_ARGS=--record appends it to docs/reliability.md.
# `make test` ends with the chaos stage: every fault once (about 3 minutes,
# killed past 8); STRATUS_SKIP_CHAOS=1 skips it.
.PHONY: chaos chaos-stage
CHAOS_ARGS ?=
chaos: venv services
	$(PY) -m stratus.chaos --seconds $${STRATUS_CHAOS_SECONDS:-600} $(CHAOS_ARGS)

chaos-stage: venv services
	@if [ -n "$${STRATUS_SKIP_CHAOS:-}" ]; then echo "chaos stage: skipped (STRATUS_SKIP_CHAOS is set)"; else \
	  echo "chaos stage: every fault once"; \
	  STRATUS_CHAOS_STAGE=1 timeout 480 $(PY) -m pytest -q -p no:cacheprovider tests/chaos/test_chaos_run.py; fi
