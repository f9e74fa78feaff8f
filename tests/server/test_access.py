"""Access: API keys (bearer, constant-time, never logged), the body-size limit, and CORS."""

from __future__ import annotations

import logging

import pytest

from server.middleware import bearer_token, key_matches
from tests.server.conftest import gateway
from tests.server.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

KEYS = "sk-first-0123456789,sk-second-abcdef"


@pytest.mark.parametrize("path,method", [("/v1/completions", "POST"), ("/v1/chat/completions", "POST"),
                                         ("/v1/models", "GET"), ("/metrics", "GET"),
                                         ("/healthz/passkey?len=100", "GET"), ("/no/such/route", "GET")])
async def test_every_route_but_health_needs_a_key(path: str, method: str) -> None:
    async with gateway([FakeEngine()], api_keys=KEYS) as client:
        missing = await client.request(method, path, json={})
        wrong = await client.request(method, path, json={}, headers={"Authorization": "Bearer sk-nope"})
        basic = await client.request(method, path, json={}, headers={"Authorization": "Basic sk-first-0123456789"})
    for response in (missing, wrong, basic):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


async def test_valid_keys_are_accepted_and_health_is_public() -> None:
    engine = FakeEngine()
    async with gateway([engine], api_keys=KEYS) as client:
        for key in KEYS.split(","):
            response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                                         headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/metrics", headers={"authorization": "bearer sk-second-abcdef"})).status_code == 200


async def test_no_keys_means_open() -> None:
    async with gateway([FakeEngine()]) as client:
        assert (await client.get("/v1/models")).status_code == 200


async def test_keys_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    engine = FakeEngine()
    async with gateway([engine], api_keys=KEYS) as client:
        logging.getLogger("test").info("settings: %r", client.app.state.settings)
        await client.post("/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer sk-bad"})
        await client.post("/v1/completions", json={"prompt": "hi"},
                          headers={"Authorization": "Bearer sk-first-0123456789"})
    assert caplog.records  # something was logged
    for secret in KEYS.split(","):
        assert secret not in caplog.text
    assert "**********" in caplog.text


def test_key_comparison() -> None:
    keys = [b"alpha", b"beta"]
    assert key_matches(b"beta", keys)
    assert not key_matches(b"bet", keys) and not key_matches(b"betaa", keys) and not key_matches(None, keys)
    assert bearer_token([(b"authorization", b"Bearer  tok ")]) == b"tok"
    assert bearer_token([(b"authorization", b"Token tok")]) is None
    assert bearer_token([(b"authorization", b"Bearer ")]) is None
    assert bearer_token([]) is None


def test_keys_are_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    import server.middleware as middleware

    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    assert key_matches(b"alpha", [b"alpha", b"beta"])
    assert len(calls) == 2  # every key compared, no early exit


async def test_body_limit() -> None:
    engine = FakeEngine()
    async with gateway([engine], max_body_bytes=1000) as client:
        small = await client.post("/v1/completions", json={"prompt": "x" * 100, "max_tokens": 1})
        large = await client.post("/v1/completions", json={"prompt": "x" * 2000})

        async def chunks():
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        streamed = await client.post("/v1/completions", content=chunks(),
                                     headers={"content-type": "application/json"})
    assert small.status_code == 200
    for response in (large, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert "1000 bytes" in response.json()["error"]["message"]
    assert len(engine.requests) == 1


async def test_cors_is_off_by_default() -> None:
    async with gateway([FakeEngine()]) as client:
        response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        preflight = await client.options("/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_when_configured() -> None:
    async with gateway([FakeEngine()], cors_allow_origins="https://app.example", api_keys=KEYS) as client:
        preflight = await client.options("/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        other = await client.options("/v1/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        actual = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={
            "Origin": "https://app.example", "Authorization": "Bearer sk-first-0123456789"})
    assert preflight.status_code == 200  # preflights carry no key and are answered by CORS
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert actual.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-rope-factor" in actual.headers["access-control-expose-headers"]
