"""Counting prompt tokens in the gateway with the served model's own tokenizer, so that choosing a request's
RoPE factor costs no round trip to an engine.

vLLM's ``POST /tokenize`` on the engine is what this must equal (tests/e2e compares the two on the real
engine). Text prompts of ``/v1/completions`` are counted as vLLM counts them: ``encode(text,
add_special_tokens=...)``. A chat request is counted here only in the shape vLLM renders without any
processing of its own: every message a ``system``, ``user`` or ``assistant`` role with string content and
no other field, and no tools or chat-template options, with a chat template vLLM gives string content as
it is (:func:`renders_content_as_string`: no loop over a message's content, no macro with a loop);
:meth:`LocalTokenCounter.count_chat` returns None for anything else, and the gateway asks the engine.

Short prompts (up to :data:`INLINE_CHARS` characters, a fraction of a millisecond) are counted on the event
loop, where handing them to a thread would cost more than counting them; longer ones run on one worker
thread, off the loop. A tokenizer is not safe to call from two threads at once, so each side has its own
instance::

    counter = await LocalTokenCounter.load("/models/SmolLM2-135M-Instruct")
    await counter.count_text("The capital of France is", add_special_tokens=True)   # 5
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.schemas import ChatCompletionRequest

INLINE_CHARS = 2048
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


def renders_content_as_string(chat_template: object) -> bool:
    """Whether vLLM passes string content to ``chat_template`` unchanged. vLLM turns content into a list of
    parts for templates that loop over it (its "openai" content format, ``renderers/hf.py``); this errs on
    the side of the engine: any loop whose iterable mentions ``content``, any loop inside a macro, or a
    template jinja2 cannot parse alone counts as "not a string template"."""
    import jinja2
    from jinja2 import nodes

    if not isinstance(chat_template, str):
        return False
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(chat_template)
    except jinja2.TemplateError:
        return False

    def mentions_content(node: nodes.Node) -> bool:
        return any((isinstance(n, nodes.Getattr) and n.attr == "content")
                   or (isinstance(n, nodes.Getitem) and isinstance(n.arg, nodes.Const) and n.arg.value == "content")
                   or (isinstance(n, nodes.Name) and n.name == "content")
                   for n in [node, *node.find_all((nodes.Getattr, nodes.Getitem, nodes.Name))])

    if any(mentions_content(loop.iter) for loop in ast.find_all(nodes.For)):
        return False
    return not any(True for macro in ast.find_all(nodes.Macro) for _ in macro.find_all(nodes.For))


class LocalTokenCounter:
    def __init__(self, inline: Any, threaded: Any) -> None:
        """``inline`` and ``threaded``: two instances of the same tokenizer, for the loop and the worker."""
        self._inline = inline
        self._threaded = threaded
        self._chat = renders_content_as_string(getattr(inline, "chat_template", None))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ropeserve-tokenizer")

    @classmethod
    async def load(cls, source: str) -> LocalTokenCounter:
        """The tokenizer of ``source`` (a model directory, or a hub name where the hub is reachable)."""
        from transformers import AutoTokenizer

        inline, threaded = [await asyncio.to_thread(AutoTokenizer.from_pretrained, source) for _ in range(2)]
        return cls(inline, threaded)

    async def _run(self, chars: int, fn: Callable[[Any], int]) -> int:
        if chars <= INLINE_CHARS:
            return fn(self._inline)
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, self._threaded)

    async def count_text(self, text: str, *, add_special_tokens: bool) -> int:
        return await self._run(len(text), lambda tok: len(tok.encode(text, add_special_tokens=add_special_tokens)))

    async def count_chat(self, request: ChatCompletionRequest) -> int | None:
        """Tokens of the prompt the chat template makes of ``request``; None when it is not a plain chat or
        the template is not one that vLLM gives string content to."""
        if not self._chat or not is_plain_chat(request):
            return None
        chars = sum(len(message["content"]) for message in request.messages)
        return await self._run(chars, functools.partial(_count_chat, request.messages))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def _count_chat(messages: list[dict[str, str]], tokenizer: Any) -> int:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(prompt, add_special_tokens=False))
