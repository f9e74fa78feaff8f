"""A fake vLLM engine for the gateway's tests: vLLM 0.32's OpenAI API with a toy tokenizer, no model.

It speaks what the gateway uses: ``GET /health``, ``GET /v1/models``, ``POST /tokenize`` (a whitespace
tokenizer, with a toy chat template for ``messages``), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (streaming as SSE ``data: {...}`` events ending with ``data: [DONE]``), and
``GET /metrics``. Like the real engine with the rope plugin, it reads ``vllm_xargs.rope_factor``, refuses bad
values with 400, rounds good ones up to a bucket and records the factor it ran at; a request so pinned must
fit its bucket (400 otherwise) and without ``max_tokens`` stops at the bucket's capacity. Generation is
deterministic: a passkey prompt is answered with its key (or a wrong one when ``passkey_wrong``), anything
else with ``t0 t1 ...`` up to ``max_tokens`` (default 16); with ``sign_answers``, each token also carries the
factor the request ran at and a hash of its prompt (`` t0/f2/h1234``), so a request whose factor or prompt
got mixed up with another's answers differently. ``token_delay_s`` paces streams token by token and delays
a whole non-streaming answer as long (aborted, as vLLM does, when its client leaves). Its ``/metrics`` carries
the plugin's evidence counters (tokens scheduled and computed per factor). Knobs let tests make it
unhealthy, refuse connections (``down``, through :meth:`transport`), fail, hold a stream open (``gate``),
break the plugin's hook (``rope_hook_broken``: tokens scheduled at a factor are not computed at it) or run
without the plugin (``rope_plugin_missing``)::

    engine = FakeEngine()
    transport = engine.transport()            # for httpx / EnginePool(transports=...)
    # or serve engine.app with uvicorn for real sockets (tests/server/servers.py)
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import zlib
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from rope_ext import RopeConfigError, RopeScaling, choose_factor, validate_override
from rope_ext.policy import pinned_max_tokens, requested_max_tokens, smallest_bucket_at_least

MODEL = "fake-model"
_PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\.")


def toy_tokens(text: str) -> list[int]:
    """Whitespace tokens, each mapped to a stable id."""
    return [zlib.crc32(word.encode()) % 49152 for word in text.split()]


def toy_chat_template(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        parts.append(f"<|im_start|>{message.get('role')} {content or ''} <|im_end|>")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant")
    return " ".join(parts)


def vllm_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """vLLM 0.32's error body: ``{"error": {"message", "type", "param", "code": <status>}}``."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


class _RefusingTransport(httpx.AsyncBaseTransport):
    """ASGI transport to the fake engine that refuses connections while the engine is ``down``."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.inner = httpx.ASGITransport(app=engine.app)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.engine.down:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.inner.handle_async_request(request)


class FakeEngine:
    def __init__(self, *, model: str = MODEL, scaling: RopeScaling | None = None,
                 max_model_len: int | None = None, token_delay_s: float = 0.0, sign_answers: bool = False) -> None:
        self.model = model
        self.scaling = scaling or RopeScaling(method="dynamic_yarn", original_max_position=8192, max_factor=8.0)
        self.max_model_len = max_model_len if max_model_len is not None else self.scaling.max_context
        self.token_delay_s = token_delay_s
        self.sign_answers = sign_answers
        self.healthy = True
        self.down = False
        self.passkey_wrong = False
        self.fail_with: tuple[int, str] | None = None
        self.fail_mid_stream = False
        self.gate: threading.Event | None = None  # while set up and clear: answers wait (streams: after chunk 1)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.factors: list[float] = []
        self.tokenize_calls = 0
        self.metrics_reads = 0
        self.health_checks = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.streams_cancelled = 0
        self.streams_finished = 0
        self.requests_aborted = 0
        self.rope_hook_broken = False
        self.rope_plugin_missing = False
        self.rope_scheduled: dict[float, int] = {b: 0 for b in self.scaling.buckets}
        self.rope_computed: dict[float, int] = {b: 0 for b in self.scaling.buckets}
        self.app = self._build()

    def transport(self) -> httpx.AsyncBaseTransport:
        return _RefusingTransport(self)

    # --- the plugin's part: the factor a request runs at -------------------------------------------------

    def _factor(self, body: dict[str, Any], prompt_tokens: int, max_tokens: int | None) -> float:
        xargs = body.get("vllm_xargs") or {}
        if "rope_factor" in xargs:
            return smallest_bucket_at_least(validate_override(xargs["rope_factor"], self.scaling), self.scaling)
        return choose_factor(prompt_tokens, max_tokens, self.scaling)

    def _budget(self, body: dict[str, Any], prompt_tokens: int, max_tokens: int | None, factor: float) -> int:
        """Tokens to answer: ``max_tokens`` (unset: 16), a pinned request's no more than its bucket holds."""
        budget = 16 if max_tokens is None else max_tokens
        if "rope_factor" not in (body.get("vllm_xargs") or {}):
            return budget
        stated = requested_max_tokens(prompt_tokens, max_tokens, self.max_model_len)
        return min(budget, pinned_max_tokens(prompt_tokens, stated, factor, self.scaling))

    # --- generation -------------------------------------------------------------------------------------

    def _answer(self, prompt: str, max_tokens: int) -> list[str]:
        match = _PASSKEY.search(prompt)
        if match and prompt.rstrip().endswith("The pass key is"):
            key = int(match.group(1)) + (1 if self.passkey_wrong else 0)
            return [f" {key}", ".", " Remember", " it", "."][:max_tokens]
        return [f" t{i}" for i in range(max_tokens)]

    def _build(self) -> FastAPI:
        app = FastAPI()
        engine = self

        @app.get("/health")
        async def health() -> PlainTextResponse:
            engine.health_checks += 1
            return PlainTextResponse("", status_code=200 if engine.healthy else 503)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": engine.model, "object": "model", "owned_by": "vllm",
                                                 "root": "/models/fake", "max_model_len": engine.max_model_len}]}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            engine.metrics_reads += 1
            text = (f"vllm:num_requests_running {engine.in_flight}\n"
                    f"fake:requests_aborted_total {engine.requests_aborted}\n"
                    f"fake:streams_cancelled_total {engine.streams_cancelled}\n")
            if not engine.rope_plugin_missing:
                for name, counts in (("ropeserve_engine_rope_scheduled_tokens", engine.rope_scheduled),
                                     ("ropeserve_engine_rope_tokens", engine.rope_computed)):
                    text += f"# TYPE {name} counter\n" + "".join(
                        f'{name}_total{{factor="{f:g}"}} {n}\n' for f, n in counts.items())
            return PlainTextResponse(text)

        @app.post("/tokenize")
        async def tokenize(request: Request) -> JSONResponse:
            engine.tokenize_calls += 1
            body = await request.json()
            if body.get("model") not in (None, engine.model):
                return vllm_error(404, f"The model `{body.get('model')}` does not exist.")
            if "messages" in body:
                text = toy_chat_template(body["messages"], body.get("add_generation_prompt", True))
            else:
                text = body["prompt"]
            tokens = toy_tokens(text)
            return JSONResponse({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})

        async def generate(request: Request, chat: bool) -> Any:
            body = await request.json()
            path = request.url.path
            engine.requests.append((path, body))
            if engine.fail_with is not None:
                status, message = engine.fail_with
                return vllm_error(status, message)
            if body.get("model") != engine.model:
                return vllm_error(404, f"The model `{body.get('model')}` does not exist.", "model")
            if chat:
                prompt = toy_chat_template(body["messages"], body.get("add_generation_prompt", True))
                max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            else:
                prompt = body["prompt"] if isinstance(body["prompt"], str) else " ".join(map(str, body["prompt"]))
                max_tokens = body.get("max_tokens")  # unset: vLLM fills the rest of the context, the plugin
                                                     # reads that as unset (and the fake answers 16 tokens)
            prompt_tokens = len(toy_tokens(prompt))
            if prompt_tokens + (max_tokens or 0) > engine.max_model_len:
                return vllm_error(400, f"This model's maximum context length is {engine.max_model_len} tokens.")
            try:
                factor = engine._factor(body, prompt_tokens, max_tokens)
                budget = engine._budget(body, prompt_tokens, max_tokens, factor)
            except RopeConfigError as exc:
                return vllm_error(400, str(exc), exc.field)
            engine.factors.append(factor)
            pieces = engine._answer(prompt, budget)
            engine.rope_scheduled[factor] += prompt_tokens + len(pieces)
            if not engine.rope_hook_broken:
                engine.rope_computed[factor] += prompt_tokens + len(pieces)
            if engine.sign_answers:
                pieces = [f"{piece}/f{factor:g}/h{zlib.crc32(prompt.encode()) % 10000}" for piece in pieces]
            n = int(body.get("n") or 1)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) * n,
                     "total_tokens": prompt_tokens + len(pieces) * n}
            kind = "chat.completion" if chat else "text_completion"
            if not body.get("stream"):
                engine.in_flight += 1
                engine.max_in_flight = max(engine.max_in_flight, engine.in_flight)
                try:
                    await engine._wait_gate()
                    if engine.token_delay_s and not await engine._generate_unless_aborted(
                            request, engine.token_delay_s * len(pieces)):
                        engine.requests_aborted += 1
                        return PlainTextResponse("", status_code=499)
                finally:
                    engine.in_flight -= 1
                if chat:
                    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(pieces)},
                                "finish_reason": "length"} for i in range(n)]
                else:
                    choices = [{"index": i, "text": "".join(pieces), "finish_reason": "length"}
                               for i in range(n)]
                return {"id": "cmpl-fake", "object": kind, "created": int(time.time()), "model": engine.model,
                        "choices": choices, "usage": usage}
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(engine._stream(pieces, chat, usage if include_usage else None),
                                     media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Any:
            return await generate(request, chat=True)

        return app

    @staticmethod
    async def _generate_unless_aborted(request: Request, seconds: float) -> bool:
        """Spend ``seconds`` "generating"; False when the client left first (vLLM aborts such a request)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if await request.is_disconnected():
                return False
            await asyncio.sleep(min(left, 0.01))
        return True

    async def _wait_gate(self) -> None:
        """Hold the request while a test keeps ``gate`` closed (a threading.Event: tests may run the engine
        in another thread)."""
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.005)

    async def _stream(self, pieces: list[str], chat: bool, usage: dict[str, Any] | None):  # noqa: ANN202
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        finished = False
        try:
            for i, piece in enumerate(pieces):
                if chat:
                    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": self.model,
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                else:
                    chunk = {"id": "cmpl-fake", "object": "text_completion", "model": self.model,
                             "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                if i == 0:
                    await self._wait_gate()
                if self.fail_mid_stream and i == 1:
                    raise RuntimeError("fake engine crashed mid-stream")
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            if usage is not None:
                yield f"data: {json.dumps({'id': 'cmpl-fake', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self.in_flight -= 1
            if finished:
                self.streams_finished += 1
            else:
                self.streams_cancelled += 1
