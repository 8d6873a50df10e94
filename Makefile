# fleetserve: every target that runs project code depends on `protos`, which depends on `install`,
# so each works on a fresh clone with nothing but Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto' | sort)
ENGINES ?= 2

.DEFAULT_GOAL := help

.PHONY: help install protos cluster test system-deps lint bench bench-gateway bench-autoscale bench-rollouts autoscale-live loadtest check-wheel fuzz chaos chaos-multihost soak demo demo-png experiments clean dashboard-png

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv (PyPI's, installed into the venv by its own pip) installs the same packages as pip several times faster;
	@# pip does it where uv cannot be installed. --compile-bytecode as pip does: without .pyc files every process
	@# compiles its imports at each start (PYTHONDONTWRITEBYTECODE=1 keeps it from caching them), which made a
	@# fleet's start 2-3x slower.
	if $(BIN)/python -m pip install -q uv; then \
	  $(BIN)/python -m uv pip install -q --compile-bytecode --python $(BIN)/python --upgrade pip -e '.[dev]'; \
	else \
	  $(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -e '.[dev]'; \
	fi
	@touch $@

install: $(VENV)/.installed ## Create .venv and install fleetserve with its dev tools.

gen/.stamp: $(VENV)/.installed $(PROTOS)
	@rm -rf gen && mkdir -p gen
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen $(PROTOS)
	@# The generated package `fleetserve.*` lives in gen/; a .pth file puts it on the venv's path.
	@echo "$(CURDIR)/gen" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fleetserve_gen.pth"
	@touch $@

protos: gen/.stamp ## Generate Python code from protos/ into gen/.

cluster: protos ## Start a local fleet on the simulated engine (ENGINES=2); Ctrl-C stops it.
	$(BIN)/fleetserve up --engines $(ENGINES) --backend sim

test: protos system-deps ## Run the tests (GPU tests are skipped without a GPU).
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The real servers the tests run against (never mocks): each is Debian's package, installed where missing.
SYSTEM_PACKAGES ?= redis-server postgresql etcd-server prometheus chromium jq

system-deps: ## Install the servers the tests use (redis, postgresql, etcd, prometheus, chromium) where missing; never fatal.
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | \
	    grep -q '^install ok installed' || echo $$p; done); \
	[ -z "$$missing" ] || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  export DEBIAN_FRONTEND=noninteractive; echo "installing $$missing (apt)"; \
	  { $$SUDO apt-get install -y -qq --no-install-recommends $$missing || { $$SUDO apt-get update -qq && \
	    $$SUDO apt-get install -y -qq --no-install-recommends $$missing; }; } >/dev/null 2>&1 || \
	  echo "note: could not install $$missing; the tests that need them will be skipped with the reason"; }

check-wheel: protos ## pip install of a fresh clone as a user does it: isolated wheel builds, deps from the index, fleetserve up (minutes).
	FLEETSERVE_WHEEL_FULL=1 $(BIN)/python -m pytest -q tests/integration/test_wheel.py \
		tests/integration/test_cli.py::test_up_generate_status_and_clean_stop

lint: protos ## Ruff lint and format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: protos ## Start a 1-engine fleet, load it directly and through the mesh, print JSON with ratios.
	@$(BIN)/fleetserve bench --spawn --engines 1 --compare --concurrency 32 --requests 256

bench-gateway: protos ## The gateway's own overhead: router vs gateway gRPC vs gateway HTTP, interleaved (JSON).
	@$(BIN)/fleetserve bench --gateway-overhead --spawn --engines 1 --concurrency 1 --requests 300 \
		--prompt-tokens 128 --max-tokens 64 --seed 1 --out docs/benchmarks/gateway_overhead.json

bench-autoscale: protos ## Autoscaling policies vs an oracle on 4 traces in virtual time (JSON + PNGs in docs/benchmarks/).
	$(BIN)/python -m loadtest.autoscale_bench --out docs/benchmarks/autoscaling.json --plots docs/benchmarks/autoscaling

bench-rollouts: protos ## Rollouts on a time-compressed sim fleet (ramps, blue-green, shadow, bad input) + A/B statistics by simulation (JSON in docs/benchmarks/).
	$(BIN)/python -m loadtest.rollout_bench --sections stats --out docs/benchmarks/rollouts.json
	$(BIN)/python -m loadtest.rollout_bench --sections ramps,input --out docs/benchmarks/rollouts.json
	$(BIN)/python -m loadtest.rollout_bench --sections blue_green,shadow --out docs/benchmarks/rollouts.json

autoscale-live: protos ## The autoscaler on real processes with a 60 s load phase (scale up, drain down, none cut).
	FLEETSERVE_AUTOSCALE_LIVE_S=60 $(BIN)/python -m pytest -q tests/integration/test_autoscaling_live.py

dashboard-png: protos ## Regenerate docs/dashboard.png: a loaded fleet's live dashboard in headless Chromium (~90 s).
	$(BIN)/python -m loadtest.dashboard_shot --out docs/dashboard.png --seconds 60

USERS ?= 32
DURATION ?= 60s
SCENARIOS ?= chat
PROTOCOLS ?= grpc
WORKERS ?= 0
LOCUST_FLAGS ?=
LOCUST_RUN = --headless --users $(USERS) --spawn-rate $(USERS) --run-time $(DURATION) \
	--html loadtest-report.html --csv loadtest $(LOCUST_FLAGS)
loadtest: protos ## Locust against the running cluster: loadtest-report.html + loadtest_*.csv (USERS DURATION SCENARIOS PROTOCOLS WORKERS LOCUST_FLAGS).
	@# SCENARIOS: chat,multiturn,batch,bursty; PROTOCOLS: grpc,http; WORKERS>0: distributed (a master and N workers).
	FLEETSERVE_SCENARIOS=$(SCENARIOS) FLEETSERVE_PROTOCOLS=$(PROTOCOLS) \
	$(if $(filter 0,$(WORKERS)),$(BIN)/locust -f loadtest/locustfile.py,$(BIN)/python -m loadtest.distributed --workers $(WORKERS)) $(LOCUST_RUN)

FUZZ_GRPC_EXAMPLES ?= 1430
FUZZ_HTTP_EXAMPLES ?= 10000
fuzz: protos ## Long property-based fuzz of the public edge: ~10k requests per protocol (gRPC's 7 RPCs, OpenAI HTTP).
	@rm -f docs/benchmarks/fuzz.json
	HYPOTHESIS_PROFILE=explore FLEETSERVE_FUZZ_REPORT=docs/benchmarks/fuzz.json FLEETSERVE_FUZZ_EXAMPLES=$(FUZZ_GRPC_EXAMPLES) \
		$(BIN)/python -m pytest -q tests/integration/test_hostile_input.py -k grpc --timeout 3600
	HYPOTHESIS_PROFILE=explore FLEETSERVE_FUZZ_REPORT=docs/benchmarks/fuzz.json FLEETSERVE_FUZZ_EXAMPLES=$(FUZZ_HTTP_EXAMPLES) \
		$(BIN)/python -m pytest -q tests/integration/test_hostile_input.py -k http --timeout 3600

chaos: protos system-deps ## Long fault suite: engine kills 60 s, engine hangs 2 min (4 engines, 16 streams), drains, Redis.
	FLEETSERVE_CHAOS_S=60 FLEETSERVE_HANG_S=120 FLEETSERVE_HANG_EVERY_S=10 FLEETSERVE_HANG_FOR_S=20 \
	FLEETSERVE_HANG_ENGINES=4 FLEETSERVE_HANG_CLIENTS=16 FLEETSERVE_HANG_SPEED=1 \
		$(BIN)/python -m pytest -q -s tests/chaos tests/integration/test_redis_breaker.py --timeout 1200

chaos-multihost: protos system-deps ## 2 gateways + 2 routers + 2 registries on PostgreSQL/etcd/Redis: 5 rounds of SIGKILLs under load (~5 min).
	FLEETSERVE_MULTIHOST_ROUNDS=5 FLEETSERVE_MULTIHOST_PHASE_S=6 FLEETSERVE_MULTIHOST_ENGINES=2 \
		$(BIN)/python -m pytest -q -s tests/integration/test_multihost_chaos.py --timeout 1800

SOAK_STREAMS ?= 200000
# The bounded caches (engine KV blocks, spans, the gateway's Feedback index, the metrics service's request ids for
# feedback) sized to be full within the first 30k streams,
# so that what still grows after that is what is not bounded (docs/benchmarks/reliability.md).
SOAK_CACHES ?= --kv-blocks 8192 --max-spans 50000 --feedback-index 20000 --quality-recent 20000
# Router and gateway in 2 workers each, and each engine, recycled after ~20k requests: what grpc.aio leaks natively
# per cancelled stream is bounded that way (SOAK_RECYCLE= runs them as single processes, never recycled).
SOAK_RECYCLE ?= --workers 2 --max-requests-per-worker 20000 --max-requests-jitter 2000
soak: protos ## Soak: 200k streams through the gateway, most cancelled; RSS/fds/threads/tasks JSON + plot.
	$(BIN)/python -m pip install -q -e '.[soak]'
	$(BIN)/python -m loadtest.soak --streams $(SOAK_STREAMS) $(SOAK_CACHES) $(SOAK_RECYCLE) \
		--sample-every 2500 --out docs/benchmarks/soak.json --plot docs/benchmarks/soak.png

demo: protos ## The capstone demo: a sim fleet through two compressed days, canaries, a spike and a killed replica (~5 min); demo-report/.
	$(BIN)/fleetserve demo capstone --out demo-report --screenshot demo-report/report.png

demo-png: protos ## Regenerate docs/demo-report.png: the demo's report in headless Chromium (runs make demo first if there is no report).
	@test -f demo-report/report.json || $(MAKE) demo
	$(BIN)/python -m loadtest.demo.report demo-report --screenshot docs/demo-report.png

EXPERIMENTS ?= retry-storm scaling-cold-start streaming-ttft mean-vs-p99 cost-by-type model-routing-cost least-load-tail cache-aware-ttft ab-planted
experiments: protos ## Run the book's exercises (EXPERIMENTS=...) into docs/experiments/ (tens of minutes).
	@for e in $(EXPERIMENTS); do $(BIN)/fleetserve experiment $$e --out docs/experiments/$$e.json >/dev/null || exit 1; done

clean: ## Remove the venv, generated code and build outputs (a fleet's state lives in $FLEETSERVE_HOME, untouched).
	rm -rf $(VENV) gen build dist *.egg-info .pytest_cache .ruff_cache
