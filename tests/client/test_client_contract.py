"""Contract: ropeserve_client against the real gateway app (``server.app.create_app``) in front of the
gateway tier's in-process fake vLLM engine (tests/server/fake_engine.py), through httpx's ASGI
transport: no socket, no model. Where test_client_*.py check the client against our reading of the API,
this checks that reading against the gateway's code: the x-rope-factor header, SSE, the error envelopes
(context_length_exceeded, invalid API key), probes and the passkey route's 200/503 answers."""

from __future__ import annotations

import httpx
import pytest

from ropeserve_client import AsyncClient, AuthenticationError, ContextLengthExceededError, RetryPolicy

pytest.importorskip("fastapi")
from tests.server.conftest import gateway  # noqa: E402  (the gateway tier's app-around-fake-engines helper)
from tests.server.fake_engine import MODEL, FakeEngine  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ROPESERVE_"):
            monkeypatch.delenv(name)


def client_for(http: httpx.AsyncClient, **kwargs) -> AsyncClient:
    return AsyncClient(str(http.base_url), http_client=http, retry=RetryPolicy.none(), **kwargs)


async def test_completion_stream_and_header():
    async with gateway([FakeEngine()]) as http:
        client = client_for(http)
        assert (await client.models()).ids == [MODEL]
        out = await client.complete("one two three", max_tokens=4)
        assert out.text and out.rope_factor == 1.0
        assert (await client.complete("one two three", max_tokens=4, rope_factor=2.0)).rope_factor == 2.0
        stream = await client.complete_stream("one two three", max_tokens=4)
        assert stream.rope_factor == 1.0
        assert "".join([c.text async for c in stream]) == out.text
        chat = await client.chat("hello there", max_tokens=3)
        assert chat.content and chat.rope_factor == 1.0
        chunks = [c.content async for c in await client.chat_stream("hello there", max_tokens=3)]
        assert "".join(chunks) == chat.content


async def test_errors_reach_the_user_typed_and_intact():
    async with gateway([FakeEngine()], api_keys="good-key") as http:
        with pytest.raises(AuthenticationError) as info:
            await client_for(http, api_key="bad-key").models()
        assert info.value.status_code == 401 and info.value.message
        client = client_for(http, api_key="good-key")
        with pytest.raises(ContextLengthExceededError) as info:
            await client.complete("one two", max_tokens=10_000_000)
        assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
        raw = await http.post("/v1/completions", json={"model": MODEL, "prompt": "one two", "max_tokens": 10_000_000},
                              headers={"authorization": "Bearer good-key"})
        assert info.value.message == raw.json()["error"]["message"]  # word for word
        assert (await client.ready()).ok and (await client.health()).ok


async def test_passkey_hit_and_miss():
    async with gateway([FakeEngine()]) as http:
        hit = await client_for(http).passkey(512, depth=0.5, seed=1)
    assert hit.passed and hit.seed == 1 and hit.rope_factor == 1.0
    wrong = FakeEngine()
    wrong.passkey_wrong = True
    async with gateway([wrong]) as http:
        miss = await client_for(http).passkey(512, depth=0.5, seed=1)
    assert not miss.passed and miss.expected_key == hit.expected_key
