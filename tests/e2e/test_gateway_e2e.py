"""End to end: the gateway with its embedded engine (real vLLM CPU, default model, bf16, the rope plugin),
driven by the official ``openai`` SDK. Shares the session's ``gateway`` (tests/conftest.py): the engine
starts once. The long requests (a 9000-token completion, the passkey self-check at 16k) cost one to two and
a half minutes each on two cores.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

pytestmark = pytest.mark.engine

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, timeout=900, max_retries=0)


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {gateway.api_key}"},
                      timeout=900) as client:
        yield client


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


def test_completion_is_sensible_and_short_prompts_run_unscaled(sdk):
    raw = sdk.completions.with_raw_response.create(model=MODEL, prompt="The capital of France is", **GREEDY)
    assert float(raw.headers["x-rope-factor"]) == 1.0
    assert "Paris" in raw.parse().choices[0].text


def test_chat_completion(sdk):
    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], **GREEDY)
    assert float(raw.headers["x-rope-factor"]) == 1.0
    assert raw.parse().choices[0].message.content.strip()


def test_streaming_equals_non_streaming(sdk):
    whole = sdk.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY).choices[0].text
    chunks = [c.choices[0].text for c in sdk.completions.create(model=MODEL, prompt="Once upon a time",
                                                                stream=True, **GREEDY) if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == whole


def test_models_report_original_and_maximum_context(http):
    body = http.get("/v1/models").json()
    assert body["data"][0]["id"] == MODEL
    assert "8192" in str(body) and "65536" in str(body)


def test_long_prompt_runs_at_a_larger_factor(sdk, book_tokens):
    raw = sdk.completions.with_raw_response.create(model=MODEL, prompt=book_tokens[:9000], **GREEDY)
    assert float(raw.headers["x-rope-factor"]) == 2 ** 0.5  # past L: the first bucket, sqrt(2) (11585 tokens)
    assert raw.parse().usage.prompt_tokens == 9000


def test_passkey_self_check_passes_at_16k(http):
    """The check at twice L, as a user runs it. The default model retrieves about half the keys at 16k at
    any scale (docs/RESULTS.md: static YaRN x8 6/12, the plugin at s = 2 and at s = 4 alike), so the depth
    is one where the grid's default policy retrieved both seeds' keys (0.3); plain RoPE, what a broken
    plugin would compute, retrieved none of its 16k keys."""
    response = http.get("/healthz/passkey", params={"len": 16384, "depth": 0.3})
    body = response.json()
    assert response.status_code == 200, body
    assert body["passed"] is True and body["answer_key"] == body["expected_key"]
    assert body["prompt_tokens"] == 16384 - 10  # len is the whole context: the prompt and the 10-token answer
    assert body["rope_factor"] == 2.0 and abs(body["depth"] - 0.3) < 0.01


def test_gateway_and_engine_agree_on_every_factor(gateway, http, sdk):
    def observed() -> tuple[float, ...]:
        ours = http.get("/metrics").text
        engine = httpx.get(f"{gateway.engine_url}/metrics", timeout=30).text
        return tuple(_metric(text, f"{name}{suffix}") for text, name in
                     ((ours, "ropeserve_rope_factor"), (engine, "ropeserve_engine_rope_factor"))
                     for suffix in ("_count", "_sum"))

    before = observed()
    headers = [float(sdk.completions.with_raw_response.create(model=MODEL, prompt="Hello", extra_body=extra,
                                                               **GREEDY).headers["x-rope-factor"])
               for extra in ({}, {"rope_factor": 3})]
    after = observed()
    assert headers == [1.0, 4.0]  # 3 is rounded up to the bucket 4
    gateway_count, gateway_sum, engine_count, engine_sum = (a - b for a, b in zip(after, before))
    assert gateway_count == engine_count == 2
    assert gateway_sum == pytest.approx(engine_sum) and engine_sum == pytest.approx(sum(headers))  # running sums


def test_a_pinned_request_past_its_bucket_is_refused_by_the_engine_and_the_gateway(gateway, http, book_tokens):
    # Forced to factor 1 (capacity 8192 tokens), 8190 prompt tokens + 10 new ones would outgrow the bucket:
    # a 400 naming the capacity, from vLLM's own server (the plugin's front-end) as from the gateway.
    body = {"model": MODEL, "prompt": book_tokens[:8190], "max_tokens": 10, "temperature": 0}
    engine = httpx.post(f"{gateway.engine_url}/v1/completions", timeout=900,
                        json={**body, "vllm_xargs": {"rope_factor": 1}})
    ours = http.post("/v1/completions", json={**body, "rope_factor": 1})
    for response in (engine, ours):
        assert response.status_code == 400, response.text
        assert ("This request's rope_factor 1 holds at most 8192 tokens; the prompt (8190 tokens) plus max_tokens "
                "(10) is 8200.") in response.json()["error"]["message"]
    assert ours.json()["error"]["code"] == "context_length_exceeded"


def test_a_pinned_request_without_max_tokens_stops_at_its_bucket(http, book_tokens, tokenizer):
    """A chat request without max_tokens (vLLM fills it with the rest of the context; a completion would get
    OpenAI's default of 16) pinned at factor 1 stops at that bucket's capacity, L = 8192 tokens in all."""
    text = tokenizer.decode(book_tokens[:8000])
    response = http.post("/v1/chat/completions", json={"model": MODEL, "rope_factor": 1, "temperature": 0,
                                                       "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 8192 and body["usage"]["completion_tokens"] > 0
    assert response.headers["x-rope-factor"] == response.headers["x-rope-factor-final"] == "1"


@pytest.mark.parametrize("factor", [0.5, 9, "two"])
def test_engine_rejects_an_invalid_factor_with_a_400(gateway, factor):
    # Straight to vLLM's own server: the plugin's validation surfaces as vLLM's 400 error.
    response = httpx.post(f"{gateway.engine_url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"rope_factor": factor}})
    assert response.status_code == 400, response.text
    assert "rope_factor" in response.text


@pytest.mark.parametrize("body,status,code", [
    ({"prompt": "hi", "rope_factor": 0.5}, 400, None),
    ({"prompt": "hi", "rope_factor": 1000}, 400, None),
    ({"prompt": "hi", "max_tokens": 70000}, 400, "context_length_exceeded"),
    ({"prompt": "hi", "max_tokens": -1}, 400, None),
    ({"prompt": "hi", "model": "no-such-model"}, 404, None),
])
def test_bad_input_gets_a_4xx_envelope(http, body, status, code):
    response = http.post("/v1/completions", json={"model": MODEL, **GREEDY, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and "type" in error
    if code:
        assert error["code"] == code


def test_passkey_len_must_be_an_integer_in_range(http):
    for value in ("abc", "10", "999999999"):
        response = http.get("/healthz/passkey", params={"len": value})
        assert response.status_code == 400
        assert "len" in response.json()["error"]["message"]


def test_a_key_is_required(gateway):
    response = httpx.post(f"{gateway.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/healthz", timeout=30).status_code == 200


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3 ... é 日本 🙂"}],
]
TEXTS = ["The capital of France is", "  two leading spaces\n\ttab", "é ü 日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]


def test_the_gateways_token_counts_equal_the_engines_tokenize(gateway, model_dir, book_tokens, tokenizer):
    """The gateway counts prompts with its own tokenizer (embedded mode); the engine's /tokenize is the oracle."""
    import asyncio

    from server.schemas import ChatCompletionRequest
    from server.tokens import LocalTokenCounter

    book = tokenizer.decode(book_tokens[:3000])

    async def local() -> tuple[list[int], list[int]]:
        counter = await LocalTokenCounter.load(model_dir)
        try:
            texts = [await counter.count_text(t, add_special_tokens=s) for t in [*TEXTS, book] for s in (True, False)]
            chats = [await counter.count_chat(ChatCompletionRequest(model=MODEL, messages=m)) for m in CHATS]
            return texts, chats
        finally:
            counter.close()

    texts, chats = asyncio.run(local())
    with httpx.Client(base_url=gateway.engine_url, timeout=60) as engine:
        def count(body: dict) -> int:
            return engine.post("/tokenize", json={"model": MODEL, **body}).raise_for_status().json()["count"]

        assert texts == [count({"prompt": t, "add_special_tokens": s}) for t in [*TEXTS, book] for s in (True, False)]
        assert chats == [count({"messages": m, "add_generation_prompt": True}) for m in CHATS]
