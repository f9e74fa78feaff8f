"""The blocking Client against the fake gateway: results and the x-rope-factor header, streaming,
retries (Retry-After honoured, backoff otherwise), errors reaching the user intact, probes, passkey."""

from __future__ import annotations

import json

import httpx
import pytest

from ropeserve_client import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ChatMessage,
    Client,
    ContextLengthExceededError,
    IncompleteStreamError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)

from .fake_gateway import MODEL, URL, Chunks, error, sse


def test_complete_text_header_and_body(client, gateway):
    out = client.complete("The capital of France is", max_tokens=5, temperature=0.0, rope_factor=2.0, seed=7)
    assert out.text == "Paris is the capital."
    assert out.rope_factor == 2.0
    assert out.usage.completion_tokens == 5
    (body,) = gateway.bodies("/v1/completions")
    assert body == {"model": MODEL, "stream": False, "max_tokens": 5, "temperature": 0.0, "rope_factor": 2.0,
                    "seed": 7, "prompt": "The capital of France is"}


def test_rope_factor_follows_the_header(client, gateway):
    gateway.queue("/v1/completions", httpx.Response(200, json={"choices": [{"text": "x"}]},
                                                    headers={"x-rope-factor": "4"}))
    assert client.complete("p", model="m").rope_factor == 4.0
    gateway.queue("/v1/completions", httpx.Response(200, json={"choices": [{"text": "x"}]}))
    assert client.complete("p", model="m").rope_factor is None
    gateway.queue("/v1/completions", httpx.Response(200, json={"choices": []}, headers={"x-rope-factor": "junk"}))
    out = client.complete("p", model="m")
    assert out.rope_factor is None and out.text == ""


def test_optional_fields_are_left_out(client, gateway):
    client.complete("p", model="m", max_tokens=None)
    (body,) = gateway.bodies("/v1/completions")
    assert body == {"model": "m", "stream": False, "prompt": "p"}


def test_default_model_is_fetched_once(client, gateway):
    client.complete("a")
    client.chat("b")
    assert gateway.paths() == ["/v1/models", "/v1/completions", "/v1/chat/completions"]
    assert gateway.bodies("/v1/chat/completions")[0]["model"] == MODEL


def test_explicit_model_skips_the_lookup(gateway, sleeps):
    with Client(URL, model="mine", transport=httpx.MockTransport(gateway)) as c:
        c.complete("a")
    assert gateway.paths() == ["/v1/completions"]
    assert gateway.bodies("/v1/completions")[0]["model"] == "mine"


def test_no_model_listed(client, gateway):
    gateway.queue("/v1/models", httpx.Response(200, json={"object": "list", "data": []}))
    with pytest.raises(Exception, match="lists no model"):
        client.complete("a")


def test_headers_auth_and_timeout(gateway):
    gateway.api_key = "sekret"
    with Client(URL, api_key="sekret", model="m", timeout=12.5, headers={"x-trace": "t1"},
                transport=httpx.MockTransport(gateway)) as c:
        c.complete("a")
    request = gateway.requests[-1]
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["x-trace"] == "t1"
    assert request.headers["user-agent"].startswith("ropeserve-client/")
    assert request.extensions["timeout"] == {"connect": 12.5, "read": 12.5, "write": 12.5, "pool": 12.5}


def test_wrong_key_is_an_authentication_error_with_the_server_message(client, gateway):
    gateway.api_key = "sekret"
    with pytest.raises(AuthenticationError) as info:
        client.complete("a", model="m")
    assert info.value.message == "Invalid API key: check ROPESERVE_API_KEYS"
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_context_length_exceeded_message_intact(client, gateway):
    gateway.max_model_len = 10
    with pytest.raises(ContextLengthExceededError) as info:
        client.complete("one two three four five six", model="m", max_tokens=5)
    assert str(info.value) == ("This model's maximum context length is 10 tokens. However, you requested 11 "
                               "tokens (6 in the messages, 5 in the completion).")
    assert len(gateway.requests) == 1  # a 400 is never retried


def test_chat_accepts_strings_dicts_and_models(client, gateway):
    out = client.chat("hi", model="m", max_tokens=2)
    assert out.content == "Paris is" and out.rope_factor == 1.0
    client.chat([{"role": "system", "content": "be brief"}, ChatMessage(role="user", content="hi")], model="m")
    first, second = gateway.bodies("/v1/chat/completions")
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert second["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_complete_stream(client, gateway):
    with client.complete_stream("The capital of France is", model="m", rope_factor=1.5) as stream:
        assert stream.rope_factor == 1.5  # known before the first chunk
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == "Paris is the capital."
    assert all(c.rope_factor == 1.5 for c in chunks)
    assert gateway.bodies("/v1/completions")[0]["stream"] is True


def test_chat_stream(client, gateway):
    stream = client.chat_stream("hi", model="m", max_tokens=3)
    assert [c.content for c in stream] == ["", "Paris", " is", " the"]
    assert stream.response.is_closed


@pytest.mark.parametrize("split", [1, 3, 7, 64])
def test_stream_lines_cut_across_chunks(client, gateway, split):
    events = [{"choices": [{"text": t}]} for t in ("a", "b\nc", "d")]
    gateway.queue("/v1/completions", sse(events, split=split, rope_factor=2.0))
    assert [c.text for c in client.complete_stream("p", model="m")] == ["a", "b\nc", "d"]


def test_stream_last_event_without_blank_line(client, gateway):
    body = b'data: {"choices": [{"text": "a"}]}\n\ndata: [DONE]'
    gateway.queue("/v1/completions", httpx.Response(200, stream=Chunks([body])))
    assert [c.text for c in client.complete_stream("p", model="m")] == ["a"]


def test_stream_error_event_raises_typed_error(client, gateway):
    gateway.queue("/v1/completions", sse([{"choices": [{"text": "a"}]},
                                          {"error": {"message": "engine died mid-stream", "type": "internal_error",
                                                     "code": 500}}], done=False))
    seen = []
    with pytest.raises(InternalServerError, match="engine died mid-stream"):
        for c in client.complete_stream("p", model="m"):
            seen.append(c.text)
    assert seen == ["a"]


def test_stream_without_done_is_incomplete(client, gateway):
    stream_body = Chunks([b'data: {"choices": [{"text": "a"}]}\n\n'])
    gateway.queue("/v1/completions", httpx.Response(200, stream=stream_body))
    with pytest.raises(IncompleteStreamError):
        list(client.complete_stream("p", model="m"))
    assert stream_body.closed


def test_stream_malformed_event(client, gateway):
    gateway.queue("/v1/completions", sse(["{not json"]))
    with pytest.raises(APIConnectionError, match="malformed event"):
        list(client.complete_stream("p", model="m"))


def test_stream_break_early_closes(client, gateway):
    stream = client.complete_stream("p", model="m")
    for _ in stream:
        break
    stream.close()
    assert stream.response.is_closed


def test_stream_error_status_before_any_chunk(client, gateway):
    gateway.queue("/v1/completions", error(400, "rope_factor must be >= 1", "invalid_request_error", "invalid_value"))
    with pytest.raises(BadRequestError, match="rope_factor must be >= 1"):
        client.complete_stream("p", model="m", rope_factor=0.5)


def test_stream_retried_on_503_before_it_starts(client, gateway, sleeps):
    gateway.queue("/v1/completions", error(503, "warming up", "service_unavailable", None, headers={"retry-after": "2"}))
    assert "".join(c.text for c in client.complete_stream("p", model="m")) == "Paris is the capital."
    assert sleeps == [2.0]


def test_retry_after_is_honoured(client, gateway, sleeps):
    gateway.queue("/v1/completions",
                  error(503, "no engine ready", "service_unavailable", None, headers={"retry-after": "3"}),
                  error(429, "busy", "rate_limit_error", None, headers={"retry-after": "1.5"}))
    assert client.complete("p", model="m").text == "Paris is the capital."
    assert sleeps == [3.0, 1.5]
    assert len(gateway.requests) == 3


def test_backoff_without_retry_after(client, gateway, sleeps):
    gateway.queue("/v1/completions", *[error(503, "down", "service_unavailable", None)] * 3)
    client.complete("p", model="m")
    assert sleeps == [0.5, 1.0, 2.0]


def test_retries_exhausted_raise_the_last_error(client, gateway, sleeps):
    gateway.queue("/v1/completions", *[error(429, f"busy {i}", "rate_limit_error", "rate_limit_exceeded",
                                             headers={"retry-after": "5"}) for i in range(4)])
    with pytest.raises(RateLimitError) as info:
        client.complete("p", model="m")
    assert info.value.message == "busy 3" and info.value.retry_after == 5.0
    assert len(gateway.requests) == 4 and sleeps == [5.0, 5.0, 5.0]


def test_no_retry_policy(gateway, sleeps):
    gateway.queue("/v1/completions", error(503, "down", "service_unavailable", None))
    with Client(URL, model="m", retry=RetryPolicy.none(), sleep=sleeps, transport=httpx.MockTransport(gateway)) as c:
        with pytest.raises(ServiceUnavailableError, match="down"):
            c.complete("p")
    assert sleeps == [] and len(gateway.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_other_errors_are_not_retried(client, gateway, sleeps, status):
    gateway.queue("/v1/completions", error(status, "nope", "x", None))
    with pytest.raises(Exception, match="nope"):
        client.complete("p", model="m")
    assert sleeps == [] and len(gateway.requests) == 1


def test_refused_connection_is_retried_then_raised(client, gateway, sleeps):
    gateway.queue("/v1/completions", httpx.ConnectError("refused"), httpx.ConnectError("refused"))
    assert client.complete("p", model="m").text
    assert sleeps == [0.5, 1.0]
    gateway.queue("/v1/completions", *[httpx.ConnectError("refused")] * 4)
    with pytest.raises(APIConnectionError, match="refused"):
        client.complete("p", model="m")


def test_read_timeout_is_not_retried(client, gateway, sleeps):
    gateway.queue("/v1/completions", httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError):
        client.complete("p", model="m")
    assert sleeps == []


def test_broken_connection(client, gateway):
    gateway.queue("/v1/models", httpx.RemoteProtocolError("peer closed"))
    with pytest.raises(APIConnectionError) as info:
        client.models()
    assert not isinstance(info.value, APITimeoutError)


def test_non_json_error_body(client, gateway):
    gateway.queue("/v1/completions", httpx.Response(502, text="upstream connect error"))
    with pytest.raises(InternalServerError, match="^upstream connect error$"):
        client.complete("p", model="m")


def test_models(client):
    models = client.models()
    assert models.ids == [MODEL] and models.data[0].max_model_len == 65536 and models.rope_factor == 1.0


def test_health_and_ready(client, gateway, sleeps):
    assert client.health().ok
    ready = client.ready()
    assert ready.ok and ready.detail == {"status": "ready", "engines": 1}
    gateway.ready = False
    not_ready = client.ready()
    assert not not_ready.ok and not_ready.status_code == 503 and not_ready.detail["status"] == "not ready"
    assert sleeps == []  # a probe reports the present, it does not wait


def test_wait_ready(client, gateway, sleeps):
    gateway.queue("/readyz", httpx.ConnectError("refused"), httpx.Response(503, json={"status": "starting"}))
    assert client.wait_ready(timeout=60, interval=0.25).ok
    assert sleeps[-2:] == [0.25, 0.25]


def test_wait_ready_times_out(client, gateway):
    gateway.ready = False
    with pytest.raises(APITimeoutError, match="not ready"):
        client.wait_ready(timeout=0.0)


def test_passkey_passed(client, gateway):
    r = client.passkey(4096, depth=0.25, seed=3)
    assert r.passed and r.expected_key == 1003 and r.requested_tokens == 4096 and r.seed == 3
    assert r.rope_factor == 1.0
    assert gateway.requests[-1].url.params == httpx.QueryParams({"len": "4096", "depth": "0.25", "seed": "3"})


def test_passkey_miss_is_a_result_not_an_error(client, gateway, sleeps):
    r = client.passkey(32768, depth=0.5)
    assert not r.passed and r.answer == " 42." and r.rope_factor == 4.0
    assert sleeps == [] and len(gateway.requests) == 1


def test_passkey_busy_is_retried_after_retry_after(client, gateway, sleeps):
    gateway.queue("/healthz/passkey", error(429, "a passkey check is already running", "rate_limit_error",
                                            "rate_limit_exceeded", headers={"retry-after": "4"}))
    assert client.passkey(1024).passed
    assert sleeps == [4.0]


def test_passkey_unavailable_is_retried_then_raised(client, gateway, sleeps):
    gateway.queue("/healthz/passkey", *[error(503, "no engine ready", "service_unavailable", None)] * 4)
    with pytest.raises(ServiceUnavailableError, match="no engine ready"):
        client.passkey(1024)
    assert len(sleeps) == 3


def test_passkey_rope_factor_header_fallback(client, gateway):
    body = {"passed": True, "requested_tokens": 10, "prompt_tokens": 9, "depth": 0.5, "expected_key": 1,
            "answer": "1", "latency_s": 0.1}
    gateway.queue("/healthz/passkey", httpx.Response(200, json=body, headers={"x-rope-factor": "2"}))
    assert client.passkey(10).rope_factor == 2.0


def test_client_owns_only_its_http_client(gateway):
    http = httpx.Client(transport=httpx.MockTransport(gateway))
    with Client(URL, http_client=http) as c:
        c.models()
    assert not http.is_closed
    http.close()
    c2 = Client(URL, transport=httpx.MockTransport(gateway))
    c2.close()
    assert c2._http.is_closed


def test_base_url_trailing_slash(gateway):
    with Client(URL + "/", transport=httpx.MockTransport(gateway)) as c:
        c.models()
    assert str(gateway.requests[-1].url) == URL + "/v1/models"
    assert json.loads(gateway.requests[-1].content or b"null") is None
