"""GET /healthz/passkey: validation, the run (200 passed / 503 not), one at a time (429), the short cache."""

from __future__ import annotations

import threading

import anyio
import pytest

from server.passkey import info_line
from tests.server.conftest import gateway
from tests.server.fake_engine import FakeEngine, toy_tokens

pytestmark = pytest.mark.anyio

FIELDS = {"passed", "requested_tokens", "prompt_tokens", "depth", "seed", "expected_key", "answer",
          "answer_key", "rope_factor", "latency_s", "cached"}


async def test_passkey_passes() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.get("/healthz/passkey", params={"len": 12000, "depth": 0.25, "seed": 5})
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) >= FIELDS
    assert result["passed"] is True and result["cached"] is False
    assert result["requested_tokens"] == 12000 and abs(result["prompt_tokens"] - 12000) <= 120
    assert result["depth"] == 0.25 and result["seed"] == 5
    assert result["answer_key"] == result["expected_key"] and str(result["expected_key"]) in result["answer"]
    assert result["rope_factor"] == 2.0 and response.headers["x-rope-factor"] == "2"
    assert result["latency_s"] >= 0
    path, body = engine.requests[0]
    assert path == "/v1/completions"
    assert body["max_tokens"] == 10 and body["temperature"] == 0.0  # greedy, the paper's 10 new tokens
    assert info_line(result["expected_key"]) in body["prompt"]
    assert len(toy_tokens(body["prompt"])) == result["prompt_tokens"]  # counted by the engine's tokenizer
    assert engine.factors == [2.0]


async def test_passkey_failure_is_503_with_the_result() -> None:
    engine = FakeEngine()
    engine.passkey_wrong = True
    async with gateway([engine]) as client:
        response = await client.get("/healthz/passkey", params={"len": 500})
    assert response.status_code == 503
    result = response.json()
    assert result["passed"] is False and result["answer_key"] == result["expected_key"] + 1
    assert result["error"]["code"] == "passkey_failed" and "expected" in result["error"]["message"]


@pytest.mark.parametrize("params,param,contains", [
    ({}, "len", "required"),
    ({"len": "abc"}, "len", "integer"),
    ({"len": "100.5"}, "len", "integer"),
    ({"len": 63}, "len", "[64, 65536]"),
    ({"len": 65537}, "len", "[64, 65536]"),
    ({"len": 1000, "depth": "deep"}, "depth", "[0, 1]"),
    ({"len": 1000, "depth": 1.5}, "depth", "[0, 1]"),
    ({"len": 1000, "depth": "nan"}, "depth", "[0, 1]"),
    ({"len": 1000, "seed": "x"}, "seed", "integer"),
])
async def test_bad_parameters_are_400(params, param, contains) -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.get("/healthz/passkey", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and contains in error["message"]
    assert engine.requests == [] and engine.tokenize_calls == 0


async def test_edges_of_the_length_range_run() -> None:
    """len is the whole context: a prompt of len - 10 tokens and the 10-token answer, so the served maximum
    context itself (the mission's len=65536) fits."""
    engine = FakeEngine()
    async with gateway([engine]) as client:
        low = await client.get("/healthz/passkey", params={"len": 64})
        high = await client.get("/healthz/passkey", params={"len": 65536})
    assert low.status_code == 200 and low.json()["prompt_tokens"] == 54
    assert high.status_code == 200 and high.json()["rope_factor"] == 8.0
    assert 65536 - 10 - 655 <= high.json()["prompt_tokens"] <= 65536 - 10  # never over, at most 1 % under
    assert engine.requests[-1][1]["max_tokens"] == 10


async def test_the_check_waits_past_the_request_timeout_and_reports_progress() -> None:
    """A check slower than request_timeout_s still answers; meanwhile /healthz/passkey/progress says how far
    the engine's computed-token counter has gone."""
    import anyio

    engine = FakeEngine(token_delay_s=0.3)  # 5 answer tokens: 1.5 s, past the 0.5 s request timeout
    async with gateway([engine], request_timeout_s=0.5) as client:
        async with anyio.create_task_group() as tasks:
            results = {}

            async def check() -> None:
                results["check"] = await client.get("/healthz/passkey", params={"len": 1000})

            tasks.start_soon(check)
            await anyio.sleep(0.2)
            results["progress"] = await client.get("/healthz/passkey/progress")
        after = await client.get("/healthz/passkey/progress")
    assert results["check"].status_code == 200 and results["check"].json()["passed"]
    running = results["progress"].json()
    assert running["running"] is True and running["len"] == 1000 and running["prompt_tokens"] == 990
    assert after.json()["running"] is False and after.json()["last_duration_s"] > 1


async def test_a_tokenizer_that_cannot_fit_the_prompt_gives_a_clear_400() -> None:
    engine = FakeEngine()
    async with gateway([engine], rope_original_max_position=8192) as client:
        app = client.app
        real = app.state.generation.count_text

        async def wordy(text: str, **kwargs) -> int:  # noqa: ANN003  (a tokenizer with 2 tokens per word)
            return 2 * await real(text, **kwargs)

        app.state.generation.count_text = wordy
        response = await client.get("/healthz/passkey", params={"len": 70})
    assert response.status_code == 400
    assert "needs at least" in response.json()["error"]["message"]


async def test_one_run_at_a_time() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    async with gateway([engine]) as client:
        async with anyio.create_task_group() as group:
            results = {}

            async def first() -> None:
                results["first"] = await client.get("/healthz/passkey", params={"len": 300})

            group.start_soon(first)
            with anyio.fail_after(5):
                while engine.in_flight == 0:  # the first run is generating
                    await anyio.sleep(0.005)
            busy = await client.get("/healthz/passkey", params={"len": 400})
            engine.gate.set()
        after = await client.get("/healthz/passkey", params={"len": 400})
    assert busy.status_code == 429
    assert int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"]["code"] == "passkey_check_running"
    assert results["first"].status_code == 200 and after.status_code == 200


async def test_recent_identical_result_is_cached() -> None:
    engine = FakeEngine()
    async with gateway([engine], passkey_cache_ttl_s=60) as client:
        first = (await client.get("/healthz/passkey", params={"len": 300, "seed": 1})).json()
        again = (await client.get("/healthz/passkey", params={"len": 300, "seed": 1})).json()
        other_seed = (await client.get("/healthz/passkey", params={"len": 300, "seed": 2})).json()
        other_depth = (await client.get("/healthz/passkey", params={"len": 300, "seed": 1, "depth": 0.5})).json()
    assert first["cached"] is False and again["cached"] is True and "cache_age_s" in again
    assert {k: v for k, v in again.items() if k not in ("cached", "cache_age_s")} == {
        k: v for k, v in first.items() if k != "cached"}
    assert other_seed["cached"] is False and other_depth["cached"] is False
    assert len(engine.requests) == 3


async def test_cache_expires_and_can_be_disabled() -> None:
    engine = FakeEngine()
    async with gateway([engine], passkey_cache_ttl_s=10) as client:
        checker = client.app.state.passkey
        now = [1000.0]
        checker.clock = lambda: now[0]
        await client.get("/healthz/passkey", params={"len": 300})
        now[0] += 9
        assert (await client.get("/healthz/passkey", params={"len": 300})).json()["cached"] is True
        now[0] += 2
        assert (await client.get("/healthz/passkey", params={"len": 300})).json()["cached"] is False
    async with gateway([engine], passkey_cache_ttl_s=0) as client:
        for _ in range(2):
            assert (await client.get("/healthz/passkey", params={"len": 300})).json()["cached"] is False


async def test_no_engine_is_503_in_the_envelope() -> None:
    engine = FakeEngine()
    engine.down = True
    async with gateway([engine]) as client:
        response = await client.get("/healthz/passkey", params={"len": 300})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 503 and response.json()["error"]["code"] == "no_engine_available"
    assert 'ropeserve_passkey_runs_total{result="error"} 1.0' in metrics
