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

.PHONY: setup setup-dvc setup-chromium setup-redis repro demo test test-fast ui worker bench clean

setup: $(VENV)/.stamp-setup

$(VENV)/.stamp-setup: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

setup-dvc: $(DVC_VENV)/.stamp-setup

# About 1.5 minutes from the package index on first use.
$(DVC_VENV)/.stamp-setup:
	@test -x $(DVC_VENV)/bin/python || $(PY) -m venv $(DVC_VENV) || python3 -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q --upgrade pip
	$(DVC_VENV)/bin/pip install -q 'dvc>=3.50,<4'
	@touch $@

# The DVC stages (dvc.yaml) launch the Dagster materializations; no run-cache
# restores, so every output DVC records comes from a recorded Dagster run.
repro: setup setup-dvc
	$(DVC_VENV)/bin/dvc repro --no-run-cache

# The report's browser test renders with headless Chromium (Debian package;
# needs root for apt-get, as in CI).
CHROMIUM ?= /usr/bin/chromium
setup-chromium:
	@test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# The Celery executor's broker (Debian's redis-server; the tests start their
# own on a free loopback port). Needs root for apt-get, as in CI.
REDIS_SERVER ?= /usr/bin/redis-server
setup-redis:
	@test -x $(REDIS_SERVER) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

# The whole Dagster asset graph on the built-in synthetic default; the runs
# are recorded in $(DAGSTER_HOME), so `make ui` shows them afterwards.
demo: setup
	$(BIN)/ravl demo

# Two workers (pytest-xdist), a test file to a worker: most of the long tests
# wait on Dagster runs, servers and subprocesses, so two overlap well on 2 cores.
TEST_WORKERS ?= 2
test: setup setup-dvc setup-chromium setup-redis
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Dagster UI + daemon (sensor, schedule) on the same instance as `ravl`, and
# the reports the asset pages link to (port 3001); Ctrl-C stops everything.
ui: setup
	$(BIN)/ravl ui --port 3000 --reports-port 3001

# Scale-out on one machine: a Redis broker on the loopback and two Celery
# workers; then `RAVL_EXECUTOR=celery .venv/bin/ravl materialize ...` (or runs
# from `make ui` started with RAVL_EXECUTOR=celery) execute their steps there.
REDIS_PORT ?= 6379
worker: setup setup-redis
	@trap 'kill 0' INT TERM EXIT; \
	$(REDIS_SERVER) --port $(REDIS_PORT) --bind 127.0.0.1 --save '' --appendonly no & \
	RAVL_CELERY_BROKER=redis://127.0.0.1:$(REDIS_PORT)/0 $(BIN)/ravl worker --name w1 & \
	RAVL_CELERY_BROKER=redis://127.0.0.1:$(REDIS_PORT)/0 $(BIN)/ravl worker --name w2 & \
	wait

clean:
	rm -rf runs build
