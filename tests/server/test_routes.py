"""The OpenAI routes through the real app and an in-process fake engine: pass-through, the RoPE factor
(gateway and engine agree, header set), the context check, validation and error mapping."""

from __future__ import annotations

import json

import pytest

from rope_ext import RopeScaling, choose_factor
from server.app import create_app
from server.settings import GatewaySettings
from tests.server.conftest import gateway
from tests.server.fake_engine import MODEL, FakeEngine

pytestmark = pytest.mark.anyio

SCALING = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0)  # growth: recompute
R2 = 2 ** 0.5  # the default buckets: 1, 1.41, 2, 2.83, 4, 5.66, 8


def words(n: int) -> str:
    return " ".join(["word"] * n)


def assert_envelope(response, status: int, *, code=None, param=None, contains: str = "") -> dict:  # noqa: ANN001
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and contains in error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("prompt_tokens,max_tokens", [(10, 5), (7000, 1000), (8000, None), (12000, 100),
                                                      (20000, 10), (40000, 100), (65000, 500)])
async def test_completion_factor_follows_the_policy_and_engine_agrees(prompt_tokens, max_tokens) -> None:
    engine = FakeEngine()
    body = {"model": MODEL, "prompt": words(prompt_tokens)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    expected = choose_factor(prompt_tokens, max_tokens, SCALING)
    assert float(response.headers["x-rope-factor"]) == expected
    assert engine.factors == [expected]  # the engine ran at the factor the header reports
    assert "vllm_xargs" not in engine.requests[0][1]  # no override: the engine decides, by the same policy


async def test_every_field_passes_through_and_ours_are_stripped() -> None:
    engine = FakeEngine()
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 3, "n": 2, "stop": ["\n", "END"],
            "logprobs": 2, "echo": True, "seed": 42, "temperature": 0.3, "top_k": 5,
            "repetition_penalty": 1.1, "some_future_field": {"x": [1, 2]}, "rope_factor": 2,
            "vllm_xargs": {"session_id": "abc"}}
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    sent = engine.requests[0][1]
    expected = {k: v for k, v in body.items() if k != "rope_factor"}
    expected["vllm_xargs"] = {"session_id": "abc", "rope_factor": 2.0}
    assert sent == expected
    assert len(response.json()["choices"]) == 2  # the engine's answer, unchanged


async def test_chat_counts_tokens_with_the_chat_template() -> None:
    engine = FakeEngine()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": words(9000)}]
    async with gateway([engine]) as client:
        response = await client.post("/v1/chat/completions",
                                      json={"messages": messages, "max_completion_tokens": 50, "seed": 1,
                                            "max_tokens": 9999})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert response.headers["x-rope-factor"] == "1.4142135623730951"  # exact: a client may send it back
    sent = engine.requests[0][1]
    assert sent["model"] == MODEL and sent["seed"] == 1 and sent["messages"] == messages
    assert engine.factors == [R2]


async def test_chat_template_options_reach_tokenize() -> None:
    engine = FakeEngine()
    # the toy template adds 2 tokens around a message and 1 for the generation prompt: without it, the
    # prompt and its 50 new tokens are exactly L = 8192 tokens (factor 1); with it, one more (factor 1.41)
    content = words(8192 - 2 - 50)
    async with gateway([engine]) as client:
        plain = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 50})
        no_prompt = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 50,
            "add_generation_prompt": False})
    assert float(plain.headers["x-rope-factor"]) == R2 and no_prompt.headers["x-rope-factor"] == "1"


async def test_token_id_and_batch_prompts() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        ids = await client.post("/v1/completions", json={"prompt": list(range(9000)), "max_tokens": 1})
        batch = await client.post("/v1/completions", json={"prompt": ["short", words(17000)], "max_tokens": 1})
        mixed = await client.post("/v1/completions", json={"prompt": [[1, 2, 3], list(range(5))], "max_tokens": 1})
    assert float(ids.headers["x-rope-factor"]) == R2
    assert float(batch.headers["x-rope-factor"]) == 2 * R2  # one factor for the batch: the longest prompt's
    assert mixed.headers["x-rope-factor"] == "1"
    assert engine.requests[0][1]["prompt"] == list(range(9000))


async def test_rope_factor_override_and_method() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        up = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "rope_factor": 3})
        xargs = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                            "vllm_xargs": {"rope_factor": 8}})
        plain = await client.post("/v1/completions", json={"prompt": words(8000), "max_tokens": 1,
                                                            "rope_method": "default"})
        served = await client.post("/v1/completions", json={"prompt": words(9000), "max_tokens": 1,
                                                             "rope_method": "dynamic_yarn"})
    assert [float(r.headers["x-rope-factor"]) for r in (up, xargs, plain, served)] == [4.0, 8.0, 1.0, R2]
    assert engine.factors == [4.0, 8.0, 1.0, R2]
    assert all("rope_method" not in body and "rope_factor" not in body for _, body in engine.requests)


@pytest.mark.parametrize("extra,param,contains", [
    ({"rope_factor": 9}, "rope_factor", "[1, 8.0]"),
    ({"rope_factor": 0.5}, "rope_factor", "greater than or equal to 1"),
    ({"rope_factor": "2"}, "rope_factor", ""),
    ({"rope_factor": True}, "rope_factor", ""),
    ({"vllm_xargs": {"rope_factor": "big"}}, "rope_factor", "must be a number"),
    ({"rope_factor": 2, "vllm_xargs": {"rope_factor": 4}}, "rope_factor", "disagree"),
    ({"rope_method": "nonsense"}, "rope_method", "known methods"),
    ({"rope_method": "yarn"}, "rope_method", "not served"),
    ({"rope_method": "default", "rope_factor": 2}, "rope_method", "means factor 1"),
])
async def test_bad_rope_requests_are_400_before_any_engine(extra, param, contains) -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, **extra})
    assert_envelope(response, 400, param=param, contains=contains)
    assert engine.requests == []


async def test_context_length_exceeded_never_reaches_an_engine() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        long_prompt = await client.post("/v1/completions", json={"prompt": words(65537)})
        with_budget = await client.post("/v1/completions", json={"prompt": words(65000), "max_tokens": 537})
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                              "content": words(65600)}]})
        fits = await client.post("/v1/completions", json={"prompt": words(65000), "max_tokens": 536})
    assert_envelope(long_prompt, 400, code="context_length_exceeded", param="prompt", contains="65537")
    assert_envelope(with_budget, 400, code="context_length_exceeded", param="max_tokens", contains="65537")
    assert_envelope(chat, 400, code="context_length_exceeded", param="messages")
    assert fits.status_code == 200 and fits.headers["x-rope-factor"] == "8"
    assert len(engine.requests) == 1


async def test_a_pinned_request_past_its_bucket_never_reaches_an_engine() -> None:
    """Issue 21: rope_factor 1 (or plain RoPE) holds L = 8192 tokens; 7900 + 600 would compute 308 past it."""
    engine = FakeEngine()
    over = {"prompt": words(7900), "max_tokens": 600}
    async with gateway([engine]) as client:
        pinned = await client.post("/v1/completions", json={**over, "rope_factor": 1})
        xargs = await client.post("/v1/completions", json={**over, "vllm_xargs": {"rope_factor": 1}})
        plain = await client.post("/v1/completions", json={**over, "rope_method": "default"})
        chat = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": words(8200)}], "rope_factor": 1})
        fits = await client.post("/v1/completions", json={**over, "max_tokens": 292, "rope_factor": 1})
        grows = await client.post("/v1/completions", json=over)
    for response in (pinned, xargs, plain):
        error = assert_envelope(response, 400, code="context_length_exceeded", param="max_tokens")
        assert error["message"] == (
            "This request's rope_factor 1 holds at most 8192 tokens; the prompt (7900 tokens) plus max_tokens "
            "(600) is 8500. Reduce the length of the prompt or max_tokens, or ask for a larger rope_factor or "
            "none.")
    assert_envelope(chat, 400, code="context_length_exceeded", param="messages", contains="holds at most 8192")
    assert fits.status_code == 200 and grows.status_code == 200  # unpinned, it grows past L instead
    assert len(engine.requests) == 2


async def test_a_pinned_request_without_max_tokens_stops_at_its_bucket() -> None:
    """The engine caps its max_tokens at capacity - prompt (the fake, as the plugin, by the policy's own
    call): it finishes with reason length, 8192 tokens in all, at factor 1 from start to end."""
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json={"prompt": words(8185), "rope_factor": 1})
        chat = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": words(8180)}], "rope_method": "default"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 8185, "completion_tokens": 7, "total_tokens": 8192}
    assert (response.headers["x-rope-factor"], response.headers["x-rope-factor-final"]) == ("1", "1")
    assert "max_tokens" not in engine.requests[0][1]  # sent as the client sent it: the engine caps it
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["finish_reason"] == "length" and chat.json()["usage"]["total_tokens"] == 8192


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "perhaps"}, "stream"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"prompt": "x"}, "messages"),
])
async def test_validation_errors_are_400_in_the_envelope(path, body, param) -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post(path, json=body)
    error = assert_envelope(response, 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert engine.requests == []


async def test_malformed_json_and_non_object_bodies() -> None:
    async with gateway([FakeEngine()]) as client:
        broken = await client.post("/v1/completions", content=b'{"prompt": ',
                                   headers={"content-type": "application/json"})
        array = await client.post("/v1/completions", json=[1, 2])
    assert_envelope(broken, 400, contains="JSON")
    assert_envelope(array, 400)


async def test_unknown_route_and_wrong_method_are_enveloped() -> None:
    async with gateway([FakeEngine()]) as client:
        missing = await client.get("/v1/nothing")
        wrong = await client.get("/v1/completions")
    assert_envelope(missing, 404, code="not_found")
    error = assert_envelope(wrong, 405, code="method_not_allowed")
    assert error["type"] == "invalid_request_error"
    assert "POST" in wrong.headers["allow"]


async def test_unknown_model_is_404() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json={"model": "gpt-5", "prompt": "hi"})
    assert_envelope(response, 404, code="model_not_found", param="model", contains="gpt-5")
    assert engine.tokenize_calls == 0


@pytest.mark.parametrize("status", [400, 422, 500, 503])
async def test_engine_errors_keep_their_status_and_message(status: int) -> None:
    engine = FakeEngine()
    engine.fail_with = (status, f"engine says no ({status})")
    async with gateway([engine]) as client:
        response = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        streamed = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True})
    for r in (response, streamed):
        error = assert_envelope(r, status, contains=f"engine says no ({status})")
        assert error["code"] == status  # vLLM's own code field, kept


async def test_no_engine_reachable_is_503() -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        engine.down = True
        refused = await client.post("/v1/completions", json={"prompt": "hi"})
        again = await client.post("/v1/completions", json={"prompt": "hi"})
        ready = await client.get("/readyz")
    assert_envelope(refused, 503, code="no_engine_available", contains="no engine reachable")
    assert_envelope(again, 503, code="no_engine_available", contains="no engine is ready")
    body = ready.json()
    assert ready.status_code == 503 and body["error"]["code"] == "no_engine_available"
    assert body["engines"][0]["state"] == "unhealthy"


async def test_models_health_and_ready() -> None:
    async with gateway([FakeEngine()]) as client:
        models = await client.get("/v1/models")
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
    card = models.json()["data"][0]
    assert models.json()["object"] == "list"
    assert card["id"] == MODEL and card["max_model_len"] == 65536
    assert card["original_max_position"] == 8192 and card["max_context"] == 65536
    assert card["rope"]["method"] == "dynamic_yarn" and card["rope"]["buckets"] == list(SCALING.buckets)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json()["engines"][0]["healthy"] is True


async def test_healthz_answers_even_without_any_engine() -> None:
    engine = FakeEngine()
    engine.down = True
    async with gateway([engine]) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503


async def test_requests_spread_over_engines() -> None:
    engines = [FakeEngine(), FakeEngine()]
    async with gateway(engines) as client:
        for _ in range(6):
            assert (await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})).status_code == 200
    assert [len(e.requests) for e in engines] == [3, 3]


async def test_custom_rope_settings_flow_to_the_policy() -> None:
    engine = FakeEngine(scaling=RopeScaling(method="dynamic_yarn", original_max_position=4096, max_factor=4.0,
                                            buckets=(1.0, 1.5, 4.0)))
    async with gateway([engine], rope_original_max_position=4096, rope_max_factor=4.0,
                       rope_buckets=[1, 1.5, 4]) as client:
        response = await client.post("/v1/completions", json={"prompt": words(5000), "max_tokens": 10})
        models = await client.get("/v1/models")
    assert response.headers["x-rope-factor"] == "1.5" and engine.factors == [1.5]
    assert models.json()["data"][0]["max_model_len"] == 16384


@pytest.mark.parametrize(("growth", "factor"), [("reserve", "1.5"), ("rerotate", "1")])
async def test_growth_chooses_the_factor_of_the_prompt_alone(growth: str, factor: str) -> None:
    """3000 prompt tokens + 2000 to generate: reserved up front they need 1.5; grown, the prompt fits 1."""
    scaling = RopeScaling(method="dynamic_yarn", original_max_position=4096, max_factor=4.0, buckets=(1.0, 1.5, 4.0),
                          growth=growth)
    engine = FakeEngine(scaling=scaling)
    async with gateway([engine], rope_original_max_position=4096, rope_max_factor=4.0, rope_buckets=[1, 1.5, 4],
                       rope_growth=growth) as client:
        response = await client.post("/v1/completions", json={"prompt": words(3000), "max_tokens": 2000})
    assert response.status_code == 200 and response.headers["x-rope-factor"] == factor
    assert engine.factors == [float(factor)]


def test_create_app_needs_engines() -> None:
    with pytest.raises(ValueError, match="ropeserve serve"):
        create_app(GatewaySettings())


def test_app_state_is_per_app() -> None:
    from tests.server.conftest import settings_for

    first = create_app(settings_for(["http://a.test"]))
    second = create_app(settings_for(["http://a.test"]))
    assert first is not second and first.user_middleware is not second.user_middleware
    assert json.dumps(sorted(r.path for r in first.routes if hasattr(r, "path")))  # routes are built


async def test_stream_is_closed_when_the_client_is_gone_before_the_first_chunk() -> None:
    import anyio

    engine = FakeEngine()
    async with gateway([engine]) as client:
        app = client.app
        body = json.dumps({"prompt": "hi", "stream": True}).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("gateway.test", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await anyio.sleep_forever()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                raise OSError("the client is gone")

        with pytest.raises(Exception):  # noqa: B017, PT011  (whatever the server stack makes of it)
            await app(scope, receive, send)
        assert engine.requests  # the engine had started the stream
        assert app.state.pool.engines[0].in_flight == 0


GROWING = RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0, growth="recompute")


async def test_a_request_that_grows_reports_where_it_started_and_ended() -> None:
    """7680 prompt tokens (they and the 512-token look-ahead fill L): it starts at 1; 520 generated, it
    computes 8199 tokens and crosses L at its 514th."""
    engine = FakeEngine(scaling=GROWING)
    async with gateway([engine], rope_growth="recompute") as client:
        grown = await client.post("/v1/completions", json={"prompt": words(7680), "max_tokens": 520})
        short = await client.post("/v1/completions", json={"prompt": words(100), "max_tokens": 10})
        pinned = await client.post("/v1/completions", json={"prompt": words(7680), "max_tokens": 512,
                                                            "rope_factor": 1})
        metrics = (await client.get("/metrics")).text
    assert (grown.headers["x-rope-factor"], grown.headers["x-rope-factor-final"]) == ("1", repr(R2))
    assert (short.headers["x-rope-factor"], short.headers["x-rope-factor-final"]) == ("1", "1")
    assert (pinned.headers["x-rope-factor"], pinned.headers["x-rope-factor-final"]) == ("1", "1")  # pinned
    assert engine.requests[2][1]["vllm_xargs"] == {"rope_factor": 1}  # the client's override, forwarded
    assert 'ropeserve_rope_factor_final_bucket{le="1.4142135623730951"} 3.0' in metrics
    assert 'ropeserve_rope_factor_final_bucket{le="1.0"} 2.0' in metrics


async def test_a_stream_reports_the_final_factor_in_its_usage_chunk() -> None:
    engine = FakeEngine(scaling=GROWING)
    body = {"prompt": words(7680), "max_tokens": 520, "stream": True, "stream_options": {"include_usage": True}}
    async with gateway([engine], rope_growth="recompute") as client:
        response = await client.post("/v1/completions", json=body)
        plain = await client.post("/v1/completions", json={**body, "stream_options": None})
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert response.headers["x-rope-factor"] == "1"
    assert [e.get("rope_factor") for e in events] == [None] * 520 + [{"start": 1.0, "final": R2}]
    assert events[-1]["usage"]["completion_tokens"] == 520 and events[-1]["choices"] == []
    assert "rope_factor" not in plain.text  # no usage asked for: the start factor (header) only


def test_the_usage_line_is_rewritten_whatever_the_chunk_boundaries() -> None:
    from server.generation import UsageScanner

    stream = (b'data: {"choices":[{"text":" a"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":3,'
              b'"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    for cut in range(1, len(stream)):
        scanner = UsageScanner(lambda usage: {"final": usage["completion_tokens"]})
        out = scanner.feed(stream[:cut]) + scanner.feed(stream[cut:]) + scanner.flush()
        assert out == stream.replace(b'"completion_tokens":2}}', b'"completion_tokens":2},"rope_factor":'
                                     b'{"final":2}}'), cut
        assert scanner.completion_tokens == 2
