# Everything a fresh machine needs: `make demo` and `make test` create the
# environment on first use. torch/torchvision come from the local wheel store
# through pip (pinned in pyproject.toml); DVC lives in its own environment
# because its hydra/omegaconf pins clash with Dagster (see README, Design).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DVC_VENV := .venv-dvc
export DAGSTER_HOME ?= $(CURDIR)/dagster_home

.PHONY: setup setup-dvc demo test test-fast ui bench clean

setup: $(VENV)/.stamp-setup

$(VENV)/.stamp-setup: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup-dvc: $(DVC_VENV)/.stamp-setup

$(DVC_VENV)/.stamp-setup:
	@test -x $(DVC_VENV)/bin/python || $(PY) -m venv $(DVC_VENV) || python3 -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q 'dvc>=3.50'
	@touch $@

demo: setup
	$(BIN)/ravl demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

ui: setup
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

clean:
	rm -rf runs build
