"""Counting prompt tokens in the gateway with the served model's own tokenizer, so that choosing a request's
RoPE factor costs no round trip to an engine.

vLLM's ``POST /tokenize`` on the engine is what this must equal (tests/e2e compares the two on the real
engine). Text prompts of ``/v1/completions`` are counted as vLLM counts them: ``encode(text,
add_special_tokens=...)``. A chat request is counted here only in the shape vLLM renders without any
processing of its own: every message a ``system``, ``user`` or ``assistant`` role with string content and
no other field, and no tools or chat-template options; :meth:`LocalTokenCounter.count_chat` returns None
for anything else, and the gateway asks the engine. The tokenizer is not safe to call from several threads
at once, so every call runs on one worker thread of its own, off the event loop::

    counter = await LocalTokenCounter.load("/models/SmolLM2-135M-Instruct")
    await counter.count_text("The capital of France is", add_special_tokens=True)   # 5
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.schemas import ChatCompletionRequest

PLAIN_ROLES = frozenset({"system", "user", "assistant"})
PLAIN_MESSAGE_FIELDS = frozenset({"role", "content"})


def is_plain_chat(request: ChatCompletionRequest) -> bool:
    """Whether the chat template alone turns ``request`` into its prompt (no content parts, tools, names
    or template options for vLLM to process first)."""
    body = request.tokenize_body("")
    if set(body) != {"model", "messages", "add_generation_prompt"} or body["add_generation_prompt"] is not True:
        return False
    return all(message.keys() <= PLAIN_MESSAGE_FIELDS and message.get("role") in PLAIN_ROLES
               and isinstance(message.get("content"), str) for message in request.messages)


class LocalTokenCounter:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ropeserve-tokenizer")

    @classmethod
    async def load(cls, source: str) -> LocalTokenCounter:
        """The tokenizer of ``source`` (a model directory, or a hub name where the hub is reachable)."""
        from transformers import AutoTokenizer

        return cls(await asyncio.to_thread(AutoTokenizer.from_pretrained, source))

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    async def count_text(self, text: str, *, add_special_tokens: bool) -> int:
        return len(await self._run(self._tokenizer.encode, text, add_special_tokens=add_special_tokens))

    async def count_chat(self, request: ChatCompletionRequest) -> int | None:
        """Tokens of the prompt the chat template makes of ``request``; None when it is not a plain chat."""
        if not is_plain_chat(request):
            return None
        return await self._run(self._count_chat, request.messages)

    def _count_chat(self, messages: list[dict[str, str]]) -> int:
        prompt = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(self._tokenizer.encode(prompt, add_special_tokens=False))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
