"""Shared setup of the rope_ext unit tests (pure math, milliseconds each; no engine is ever started).

The ``vllm`` marker tags tests that import vLLM (lazily, inside the test): ``-m "not vllm"`` skips them.
Run the tier with ``python -m pytest tests/unit -q``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: imports vLLM 0.32.0 inside the test to compare against its tables")
