# ropeserve's two commands: `make serve` and `make test`. Each sets up what it needs on first run
# (scripts/setup.sh: .venv with pinned dependencies, the embedded default model), then does its job.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench clean

setup:
	@scripts/setup.sh

serve: setup
	$(VENV)/bin/ropeserve serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
