"""A fake ropeserve gateway for the client's unit tests: an ``httpx.MockTransport`` handler that speaks
the gateway's HTTP API (OpenAI-compatible completions and chat with SSE streaming, ``rope_factor``,
the ``x-rope-factor`` header, /v1/models, /healthz, /readyz, /healthz/passkey and OpenAI error
envelopes). It is a test double of the *server*, so the client is tested with no network and no engine.

Scripted answers (``gateway.queue(path, response, ...)``) are served first, in order, before the
default behaviour; every request is recorded in ``gateway.requests``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from typing import Any

import httpx

URL = "http://gateway.test"
MODEL = "SmolLM2-135M-Instruct"
ORIGINAL_CONTEXT = 8192
ANSWER = ["Paris", " is", " the", " capital", "."]


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body delivered in the given byte chunks, to sync and async clients alike."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    def __iter__(self):
        yield from self.chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error(status: int, message: str, type_: str, code: str | None, *, headers: dict | None = None,
          rope_factor: float = 1.0) -> httpx.Response:
    return httpx.Response(status, json=envelope(message, type_, code),
                          headers={"x-rope-factor": str(rope_factor), **(headers or {})})


def sse(events: Iterable[Any], *, done: bool = True, split: int | None = None, rope_factor: float = 1.0) -> httpx.Response:
    """A streamed answer: each event as ``data: <json>``, then ``data: [DONE]`` unless ``done`` is
    False; ``split`` cuts the body into chunks of that many bytes (lines cut across chunks)."""
    body = "".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n" for e in events)
    if done:
        body += "data: [DONE]\n\n"
    raw = body.encode()
    chunks = [raw[i:i + split] for i in range(0, len(raw), split)] if split else [raw]
    return httpx.Response(200, headers={"content-type": "text/event-stream", "x-rope-factor": str(rope_factor)},
                          stream=Chunks(chunks))


class FakeGateway:
    """The gateway's API in memory. Knobs: ``api_key``, ``ready``, ``max_model_len``, ``passkey_passes``."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.scripted: dict[str, deque[httpx.Response | Exception]] = defaultdict(deque)
        self.api_key: str | None = None
        self.ready = True
        self.max_model_len = ORIGINAL_CONTEXT * 8
        self.passkey_passes: Callable[[int, float, int], bool] = lambda n, depth, seed: n <= ORIGINAL_CONTEXT
        self.passkey_seconds = 0.0  # how long a check takes (real time: the CLI polls progress meanwhile)
        self.passkey_running: dict[str, Any] | None = None

    # -- scripting ----------------------------------------------------------------------------------
    def queue(self, path: str, *answers: httpx.Response | Exception) -> None:
        """Serve these answers (or raise these exceptions) to the next requests for ``path``."""
        self.scripted[path].extend(answers)

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.url.path == path]

    # -- the API ------------------------------------------------------------------------------------
    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.scripted[path]:
            answer = self.scripted[path].popleft()
            if isinstance(answer, Exception):
                raise answer
            return answer
        if path in ("/healthz", "/readyz"):
            return self._probe(path)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Invalid API key: check ROPESERVE_API_KEYS", "authentication_error", "invalid_api_key")
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": MODEL, "object": "model", "created": 0, "owned_by": "ropeserve",
                 "max_model_len": self.max_model_len}]}, headers={"x-rope-factor": "1.0"})
        if path == "/healthz/passkey":
            return self._passkey(request)
        if path == "/healthz/passkey/progress":
            return httpx.Response(200, json={"running": True, **self.passkey_running} if self.passkey_running
                                  else {"running": False, "last_duration_s": None})
        if path in ("/v1/completions", "/v1/chat/completions") and request.method == "POST":
            return self._generate(path, json.loads(request.content))
        return error(404, f"no route {path}", "not_found_error", "not_found")

    def _probe(self, path: str) -> httpx.Response:
        if path == "/healthz":
            return httpx.Response(200, json={"status": "alive"})
        if self.ready:
            return httpx.Response(200, json={"status": "ready", "engines": 1})
        return httpx.Response(503, json={"status": "not ready", "engines": 0})

    def _factor(self, body: dict[str, Any], prompt_tokens: int) -> float:
        if body.get("rope_factor") is not None:
            return float(body["rope_factor"])
        return max(1.0, (prompt_tokens + (body.get("max_tokens") or 16)) / ORIGINAL_CONTEXT)

    def _generate(self, path: str, body: dict[str, Any]) -> httpx.Response:
        chat = path.endswith("chat/completions")
        text = " ".join(m.get("content") or "" for m in body["messages"]) if chat else body["prompt"]
        prompt_tokens = len(text.split())
        max_tokens = body.get("max_tokens") or 16
        if prompt_tokens + max_tokens > self.max_model_len:
            return error(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                              f"{max_tokens} in the completion).", "invalid_request_error",
                         "context_length_exceeded")
        factor = self._factor(body, prompt_tokens)
        pieces = ANSWER[:max_tokens]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        base = {"id": "cmpl-1", "created": 1, "model": body["model"]}
        if body.get("stream"):
            if chat:
                events = [{**base, "object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
                events += [{**base, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
            else:
                events = [{**base, "object": "text_completion",
                           "choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
            return sse(events, rope_factor=factor)
        if chat:
            payload = {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": "stop"}]}
        else:
            payload = {**base, "object": "text_completion", "usage": usage,
                       "choices": [{"index": 0, "text": "".join(pieces), "finish_reason": "stop"}]}
        return httpx.Response(200, json=payload, headers={"x-rope-factor": f"{factor:g}"})

    def _passkey(self, request: httpx.Request) -> httpx.Response:
        n = int(request.url.params["len"])
        depth = float(request.url.params.get("depth", 0.5))
        seed = int(request.url.params.get("seed", 0))
        passed = self.passkey_passes(n, depth, seed)
        key = 1000 + seed
        if self.passkey_seconds:
            self.passkey_running = {"len": n, "prompt_tokens": n - 10, "computed_tokens": (n - 10) // 2,
                                    "elapsed_s": 3.0, "tokens_per_s": 100.0, "eta_s": 3.0}
            time.sleep(self.passkey_seconds)
            self.passkey_running = None
        factor = max(1.0, n / ORIGINAL_CONTEXT)
        result = {"passed": passed, "requested_tokens": n, "prompt_tokens": n - 3, "depth": depth,
                  "expected_key": key, "answer": f" {key}." if passed else " 42.", "rope_factor": factor,
                  "latency_s": 0.25, "cached": False}
        return httpx.Response(200 if passed else 503, json=result, headers={"x-rope-factor": f"{factor:g}"})


class Sleeps(list):
    """Records the delays a client asked to wait (instead of waiting)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class AsyncSleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
