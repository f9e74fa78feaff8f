# ropeserve's two commands: `make serve` and `make test`. Each sets up what it needs on first run
# (scripts/setup.sh: .venv with pinned dependencies, the embedded default model), then does its job.
# `make test` runs every tier, the container tier (tests/container) where a Docker engine runs.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast test-containers clean

setup:
	@scripts/setup.sh

serve: setup
	$(VENV)/bin/ropeserve serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not engine and not container" $(PYTEST_ARGS)

# The container tier alone (it also runs in `make test` where a Docker engine answers `docker info`).
test-containers: setup
	$(PY) -m pytest tests/container $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
