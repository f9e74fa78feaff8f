"""Bad input, case by case: each named case of the reliability issue with its status, error code, param and
message, all in OpenAI's envelope, and none reaching an engine (not even its tokenizer).

Cases already pinned by the gateway tests are not repeated here: a prompt or prompt + max_tokens over the
context, max_tokens -1, rope_factor 0.5 / 9 / "2" / true, an unknown rope_method, an unknown model on
/v1/completions, missing prompt/messages (tests/server/test_routes.py); passkey len "abc", 100.5, 63, 65521
(test_passkey_route.py); the body limit and missing, wrong or non-Bearer keys (test_access.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.server.conftest import gateway
from tests.server.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 1, **fields}).encode()


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


# (id, path, raw body, status, code, param, words in the message)
CASES = [
    # malformed JSON: a 400 that says where, never a param made of the character offset
    ("truncated-json", C, b'{"prompt": "hi", ', 400, "invalid_json", None, "not valid JSON"),
    ("not-json", C, b"prompt=hi", 400, "invalid_json", None, "Expecting value (at character 0)"),
    ("trailing-garbage", C, b'{"prompt": "hi"} x', 400, "invalid_json", None, "Extra data"),
    ("nested-too-deep", C, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json", None, "nested too deeply"),
    # wrong types: strict, as OpenAI's API reads them (no "10" or true for an integer)
    ("max_tokens-string", C, body(max_tokens="10"), 400, "invalid_value", "max_tokens", "valid integer"),
    ("max_tokens-bool", C, body(max_tokens=True), 400, "invalid_value", "max_tokens", "valid integer"),
    ("max_tokens-float", C, body(max_tokens=1.5), 400, "invalid_value", "max_tokens", "valid integer"),
    ("n-float", C, body(n=1.5), 400, "invalid_value", "n", "valid integer"),
    ("temperature-string", C, body(temperature="hot"), 400, "invalid_value", "temperature", "valid number"),
    ("top_p-bool", C, body(top_p=True), 400, "invalid_value", "top_p", "valid number"),
    ("prompt-object", C, body(prompt={"text": "hi"}), 400, "invalid_value", "prompt", ""),
    ("token-id-negative", C, body(prompt=[5, -1]), 400, "invalid_value", "prompt", "greater than or equal to 0"),
    ("token-id-bool", C, body(prompt=[True]), 400, "invalid_value", "prompt", ""),
    ("model-number", C, body(model=5), 400, "invalid_value", "model", "valid string"),
    ("xargs-list", C, body(vllm_xargs=[1]), 400, "invalid_value", "vllm_xargs", "valid dictionary"),
    ("messages-not-objects", CHAT, chat(messages=[1, 2]), 400, "invalid_value", "messages[0]", "object with a role"),
    ("message-bad-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "x"}]}]), 400, "invalid_value",
     "messages[0].content[0]", "does not match any of the expected tags"),
    # missing fields / no object at all
    ("empty-body", C, b"", 400, "invalid_value", None, "Field required"),
    ("null-body", C, b"null", 400, "invalid_value", None, "Field required"),
    ("string-body", C, b'"hi"', 400, "invalid_value", None, "valid dictionary"),
    # unknown model on chat (completions: test_routes.py)
    ("chat-unknown-model", CHAT, chat(model="gpt-5"), 404, "model_not_found", "model", "gpt-5"),
    # empty prompt
    ("prompt-empty-string", C, body(prompt=""), 400, "invalid_value", "prompt", "must not be empty"),
    ("prompt-empty-in-batch", C, body(prompt=["hi", ""]), 400, "invalid_value", "prompt", "must not be empty"),
    ("prompt-empty-ids-in-batch", C, body(prompt=[[1], []]), 400, "invalid_value", "prompt", "empty list"),
    # max_tokens: zero (allowed only with echo), negative on chat, huge
    ("max_tokens-zero", C, body(max_tokens=0), 400, "invalid_value", None, "at least 1"),
    ("chat-max_tokens-zero", CHAT, chat(max_tokens=0), 400, "invalid_value", "max_tokens", "greater than or equal to 1"),
    ("chat-max_completion_tokens-negative", CHAT, chat(max_completion_tokens=-5), 400, "invalid_value",
     "max_completion_tokens", "greater than or equal to 1"),
    ("max_tokens-huge", C, body(max_tokens=10**30), 400, "context_length_exceeded", "max_tokens",
     "maximum context length is 65536"),
    ("chat-max_tokens-huge", CHAT, chat(max_completion_tokens=2**63), 400, "context_length_exceeded",
     "max_tokens", "maximum context length is 65536"),
    # n
    ("n-huge", C, body(n=10**8), 400, "invalid_value", "n", "less than or equal to 128"),
    ("n-zero", CHAT, chat(n=0), 400, "invalid_value", "n", "greater than or equal to 1"),
    # temperature and top_p, with vLLM's bounds
    ("temperature-negative", C, body(temperature=-0.1), 400, "invalid_value", "temperature", "greater than or equal to 0"),
    ("temperature-above-2", CHAT, chat(temperature=2.5), 400, "invalid_value", "temperature", "less than or equal to 2"),
    ("temperature-nan", C, b'{"prompt": "hi", "temperature": NaN}', 400, "invalid_value", "temperature", "finite"),
    ("top_p-zero", C, body(top_p=0), 400, "invalid_value", "top_p", "greater than 0"),
    ("top_p-above-1", CHAT, chat(top_p=1.01), 400, "invalid_value", "top_p", "less than or equal to 1"),
    # rope override: NaN and infinities (below 1, above the maximum, unknown method: test_routes.py)
    ("rope_factor-nan", C, b'{"prompt": "hi", "rope_factor": NaN}', 400, "invalid_value", "rope_factor", "finite"),
    ("rope_factor-infinity", C, b'{"prompt": "hi", "rope_factor": Infinity}', 400, "invalid_value",
     "rope_factor", "finite"),
    ("rope_factor-1e308", C, body(rope_factor=1e308), 400, "invalid_rope_setting", "rope_factor", "[1, 8.0]"),
    ("xargs-rope_factor-nan", C, b'{"prompt": "hi", "vllm_xargs": {"rope_factor": NaN}}', 400, "invalid_value",
     None, "vllm_xargs.rope_factor holds nan"),
    ("rope_method-number", CHAT, chat(rope_method=2), 400, "invalid_value", "rope_method", "valid string"),
    # NaN anywhere: Python's parser takes it, the forwarded JSON cannot carry it (a 500 before the fix)
    ("nan-in-a-passed-through-field", C, b'{"prompt": "hi", "presence_penalty": -Infinity}', 400, "invalid_value",
     None, "presence_penalty holds -inf"),
    # invalid UTF-8, control characters, lone surrogates (a 500 before the fix)
    ("invalid-utf8", C, b'{"prompt": "caf\xe9"}', 400, "invalid_json", None, "not valid UTF-8"),
    ("raw-control-character", C, b'{"prompt": "a\x01b"}', 400, "invalid_json", None, "Invalid control character"),
    ("raw-newline-in-string", CHAT, b'{"messages": [{"role": "user", "content": "a\nb"}]}', 400, "invalid_json",
     None, "Invalid control character"),
    ("lone-surrogate-prompt", C, b'{"prompt": "a\\ud800b"}', 400, "invalid_value", None, "lone surrogate"),
    ("lone-surrogate-message", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "invalid_value", None, "messages.0.content holds a lone surrogate"),
    ("lone-surrogate-key", C, b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}', 400, "invalid_value", None,
     "lone surrogate"),
]


@pytest.mark.parametrize("path,raw,status,code,param,contains", [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
async def test_bad_request_is_refused_before_any_engine(path: str, raw: bytes, status: int, code: str,
                                                        param: str | None, contains: str) -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert contains in error["message"], error["message"]
    assert engine.requests == []
    if status != 400 or code != "context_length_exceeded":
        assert engine.tokenize_calls == 0  # refused by the schema, before the engine's tokenizer


async def test_what_is_valid_still_passes() -> None:
    """The edges the checks above must not catch: echo with max_tokens 0, the bounds themselves, an escaped
    control character (valid JSON and valid Unicode), a token id 0, ints where floats are expected."""
    engine = FakeEngine()
    async with gateway([engine]) as client:
        for raw in (body(max_tokens=0, echo=True), body(n=128, temperature=2, top_p=1),
                    body(temperature=0, top_p=1e-9), body(prompt="a\u0000b\u001f\u00e9\U0001f600"),
                    body(prompt=[0, 1]), chat(max_completion_tokens=1, n=1, temperature=1)):
            path = CHAT if b'"messages"' in raw else C
            response = await client.post(path, content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 200, (raw, response.text)
    assert engine.requests[3][1]["prompt"] == "a\u0000b\u001f\u00e9\U0001f600"  # forwarded unchanged


@pytest.mark.parametrize("length,contains", [("0", "[64, 65536]"), ("-5", "[64, 65536]"),
                                             ("1e3", "integer"), ("9" * 5000, "integer"), ("", "integer")])
async def test_passkey_len_out_of_range_or_not_an_integer(length: str, contains: str) -> None:
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.get("/healthz/passkey", params={"len": length})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "len" and contains in error["message"] and error["code"] is None
    assert engine.tokenize_calls == 0


@pytest.mark.parametrize("headers,query", [
    ({"Authorization": "Bearer SK-FIRST-0123456789"}, ""),               # keys are case-sensitive
    ({"Authorization": "Bearer sk-first-0123456789x"}, ""),              # a longer key is another key
    ({"Authorization": "Bearer sk-first"}, ""),                          # so is a prefix
    ({"Authorization": "Bearer sk-first-0123456789,sk-second-abcdef"}, ""),  # not the configured list
    ({}, "?api_key=sk-first-0123456789"),                                # only the Authorization header counts
    ({"X-Api-Key": "sk-first-0123456789"}, ""),
    ({"Authorization": "sk-first-0123456789"}, ""),                      # no scheme
])
async def test_wrong_keys_are_401(headers: dict[str, str], query: str) -> None:
    engine = FakeEngine()
    async with gateway([engine], api_keys="sk-first-0123456789,sk-second-abcdef") as client:
        response = await client.post(f"/v1/completions{query}", content=body(), headers={
            "content-type": "application/json", **headers})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert "sk-first" not in response.text
    assert engine.requests == [] and engine.tokenize_calls == 0
