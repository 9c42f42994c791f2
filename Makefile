# vramctl: `make help` lists the targets.
PY ?= python3
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install setup infra image up test lint bench reconcile-bench crd gpu-proof

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

install: ## install vramctl alone (what `make up` needs; no torch)
	$(PY) -m pip install -q -e .

setup: ## install vramctl and its test tools into the current Python (torch first: the pinned CPU build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,images-test]'

infra: ## install and start a Docker engine and compose v2 (Debian, needs root)
	bash .ci/setup-infra.sh

image: ## build the stand-in model server image (no pull)
	bash images/standin/build.sh

up: install ## run the supervisor on the embedded demo stack (docker if it answers, else processes)
	@if docker info >/dev/null 2>&1; then bash images/standin/build.sh; fi
	$(PY) -m vramctl up

# The tests run in TEST_WORKERS processes (pytest-xdist); those that share
# something only one process may hold stay in one worker (tests/conftest.py:
# XDIST_GROUPS). Three workers on two cores: more oversubscribe the
# machine and stretch the timing of the process and engine tests. The 15
# slowest are listed.
TEST_WORKERS ?= 3
test: setup infra image ## run every test against a real Docker engine, in parallel
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup

lint: setup ## ruff, mypy --strict, import-linter contracts
	$(PY) -m ruff check operator tests benchmarks images
	$(PY) -m mypy
	lint-imports

bench: setup infra image ## switch benchmark: vramctl vs docker compose stop/up scripts
	$(PY) benchmarks/switch_bench.py

reconcile-bench: setup infra image ## Kubernetes mode: PATCH spec.activeModel -> first docker action (kmock + kopf + docker)
	$(PY) benchmarks/reconcile_latency.py

gpu-proof: ## real CUDA switches + NVML probe (needs a GPU and torch); DRY=1: simulated, no GPU
	$(PY) benchmarks/gpu_proof.py $(if $(DRY),--dry-run,)

crd: ## regenerate the ModelDeployment CRD from vramctl.spec.models (manifests/ and the chart)
	$(PY) -m vramctl.spec.crd -o manifests/crds/modeldeployments.vramctl.io.yaml -o charts/vramctl/crds/modeldeployments.vramctl.io.yaml
