# kubetune's two promises: `make quickstart` and `make test`, each from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kubetune-installed
TINY_BASE := .kubetune/models/tiny-base
# The tests share the quickstart's tiny base (an idempotent build: made once, reused after).
export KUBETUNE_TINY_BASE_DIR ?= $(CURDIR)/$(TINY_BASE)

.PHONY: setup system-deps quickstart test lint typecheck layers unit integration e2e crds clean

setup: $(STAMP) system-deps

# The rollout tests judge canaries with a real Prometheus server (Debian's package, run on loopback);
# tests/realcluster unpacks the real kube-apiserver and etcd of ../shared/k8s with zstd.
system-deps:
	@command -v prometheus >/dev/null && command -v zstd >/dev/null || { \
		echo "installing Debian's prometheus and zstd (needed by the rollout and real-cluster tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus zstd >/dev/null; }

# torch goes first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $@

# `kubetune up` fine-tunes, quantizes, then serves until interrupted: query.py waits for the
# ModelDeployment to be Ready and queries it, then SIGTERM stops `up` and every process it started.
# SIGTERM, not SIGINT: the shell starts a background job with SIGINT ignored, so a SIGINT sent before
# `up` has installed its handlers would be lost and `wait` would never return.
quickstart: setup
	$(BIN)/kubetune dev tiny-base --out $(TINY_BASE)
	@$(BIN)/kubetune up -f examples/quickstart/ & up=$$!; \
	trap 'kill -TERM $$up 2>/dev/null; wait $$up; exit 130' INT TERM; \
	$(BIN)/python examples/quickstart/query.py --up-pid $$up; query=$$?; \
	kill -TERM $$up 2>/dev/null; wait $$up; up_status=$$?; \
	echo "query.py exited with $$query, kubetune up with $$up_status"; \
	test $$query -eq 0 && test $$up_status -eq 0
	$(BIN)/kubetune get ftj
	$(BIN)/kubetune get qj
	$(BIN)/kubetune get mdep -o wide

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator components tests benchmarks

typecheck: setup
	$(BIN)/mypy

# The layering contract ([tool.importlinter] in pyproject.toml): imports go one way.
layers: setup
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -q tests/unit

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q

crds: setup
	$(BIN)/kubetune crds --out-dir manifests/crds

clean:
	rm -rf $(VENV) .kubetune .pytest_cache .mypy_cache .ruff_cache
