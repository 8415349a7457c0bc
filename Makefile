# peflow: `make demo` runs the pipeline on the built-in corpus, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export PEFLOW_HOME ?= $(CURDIR)/.run
# Offline-safe: no telemetry from GX, MLflow, Airflow or DVC.
export GX_ANALYTICS_ENABLED := False
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export AIRFLOW__USAGE_DATA_COLLECTION__ENABLED := False
export DVC_NO_ANALYTICS := 1
export PYTEST_ADDOPTS ?=

.PHONY: setup test test-fast demo up down bench lock clean dvc-yaml kfp k8s

setup: $(VENV)/.installed ## venv + locked install (idempotent)

$(VENV)/.installed: requirements/lock.txt pyproject.toml
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "warning: could not install Debian's chromium (browser tests need it)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --no-deps -r requirements/lock.txt
	$(BIN)/python -m pip install --no-deps -e .
	@touch $@

test: setup ## the whole suite (what CI runs)
	$(BIN)/python -m pytest -m "not gpu" tests

test-fast: setup ## unit tests only
	$(BIN)/python -m pytest -m "not slow and not e2e and not gpu" tests/unit

demo: setup ## the pipeline on the built-in corpus, under DVC
	$(BIN)/python -m peflow.demo

up: setup ## start local MLflow (and Airflow once the DAG exists) on 127.0.0.1
	$(BIN)/python -m peflow.services up

down: ## stop exactly what `make up` started
	@test -x $(BIN)/python && $(BIN)/python -m peflow.services down || true

bench: setup ## benchmarks; results land in bench/results/
	$(BIN)/python bench/synth_speed.py
	$(BIN)/python bench/train_step.py

lock: ## regenerate requirements/lock.txt from requirements/requirements.in
	./scripts/lock.sh

clean:
	rm -rf .run data/corpus .pytest_cache

dvc-yaml: setup ## regenerate params.yaml and dvc.yaml from the nano preset and the stage registry
	$(BIN)/python -m peflow.pipeline nano

# Kubeflow Pipelines: kfp lives in an environment of its own (its pins clash with the main lock: docs/kubeflow.md).
KFP_VENV ?= .venv-kfp
KFP_PRESET ?= nano
KFP_OUT ?= build/kfp
KFP_OPTS ?=

kfp: setup $(KFP_VENV)/.installed ## compile the stage graph to a KFP v2 pipeline: $(KFP_OUT)/pe_pipeline.yaml
	$(BIN)/python -m peflow.kfp_spec $(KFP_PRESET) --out $(KFP_OUT)/pe_pipeline.json
	$(KFP_VENV)/bin/python kfp/compile.py $(KFP_OUT)/pe_pipeline.json --out $(KFP_OUT)/pe_pipeline.yaml $(KFP_OPTS)

$(KFP_VENV)/.installed: requirements/kfp.txt
	@test -x $(KFP_VENV)/bin/python || $(PYTHON) -m venv $(KFP_VENV)
	$(KFP_VENV)/bin/python -m pip install -q --no-deps -r requirements/kfp.txt
	@touch $@

# Kubernetes: the objects `kubectl apply -k k8s/` applies, rendered and validated offline (docs/kubernetes.md).
K8S_OUT ?= build/k8s/peflow.yaml

k8s: setup ## render k8s/ to $(K8S_OUT) and validate every object and the Airflow values against their schemas
	$(BIN)/python -m peflow.k8s render --out $(K8S_OUT)
	$(BIN)/python -m peflow.k8s validate
