"""AsyncClient against the fake gateway: the same promises as the sync client, as coroutines and async
iterators (run under anyio's pytest plugin on asyncio)."""

from __future__ import annotations

import httpx
import pytest

from ropeserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    ContextLengthExceededError,
    IncompleteStreamError,
    RateLimitError,
    ServiceUnavailableError,
)

from .fake_gateway import MODEL, URL, Chunks, error, sse

pytestmark = pytest.mark.anyio


async def test_complete_and_header(make_async_client, gateway):
    async with make_async_client() as client:
        out = await client.complete("The capital of France is", max_tokens=5, rope_factor=3.0)
    assert out.text == "Paris is the capital." and out.rope_factor == 3.0
    assert gateway.paths() == ["/v1/models", "/v1/completions"]
    assert gateway.bodies("/v1/completions")[0]["model"] == MODEL


async def test_chat(make_async_client):
    async with make_async_client(model="m") as client:
        out = await client.chat([{"role": "user", "content": "hi"}], max_tokens=1)
    assert out.content == "Paris" and out.rope_factor == 1.0


async def test_complete_stream(make_async_client, gateway):
    gateway.queue("/v1/completions", sse([{"choices": [{"text": t}]} for t in "abc"], split=5, rope_factor=2.0))
    async with make_async_client(model="m") as client:
        async with await client.complete_stream("p") as stream:
            assert stream.rope_factor == 2.0
            texts = [c.text async for c in stream]
    assert texts == ["a", "b", "c"]
    assert stream.response.is_closed


async def test_chat_stream(make_async_client):
    async with make_async_client(model="m") as client:
        stream = await client.chat_stream("hi", max_tokens=2)
        assert [c.content async for c in stream] == ["", "Paris", " is"]


async def test_stream_error_event_and_incomplete(make_async_client, gateway):
    gateway.queue("/v1/chat/completions",
                  sse([{"error": {"message": "prompt too long for factor 2", "code": "context_length_exceeded"}}]))
    gateway.queue("/v1/completions", httpx.Response(200, stream=Chunks([b'data: {"choices": []}\n\n'])))
    async with make_async_client(model="m") as client:
        with pytest.raises(ContextLengthExceededError, match="^prompt too long for factor 2$"):
            [c async for c in await client.chat_stream("hi")]
        with pytest.raises(IncompleteStreamError):
            [c async for c in await client.complete_stream("p")]


async def test_retry_after_honoured(make_async_client, gateway, async_sleeps):
    gateway.queue("/v1/completions",
                  error(429, "busy", "rate_limit_error", None, headers={"retry-after": "2"}),
                  error(503, "warming", "service_unavailable", None))
    async with make_async_client(model="m") as client:
        assert (await client.complete("p")).text
    assert async_sleeps == [2.0, 1.0]  # Retry-After, then backoff 0.5 * 2**1


async def test_retries_exhausted(make_async_client, gateway, async_sleeps):
    gateway.queue("/v1/completions", *[error(503, "still down", "service_unavailable", None)] * 4)
    async with make_async_client(model="m") as client:
        with pytest.raises(ServiceUnavailableError, match="still down"):
            await client.complete("p")
    assert async_sleeps == [0.5, 1.0, 2.0]


async def test_stream_retried_before_it_starts(make_async_client, gateway, async_sleeps):
    gateway.queue("/v1/completions", error(429, "busy", "rate_limit_error", None, headers={"retry-after": "1"}))
    async with make_async_client(model="m") as client:
        assert [c.text async for c in await client.complete_stream("p", max_tokens=1)] == ["Paris"]
    assert async_sleeps == [1.0]


async def test_transport_errors(make_async_client, gateway, async_sleeps):
    gateway.queue("/v1/models", httpx.ConnectError("refused"), httpx.ReadTimeout("slow"))
    async with make_async_client() as client:
        with pytest.raises(APITimeoutError):
            await client.models()
    assert async_sleeps == [0.5]
    gateway.queue("/v1/models", *[httpx.ConnectError("refused")] * 4)
    async with make_async_client() as client:
        with pytest.raises(APIConnectionError, match="refused"):
            await client.models()


async def test_probes_and_wait_ready(make_async_client, gateway, async_sleeps):
    gateway.queue("/readyz", httpx.Response(503, json={"status": "starting"}))
    async with make_async_client() as client:
        assert (await client.health()).ok
        assert not (await client.ready()).ok
        gateway.queue("/readyz", httpx.Response(503, json={"status": "starting"}))
        assert (await client.wait_ready(timeout=30, interval=0.5)).ok
        assert (await client.models()).ids == [MODEL]
    assert async_sleeps == [0.5]


async def test_passkey(make_async_client, gateway, async_sleeps):
    gateway.queue("/healthz/passkey", error(429, "one at a time", "rate_limit_error", "rate_limit_exceeded",
                                            headers={"retry-after": "7"}))
    async with make_async_client() as client:
        hit = await client.passkey(2048, depth=0.1, seed=2)
        miss = await client.passkey(65536, depth=0.9)
    assert hit.passed and hit.expected_key == 1002 and hit.seed == 2
    assert not miss.passed and miss.rope_factor == 8.0
    assert async_sleeps == [7.0]


async def test_rate_limit_no_retry(gateway, async_sleeps):
    from ropeserve_client import RetryPolicy

    gateway.queue("/healthz/passkey", error(429, "one at a time", "rate_limit_error", None,
                                            headers={"retry-after": "7"}))
    async with AsyncClient(URL, retry=RetryPolicy.none(), sleep=async_sleeps,
                           transport=httpx.MockTransport(gateway)) as client:
        with pytest.raises(RateLimitError) as info:
            await client.passkey(1024)
    assert info.value.retry_after == 7.0 and async_sleeps == []


async def test_borrowed_http_client_is_left_open(gateway):
    http = httpx.AsyncClient(transport=httpx.MockTransport(gateway))
    async with AsyncClient(URL, http_client=http) as client:
        await client.models()
    assert not http.is_closed
    await http.aclose()
