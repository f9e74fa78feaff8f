"""End to end: ropeserve_client against the real gateway in front of a real vLLM engine (default model,
CPU). Marked ``engine``; the ``gateway_url`` fixture (tests/e2e/conftest.py) starts the
gateway once for the package. Every request here is short (a few hundred tokens at most, a 1k-token
passkey), so the module costs seconds of engine time, not minutes.

An API key, when the gateway requires one, is read from $ROPESERVE_API_KEY.
"""

from __future__ import annotations

import csv
import os

import pytest

from ropeserve_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ContextLengthExceededError,
    RetryPolicy,
    cli,
)

pytestmark = pytest.mark.engine

PROMPT = "The capital of France is"
GREEDY = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def api_key() -> str | None:
    return os.environ.get("ROPESERVE_API_KEY")


@pytest.fixture(scope="module")
def client(gateway_url: str, api_key: str | None):
    with Client(gateway_url, api_key=api_key, timeout=600, retry=RetryPolicy(max_retries=5, backoff=1.0)) as c:
        c.wait_ready(timeout=600)
        yield c


def test_probes(client):
    assert client.health().ok
    assert client.ready().ok


def test_models(client):
    models = client.models()
    assert models.ids, "the gateway lists no model"


def test_complete_short_prompt_is_unscaled(client):
    out = client.complete(PROMPT, **GREEDY)
    assert out.text.strip()
    assert out.rope_factor == 1.0  # at or below the original context: plain RoPE
    assert out.usage is not None and 0 < out.usage.completion_tokens <= GREEDY["max_tokens"]


def test_stream_equals_non_stream_under_greedy(client):
    whole = client.complete(PROMPT, **GREEDY)
    with client.complete_stream(PROMPT, **GREEDY) as stream:
        assert stream.rope_factor == whole.rope_factor
        streamed = "".join(chunk.text for chunk in stream)
    assert streamed == whole.text


def test_requested_rope_factor_is_reported(client):
    out = client.complete(PROMPT, rope_factor=2.0, **GREEDY)
    assert out.rope_factor == 2.0
    assert out.text.strip()


def test_chat_and_chat_stream(client):
    messages = [{"role": "user", "content": "Say hello."}]
    out = client.chat(messages, **GREEDY)
    assert out.content.strip() and out.rope_factor is not None
    with client.chat_stream(messages, **GREEDY) as stream:
        assert stream.rope_factor is not None
        assert "".join(chunk.content for chunk in stream) == out.content


def test_context_length_exceeded(client):
    with pytest.raises(ContextLengthExceededError) as info:
        client.complete(PROMPT, max_tokens=10_000_000)
    assert info.value.status_code == 400 and info.value.message


def test_wrong_api_key(gateway_url, api_key):
    if not api_key:
        pytest.skip("the gateway runs without API keys ($ROPESERVE_API_KEY unset)")
    with Client(gateway_url, api_key=api_key + "-wrong", retry=RetryPolicy.none()) as c:
        with pytest.raises(AuthenticationError) as info:
            c.models()
    assert info.value.status_code == 401 and info.value.message


def test_passkey_1k(client):
    result = client.passkey(1024, depth=0.5, seed=0)
    assert result.requested_tokens == 1024 and 0 < result.prompt_tokens <= 1024 + 64
    assert result.passed, result
    assert result.rope_factor == 1.0


@pytest.mark.anyio
async def test_async_client(gateway_url, api_key, anyio_backend):
    async with AsyncClient(gateway_url, api_key=api_key, timeout=600) as client:
        whole = await client.complete(PROMPT, **GREEDY)
        stream = await client.complete_stream(PROMPT, **GREEDY)
        assert "".join([chunk.text async for chunk in stream]) == whole.text
        assert (await client.ready()).ok


def test_cli_passkey_sweep(gateway_url, api_key, tmp_path, capsys):
    path = tmp_path / "passkey.csv"
    argv = ["--url", gateway_url, "passkey", "--lengths", "1024", "--depths", "0.5", "--csv", str(path), "--strict"]
    if api_key:
        argv[:0] = ["--api-key", api_key]
    assert cli.main(argv) == 0
    (row,) = list(csv.DictReader(path.open()))
    assert row["passed"] == "True" and row["length"] == "1024"
    assert "passed 1/1" in capsys.readouterr().out
