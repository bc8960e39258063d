# kubetune's two promises: `make quickstart` and `make test`, each from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kubetune-installed
TINY_BASE := .kubetune/models/tiny-base
# The tests share the quickstart's tiny base (an idempotent build: made once, reused after).
export KUBETUNE_TINY_BASE_DIR ?= $(CURDIR)/$(TINY_BASE)
# envtest's convention: the real-cluster tests find kube-apiserver, etcd, kube-controller-manager and
# kubectl through KUBEBUILDER_ASSETS. Unset, it points at an unpacked copy of ../shared/k8s when that
# exists; with neither, tests/realcluster is skipped with one line saying how to get the binaries.
SHARED_K8S_BIN := $(abspath $(CURDIR)/../shared/k8s/bin)
K8S_ASSETS := $(CURDIR)/.kubetune/k8s
ifeq ($(origin KUBEBUILDER_ASSETS),undefined)
ifneq ($(wildcard $(SHARED_K8S_BIN)/kube-apiserver.zst),)
export KUBEBUILDER_ASSETS := $(K8S_ASSETS)
K8S_ASSETS_TARGET := $(K8S_ASSETS)/.unpacked
endif
endif

.PHONY: setup system-deps k8s-assets quickstart test lint typecheck layers unit integration e2e crds clean

setup: $(STAMP) system-deps

# Real servers the tests start on loopback, from Debian's packages: Prometheus (canary analysis),
# redis-server (gateway limits shared by replicas), wrk (the gateway benchmark's load generator),
# bubblewrap (rendered pods run in a sandbox), zstd (unpacks ../shared/k8s).
SYSTEM_PACKAGES := prometheus redis-server wrk bubblewrap zstd
SYSTEM_COMMANDS := prometheus redis-server wrk bwrap zstd
system-deps:
	@missing=""; for command in $(SYSTEM_COMMANDS); do command -v $$command >/dev/null || missing=1; done; \
	test -z "$$missing" || { \
		echo "installing Debian's $(SYSTEM_PACKAGES) (servers and tools the tests run for real)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; }

k8s-assets: $(K8S_ASSETS_TARGET)

$(K8S_ASSETS)/.unpacked: system-deps
	@mkdir -p $(K8S_ASSETS)
	@for archive in $(SHARED_K8S_BIN)/*.zst; do \
		name=$$(basename $$archive .zst); \
		zstd -d -q -f $$archive -o $(K8S_ASSETS)/$$name && chmod 0755 $(K8S_ASSETS)/$$name || exit 1; \
	done
	@touch $@

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

test: setup k8s-assets
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest -q

crds: setup
	$(BIN)/kubetune crds --out-dir manifests/crds

clean:
	rm -rf $(VENV) .kubetune .pytest_cache .mypy_cache .ruff_cache
