"""Chat messages are validated as OpenAI validates them: a malformed message is a 400 in the envelope, with
the message's place in ``param``, and never reaches the engine (its chat template)."""

from __future__ import annotations

import pytest

from server.messages import MessageError, validate_messages
from tests.server.conftest import gateway
from tests.server.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio

GOOD = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "developer", "content": [{"type": "text", "text": "x"}]},
     {"role": "user", "content": [{"type": "text", "text": "look"},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
                                  {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}]},
     {"role": "assistant", "content": None,
      "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "42"},
     {"role": "assistant", "content": [{"type": "text", "text": "done"}, {"type": "refusal", "refusal": "no"}],
      "name": "bot", "reasoning_content": "thought"}],
    [{"role": "function", "name": "f", "content": "old style"}],
]

BAD = [  # (messages, param, words of the message)
    ([{"content": "no role"}], "messages[0].role", "must be one of"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "robot"),
    (["just a string"], "messages[0]", "object with a role"),
    ([{"role": "user"}], "messages[0].content", "Field required"),
    ([{"role": "user", "content": 5}], "messages[0].content", "valid string"),
    ([{"role": "user", "content": [{"type": "video", "video": {}}]}], "messages[0].content[0]", "video"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "Field required"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].image_url.url", "Field required"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0].type", "'text'"),
    ([{"role": "user", "content": "hi", "colour": "red"}], "messages[0].colour", "Extra inputs"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "messages[1]", "needs content, tool_calls"),
    ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id", "Field required"),
    ([{"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]}],
     "messages[0].tool_calls[0].function.arguments", "Field required"),
    ([{"role": "function", "content": "x"}], "messages[0].name", "Field required"),
    ([{"role": "user", "content": "hi", "name": 3}], "messages[0].name", "valid string"),
]


@pytest.mark.parametrize("messages", GOOD)
async def test_valid_messages_pass_unchanged(messages):
    assert validate_messages(messages) is messages


@pytest.mark.parametrize(("messages", "param", "words"), BAD)
async def test_invalid_messages_name_what_is_wrong(messages, param, words):
    with pytest.raises(MessageError) as info:
        validate_messages(messages)
    assert info.value.param == param
    assert words in str(info.value) and str(info.value).startswith(param)


@pytest.mark.parametrize(("messages", "param", "words"), BAD)
async def test_a_malformed_message_is_a_400_and_never_reaches_the_engine(messages, param, words):
    engine = FakeEngine()
    async with gateway([engine]) as client:
        response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]
    assert engine.requests == [] and engine.tokenize_calls == 0


async def test_valid_chats_reach_the_engine_as_sent():
    engine = FakeEngine()
    async with gateway([engine]) as client:
        for messages in GOOD:
            response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
            assert response.status_code == 200, response.text
    assert [body["messages"] for _, body in engine.requests] == GOOD
