"""The gateway's own token counting (server/tokens.py) with the default model's real tokenizer: what counts as
a plain chat, counts equal to the tokenizer's, and a gateway with a tokenizer asks no engine to count.

That the local counts equal the engine's ``/tokenize`` is checked on the real engine in tests/e2e."""

from __future__ import annotations

import copy

import pytest

from server.schemas import ChatCompletionRequest
from server.tokens import LocalTokenCounter, is_plain_chat
from tests.server.conftest import gateway
from tests.server.fake_engine import MODEL, FakeEngine

pytestmark = pytest.mark.anyio

PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def chat(messages=PLAIN, **extra) -> ChatCompletionRequest:  # noqa: ANN001
    return ChatCompletionRequest(model=MODEL, messages=messages, **extra)


def test_plain_chat_is_roles_with_string_content_and_nothing_else() -> None:
    assert is_plain_chat(chat())
    assert is_plain_chat(chat(temperature=0.5, max_tokens=4))  # sampling fields do not change the prompt


@pytest.mark.parametrize("request_", [
    chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
    chat([{"role": "user", "content": "Hi", "name": "ann"}]),
    chat([{"role": "tool", "content": "42", "tool_call_id": "x"}]),
    chat([{"role": "developer", "content": "Hi"}]),
    chat([{"role": "user", "content": None}]),
    chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    chat(chat_template="{{ messages }}"),
    chat(chat_template_kwargs={"enable_thinking": False}),
    chat(add_generation_prompt=False),
    chat(continue_final_message=True),
], ids=["content-parts", "name", "tool-role", "developer-role", "null-content", "tools", "template",
        "template-kwargs", "no-generation-prompt", "continue-final"])
def test_anything_else_is_left_to_the_engine(request_: ChatCompletionRequest) -> None:
    assert not is_plain_chat(request_)


@pytest.fixture(scope="module")
async def counter(model_dir):
    counter = await LocalTokenCounter.load(model_dir)
    yield counter
    counter.close()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("text", ["The capital of France is", "  leading spaces", "é ü 日本語 🙂",
                                  "<|im_start|>user\nhi<|im_end|>", "a" * 5000])
@pytest.mark.parametrize("add_special_tokens", [True, False])
async def test_text_counts_are_the_tokenizers(counter, tokenizer, text: str, add_special_tokens: bool) -> None:
    expected = len(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    assert await counter.count_text(text, add_special_tokens=add_special_tokens) == expected


async def test_chat_count_is_the_rendered_template(counter, tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(PLAIN, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert await counter.count_chat(chat()) == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert await counter.count_chat(chat(tools=[{"type": "function", "function": {"name": "f"}}])) is None


async def test_concurrent_counts_are_serialised_and_right(counter, tokenizer) -> None:
    import asyncio

    texts = [f"{i} " * (50 + 40 * i) for i in range(40)]  # short ones inline, long ones on the worker
    counts = await asyncio.gather(*(counter.count_text(t, add_special_tokens=True) for t in texts))
    assert counts == [len(tokenizer.encode(t)) for t in texts]


async def test_a_gateway_with_a_tokenizer_asks_no_engine_to_count(model_dir, tokenizer) -> None:
    engine = FakeEngine()
    async with gateway([engine], tokenizer=model_dir) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-rope-factor"] == "1"
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": PLAIN, "max_tokens": 2})
        assert r.status_code == 200
        assert engine.tokenize_calls == 0
        parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": parts, "max_tokens": 2})
        assert r.status_code == 200 and engine.tokenize_calls == 1  # content parts: the engine counts


async def test_the_local_count_drives_the_context_check(model_dir, tokenizer) -> None:
    engine = FakeEngine()
    # "ab" repeated: one real token per repetition, while the fake engine's whitespace tokenizer sees one word.
    text = "ab" * 70000
    assert len(tokenizer.encode(text)) > 65536
    async with gateway([engine], tokenizer=model_dir) as client:
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert engine.requests == [] and engine.tokenize_calls == 0


async def test_a_missing_tokenizer_fails_the_start(tmp_path) -> None:
    with pytest.raises(OSError):
        async with gateway([FakeEngine()], tokenizer=str(tmp_path / "no-such-model")):
            pass


STRING_TEMPLATE = "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}{% endfor %}"


@pytest.mark.parametrize(("template", "string"), [
    (STRING_TEMPLATE, True),
    ("{% for m in messages %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{% for part in m.content %}{{ part.text }}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{% set content = m.content %}{% for p in content %}{{ p }}{% endfor %}{% endfor %}",
     False),
    ("{% macro render(c) %}{% for p in c %}{{ p }}{% endfor %}{% endmacro %}"
     "{% for m in messages %}{{ render(m.content) }}{% endfor %}", False),
    ("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}", False),
    (None, False),
], ids=["string", "item-loop", "attr-loop", "name-loop", "macro-loop", "unknown-tag", "no-template"])
def test_templates_vllm_gives_parts_are_left_to_the_engine(template, string: bool) -> None:
    from server.tokens import renders_content_as_string

    assert renders_content_as_string(template) is string


async def test_the_default_models_template_is_counted_here_and_a_parts_template_is_not(tokenizer) -> None:
    from server.tokens import renders_content_as_string

    assert renders_content_as_string(tokenizer.chat_template)
    parts = copy.copy(tokenizer)
    parts.chat_template = "{% for m in messages %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endfor %}"
    counter = LocalTokenCounter(parts, parts)
    try:
        assert await counter.count_chat(chat()) is None
    finally:
        counter.close()
