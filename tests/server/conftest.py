"""Fixtures of the gateway tests: a clean environment, and gateways around in-process fake engines.

``gateway(engines, **settings)`` builds the real app (``create_app``) with its lifespan running, its pool
pointed at the fake engines through in-process transports, and yields an httpx client for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.settings import GatewaySettings
from server.upstreams import EnginePool
from tests.server.fake_engine import MODEL, FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come from the test only, never from the developer's ROPESERVE_* variables."""
    for name in list(os.environ):
        if name.startswith("ROPESERVE_"):
            monkeypatch.delenv(name)


def fake_urls(count: int) -> list[str]:
    return [f"http://engine-{i}.test:8000" for i in range(count)]


def settings_for(urls: list[str], **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {"engine_urls": urls, "served_model_name": MODEL, "health_interval_s": 3600}
    values.update(overrides)
    return GatewaySettings(**values)


@contextlib.asynccontextmanager
async def gateway(engines: list[FakeEngine], **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A running gateway app in front of ``engines``; the client's ``app`` attribute is the app."""
    urls = fake_urls(len(engines))
    settings = settings_for(urls, **overrides)
    transports = {url: engine.transport() for url, engine in zip(urls, engines, strict=True)}
    pool = EnginePool.from_settings(settings, transports=transports)
    app = create_app(settings, engine_pool=pool)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway.test",
                                     timeout=30) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A hung gateway test fails after 120 s instead of stalling the whole run (pytest-timeout); the process
    tests take a few seconds on a quiet machine, tens on a loaded one."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(120))
