"""Fixtures of the reliability tests: those of the gateway tests (a clean ROPESERVE_* environment, anyio on
asyncio), and a time limit per test so a hang fails instead of stalling the run."""

from __future__ import annotations

import os

import pytest

from tests.server.conftest import _clean_environment, anyio_backend  # noqa: F401  (fixtures)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(90))
