"""The OpenAI generation routes' work: count the prompt, admit, forward to an engine, relay the answer.

For every request: the prompt's tokens are counted with the served model's tokenizer in the gateway when it
has one (:class:`server.tokens.LocalTokenCounter`: completion texts and plain chats), otherwise by an
engine's ``/tokenize`` (which applies the chat template for chat); :func:`server.admission.admit` refuses what cannot fit and chooses the RoPE factor, and
the request goes to the least-loaded healthy engine as the client sent it (a ``rope_factor`` override, or
``rope_method: "default"``, as ``vllm_xargs.rope_factor``); the engine decides the factor with the same
policy. Non-streaming answers are returned as the engine wrote them;
streams are relayed chunk by chunk as they arrive, and closing the client connection closes the engine's
stream (vLLM then aborts the request); a client that leaves before a non-streaming answer is ready has its
engine call cancelled the same way (:func:`unless_client_leaves`).

The factor, reported without trailers so that any OpenAI client can read it: ``x-rope-factor`` is the factor
the request starts at (on every answer, streaming or not). A request that grows past its bucket ends at a
larger one, known once its usage is: a non-streaming answer (one choice) also carries
``x-rope-factor-final``, and a stream's usage chunk (``stream_options.include_usage``) carries a top-level
``"rope_factor": {"start": s, "final": f}``. Both are computed from the usage by
:func:`server.admission.final_factor`, the engine's own growth rule::

    generation = Generation(pool, scaling, "SmolLM2-135M-Instruct", metrics)
    response = await generation.handle("/v1/chat/completions", ChatCompletionRequest(...))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx

from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from rope_ext import RopeConfigError, RopeScaling, format_factor, validate_override
from server.admission import Admission, admit, final_factor, resolve_override
from server.errors import (
    ClientClosedRequest,
    EngineError,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    envelope,
    error_response,
)
from server.messages import MessageError, validate_messages
from server.metrics import GatewayMetrics
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.tokens import LocalTokenCounter
from server.upstreams import EnginePool, Lease

logger = logging.getLogger(__name__)

FACTOR_HEADER = "x-rope-factor"
FINAL_FACTOR_HEADER = "x-rope-factor-final"
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


class Generation:
    def __init__(self, pool: EnginePool, scaling: RopeScaling, model: str, metrics: GatewayMetrics,
                 counter: LocalTokenCounter | None = None) -> None:
        self.pool = pool
        self.scaling = scaling
        self.model = model
        self.metrics = metrics
        self.counter = counter

    def resolve_model(self, requested: str | None) -> str:
        if requested is None or requested == self.model:
            return self.model
        raise ModelNotFound(f"The model `{requested}` does not exist. This gateway serves `{self.model}`.",
                            param="model")

    # --- token counting: the local tokenizer, or the engine's /tokenize ---------------------------------

    async def count_text(self, text: str, *, add_special_tokens: bool = True) -> int:
        if self.counter is not None:
            return await self.counter.count_text(text, add_special_tokens=add_special_tokens)
        result = await self.pool.post_json(
            "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens})
        return int(result["count"])

    async def count_prompt(self, request: CompletionRequest | ChatCompletionRequest) -> int:
        """Tokens of the longest prompt of the request (a batch of prompts shares one factor)."""
        if isinstance(request, ChatCompletionRequest):
            if self.counter is not None and (count := await self.counter.count_chat(request)) is not None:
                return count
            result = await self.pool.post_json("/tokenize", request.tokenize_body(self.model))
            return int(result["count"])
        prompt = request.prompt
        if isinstance(prompt, str):
            return await self.count_text(prompt, add_special_tokens=request.add_special_tokens)
        if all(isinstance(p, int) for p in prompt):
            return len(prompt)
        counts = [len(p) for p in prompt if isinstance(p, list)]
        counts += await asyncio.gather(*(
            self.count_text(p, add_special_tokens=request.add_special_tokens) for p in prompt if isinstance(p, str)
        ))
        return max(counts)

    # --- admission and forwarding ---------------------------------------------------------------------

    async def admit(self, route: str, request: CompletionRequest | ChatCompletionRequest
                    ) -> tuple[Admission, dict[str, Any]]:
        """The admission of a request (recorded in the metrics) and the body to send to the engine."""
        model = self.resolve_model(request.model)
        if isinstance(request, ChatCompletionRequest):
            try:  # as OpenAI validates them: a malformed message never reaches a chat template
                validate_messages(request.messages)
            except MessageError as exc:
                self.metrics.rejected.inc()
                raise InvalidRequest(str(exc), param=exc.param, code="invalid_value") from None
        xargs = dict(request.vllm_xargs or {})
        prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
        with self._counting_rejections():
            override = resolve_override(request.rope_factor, request.rope_method, xargs.get("rope_factor"),
                                        self.scaling)
            if override is not None:  # refuse a bad factor before it costs a tokenization
                validate_override(override, self.scaling)
        prompt_tokens = await self.count_prompt(request)
        with self._counting_rejections():
            admission = admit(prompt_tokens, request.max_new_tokens(), self.scaling, override=override,
                              prompt_param=prompt_param)
        self.metrics.rope_factor.observe(admission.factor)
        self.metrics.prompt_tokens.labels(route).inc(admission.prompt_tokens)
        body = request.forwarded()
        body["model"] = model
        if override is not None:  # the client's choice; otherwise the engine's policy decides
            xargs["rope_factor"] = override
        if xargs:
            body["vllm_xargs"] = xargs
        return admission, body

    @contextlib.contextmanager
    def _counting_rejections(self) -> Iterator[None]:
        try:
            yield
        except (GatewayError, RopeConfigError):
            self.metrics.rejected.inc()
            raise

    async def handle(self, route: str, request: CompletionRequest | ChatCompletionRequest) -> Response:
        """Serve one client request of ``route`` (``COMPLETIONS`` or ``CHAT``)."""
        admission, body = await self.admit(route, request)
        headers = {FACTOR_HEADER: format_factor(admission.factor)}
        single = request.n in (None, 1)
        if request.stream:
            return await self._stream(route, body, headers, admission if single else None)
        data, raw = await self.post(route, body)
        final = self.final(admission, data.get("usage")) if single else None
        if final is not None:
            headers[FINAL_FACTOR_HEADER] = format_factor(final)
        return Response(raw, media_type="application/json", headers=headers)

    def final(self, admission: Admission, usage: Any) -> float | None:
        """The factor a finished request ended at, from its usage (recorded in the metrics), or None."""
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            return None
        prompt = usage.get("prompt_tokens")
        final = final_factor(admission, prompt if isinstance(prompt, int) else admission.prompt_tokens,
                             usage["completion_tokens"], self.scaling)
        self.metrics.rope_factor_final.observe(final)
        return final

    async def complete(self, metrics_route: str, request: CompletionRequest, *,
                       timeout: Any = httpx.USE_CLIENT_DEFAULT) -> tuple[Admission, dict[str, Any]]:
        """A non-streaming completion made by the gateway itself (the passkey check), admitted like any
        request; metrics are recorded under ``metrics_route``. ``timeout=None``: no read timeout (the
        connection timeout stays)."""
        admission, body = await self.admit(metrics_route, request)
        data, _ = await self.post(COMPLETIONS, body, metrics_route=metrics_route, timeout=timeout)
        return admission, data

    async def post(self, route: str, body: dict[str, Any], *, metrics_route: str | None = None,
                   timeout: Any = httpx.USE_CLIENT_DEFAULT) -> tuple[dict[str, Any], bytes]:
        """A non-streaming generation call; returns the parsed and the raw answer."""

        def build(engine):
            wait = timeout if timeout is httpx.USE_CLIENT_DEFAULT or timeout is not None else httpx.Timeout(
                None, connect=engine.client.timeout.connect)
            return engine.client.build_request("POST", route, json=body, timeout=wait)

        lease, response = await self.pool.send(build)
        lease.release()
        if response.status_code >= 400:
            raise EngineError(response.status_code, response.content)
        data = response.json()
        self._count_usage(metrics_route or route, data)
        return data, response.content

    async def _stream(self, route: str, body: dict[str, Any], headers: dict[str, str],
                      admission: Admission | None) -> Response:
        lease, response = await self.pool.send(
            lambda engine: engine.client.build_request("POST", route, json=body), stream=True)
        if response.status_code >= 400:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
                lease.release()
            raise EngineError(response.status_code, content)
        headers = {**headers, "cache-control": "no-cache", "x-accel-buffering": "no"}
        scanner = UsageScanner(None if admission is None else lambda usage: self._factor_field(admission, usage))

        async def close() -> None:
            """Close the engine stream and end the lease, once, however the relay ends (also when it never
            started because the client was already gone)."""
            if lease.released:
                return
            lease.release()
            with anyio.CancelScope(shield=True):  # the client may have gone: still close the engine stream
                await response.aclose()
            if scanner.completion_tokens is not None:
                self.metrics.generated_tokens.labels(route).inc(scanner.completion_tokens)

        return RelayResponse(self._relay(lease, response, scanner, close), close=close,
                             media_type="text/event-stream", headers=headers)

    async def _relay(self, lease: Lease, response: httpx.Response, scanner: UsageScanner,
                     close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
        started = time.monotonic()
        try:
            async for chunk in response.aiter_bytes():  # as they arrive (decoded if the engine compressed)
                if out := scanner.feed(chunk):
                    yield out
            if rest := scanner.flush():
                yield rest
        except httpx.TimeoutException:
            timeout = lease.engine.client.timeout.read
            logger.warning("engine %s sent nothing for %s s mid-stream; ending the stream", lease.engine.url,
                           timeout)
            error = envelope(f"the engine sent nothing for {timeout:g} s (the request timeout) while streaming",
                             "server_error", code="engine_timeout")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        except httpx.HTTPError as exc:
            logger.warning("engine %s failed mid-stream after %.1f s: %s", lease.engine.url,
                           time.monotonic() - started, exc)
            error = envelope(f"the engine failed while streaming: {type(exc).__name__}", "server_error",
                             code="engine_connection_lost")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await close()

    def _factor_field(self, admission: Admission, usage: dict[str, Any]) -> dict[str, float] | None:
        final = self.final(admission, usage)
        return None if final is None else {"start": admission.factor, "final": final}

    def _count_usage(self, route: str, data: Any) -> None:
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.metrics.generated_tokens.labels(route).inc(usage["completion_tokens"])


async def unless_client_leaves(receive: Receive, work: Awaitable[Response]) -> Response:
    """``work``'s response, or, when the client disconnects first, a 499 after cancelling ``work``.

    Cancelling closes the engine connection of a call in progress, and vLLM aborts a request whose client
    left: an abandoned non-streaming request stops costing engine time at once, not when its answer is done
    (streams are watched by the streaming response itself). ``receive`` is the request's, its body already
    read: its next message is the disconnect."""
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("the client left before its answer was ready; the engine request was cancelled")
    return error_response(ClientClosedRequest("the client closed the connection before the answer was ready"))


class UsageScanner:
    """Reads the ``usage`` of an SSE stream as it is relayed, and adds the request's ``rope_factor`` to the
    chunk that carries it (``annotate(usage)`` gives the field, or None). Other lines pass through
    untouched; a line is sent on once it is whole (vLLM writes whole events, so nothing waits)."""

    def __init__(self, annotate: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None) -> None:
        self._pending = b""
        self._annotate = annotate
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send on for ``chunk`` (the same bytes, unless a usage line was rewritten)."""
        data = self._pending + chunk
        head, newline, self._pending = data.rpartition(b"\n")  # a line still arriving waits until it is whole
        data = head + newline
        if b'"completion_tokens"' not in data:
            return data
        return b"\n".join(self._line(line) for line in data.split(b"\n"))

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    def _line(self, line: bytes) -> bytes:
        if not (line.startswith(b"data:") and b'"completion_tokens"' in line):
            return line
        try:
            event = json.loads(line[5:])
            usage = event.get("usage")
        except (ValueError, AttributeError):
            return line
        if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
            return line
        self.completion_tokens = usage["completion_tokens"]
        field = self._annotate(usage) if self._annotate is not None else None
        if field is None:
            return line
        event["rope_factor"] = field
        return b"data: " + json.dumps(event, separators=(",", ":")).encode()


class RelayResponse(StreamingResponse):
    """A streaming response that always runs ``close`` (closing the engine's stream) when it ends, including
    when the client disconnects, even before the first chunk."""

    def __init__(self, content: AsyncIterator[bytes], *, close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._close()
