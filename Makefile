# One command to run the gateway (`make run`), one to run the tests (`make test`).
# Everything is installed into .venv by these targets; nothing needs to be installed by hand.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run run-mock test test-unit test-redis test-e2e mutation setup lint typecheck bench clean \
	image container-tools browser

$(STAMP): pyproject.toml setup.py scripts/ensure-venv.sh $(wildcard protos/*/*/*.proto)
	@scripts/ensure-venv.sh $(VENV) $(PYTHON)
	@echo "installing Tollgate and its dependencies into $(VENV) (about a minute the first time) ..."
	@$(BIN)/pip install --quiet --upgrade pip
	@# setuptools' notices to package maintainers (UserWarning) are hidden here; the packaging test
	@# (tests/packaging) builds a wheel with them on and fails on any package-discovery warning.
	@PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "installed: $(BIN)/tollgate"

setup: $(STAMP)

## Run the gateway locally: Redis (embedded unless REDIS_URL), extproc, Envoy on 127.0.0.1:10000.
## Add ARGS=--mock-upstream to use the built-in fake OpenAI/Anthropic upstream.
run: $(STAMP)
	$(BIN)/tollgate up $(ARGS)

run-mock: $(STAMP)
	$(BIN)/tollgate up --mock-upstream $(ARGS)

## The whole test suite (unit, real Redis, real Envoy end-to-end, the image and the sidecar pod
## under podman, the dashboard in headless Chromium). CI runs exactly this; podman, runc,
## mmdebstrap, chromium and chromedriver are installed when missing.
test: $(STAMP) container-tools browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

container-tools:
	@for t in podman runc mmdebstrap catatonit; do command -v $$t >/dev/null || { \
		scripts/install-container-tools.sh; break; }; done

## Debian's Chromium + ChromeDriver for the dashboard's browser test (tests/e2e/test_dashboard.py).
browser:
	@scripts/install-browser.sh

## The container image (tollgate + Envoy): docker if a Docker engine answers, else podman.
## IMAGE=... sets the tag, BASE=... the base image (default: bootstrapped from Debian packages).
image: $(STAMP)
	PYTHON=$(BIN)/python scripts/build-image.sh

## One tier at a time (markers): unit (pure core), redis (real Redis), e2e (real Envoy).
test-e2e: browser
test-unit test-redis test-e2e: test-%: $(STAMP)
	$(BIN)/python -m pytest -q -m $* $(PYTEST_ARGS)

## Mutation testing (a habit, not a gate): mutmut over extproc/core, extproc/store and the
## settler, checked by the unit + redis tiers. Slow (~5,300 mutants: hours on 2 cores); narrow it with
## MUTANTS='extproc.core.keys*'. Surviving mutants: `.venv/bin/mutmut results`, see
## docs/mutation.md.
mutation: $(STAMP)
	$(BIN)/mutmut run $(MUTANTS)
	$(BIN)/mutmut results

lint: $(STAMP)
	$(BIN)/ruff check extproc tests bench

typecheck: $(STAMP)
	$(BIN)/mypy extproc

## Benchmark: Envoy direct vs. through Tollgate (installs wrk and h2load from Debian packages when missing).
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	command -v h2load >/dev/null || (apt-get update -qq && apt-get install -y -qq nghttp2-client)
	$(BIN)/python bench/bench.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info extproc/gen/tollgate mutants
