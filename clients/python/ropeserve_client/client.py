"""Sync and async clients of the ropeserve gateway (OpenAI-compatible, plus ``rope_factor``).

    from ropeserve_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        out = client.complete("The capital of France is", max_tokens=8)
        print(out.text, out.rope_factor)            # rope_factor: the answer's x-rope-factor header
        for chunk in client.chat_stream("Hello!"):  # server-sent events, one chunk at a time
            print(chunk.content, end="")
        print(client.passkey(4096, depth=0.5, seed=1).passed)

``AsyncClient`` has the same methods as coroutines; its streams are async iterators. Both retry 429 and
503 answers and failed connections according to a :class:`RetryPolicy` (honouring ``Retry-After``), and
raise the typed exceptions of :mod:`ropeserve_client.errors`. Nothing is sent at construction time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, Union

import httpx
from pydantic import BaseModel

from ._version import __version__
from .errors import APIConnectionError, APITimeoutError, IncompleteStreamError, RopeserveError, error_from_response
from .retry import RetryPolicy, parse_retry_after
from .sse import DONE, SSEDecoder
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    ModelList,
    PasskeyResult,
    Probe,
)

DEFAULT_URL = "http://127.0.0.1:8000"
ROPE_FACTOR_HEADER = "x-rope-factor"

M = TypeVar("M", bound=BaseModel)
Messages = Union[str, Sequence[Union[Mapping[str, Any], ChatMessage]]]
# (status, payload) -> True when an error status is an answer to return rather than an error to raise.
Accept = Callable[[int, Any], bool]
# Failures where the request never reached the server: safe to retry, even for a completion.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


def rope_factor_of(headers: Mapping[str, str]) -> float | None:
    """The ``x-rope-factor`` header as a float; None when absent or unreadable."""
    value = headers.get(ROPE_FACTOR_HEADER)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _payload(response: httpx.Response) -> Any:
    """The body as JSON, or as text when it is not JSON (a proxy's error page), or None when empty."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def _messages(messages: Messages) -> list[dict[str, Any]]:
    """A user string, or a list of dicts / ChatMessage, as the JSON list the API takes."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    out = []
    for m in messages:
        out.append(m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m))
    return out


def _is_passkey_result(status: int, payload: Any) -> bool:
    # /healthz/passkey answers 503 with a result body when the key was not retrieved: that is a result,
    # not "unavailable" (which carries an error envelope and is retried).
    return status == 503 and isinstance(payload, dict) and "passed" in payload


def _accept_any(status: int, payload: Any) -> bool:
    return True


def _parse_event(data: str, status: int, model: type[M], rope_factor: float | None) -> M:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise APIConnectionError(f"malformed event in stream: {data[:200]!r}") from exc
    if isinstance(obj, dict) and "error" in obj:
        raise error_from_response(status, obj)
    item = model.model_validate(obj)
    if getattr(item, "rope_factor", None) is None:
        item.rope_factor = rope_factor  # type: ignore[attr-defined]
    return item


def _transport_error(exc: httpx.HTTPError, url: str) -> RopeserveError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to {url} timed out ({type(exc).__name__})")
    return APIConnectionError(f"cannot talk to {url}: {exc or type(exc).__name__}")


class Stream(Generic[M]):
    """A streamed answer: iterate it for chunks. ``rope_factor`` is known as soon as it is returned.
    Use it in a ``with`` block (or exhaust it) so the connection is released."""

    def __init__(self, response: httpx.Response, model: type[M]) -> None:
        self.response = response
        self.rope_factor = rope_factor_of(response.headers)
        self._model = model

    def __iter__(self) -> Iterator[M]:
        decoder, done = SSEDecoder(), False
        status = self.response.status_code
        try:
            for line in self.response.iter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data.strip() == DONE:
                    done = True
                    break
                yield _parse_event(data, status, self._model, self.rope_factor)
            else:
                data = decoder.flush()
                if data is not None and data.strip() == DONE:
                    done = True
                elif data is not None:
                    yield _parse_event(data, status, self._model, self.rope_factor)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, str(self.response.request.url)) from exc
        finally:
            self.close()
        if not done:
            raise IncompleteStreamError("the stream ended before data: [DONE]")

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[M]):
    """The async counterpart of :class:`Stream`: ``async for chunk in stream``."""

    def __init__(self, response: httpx.Response, model: type[M]) -> None:
        self.response = response
        self.rope_factor = rope_factor_of(response.headers)
        self._model = model

    async def __aiter__(self) -> AsyncIterator[M]:
        decoder, done = SSEDecoder(), False
        status = self.response.status_code
        try:
            async for line in self.response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data.strip() == DONE:
                    done = True
                    break
                yield _parse_event(data, status, self._model, self.rope_factor)
            else:
                data = decoder.flush()
                if data is not None and data.strip() == DONE:
                    done = True
                elif data is not None:
                    yield _parse_event(data, status, self._model, self.rope_factor)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, str(self.response.request.url)) from exc
        finally:
            await self.aclose()
        if not done:
            raise IncompleteStreamError("the stream ended before data: [DONE]")

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[M]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Base:
    """What the sync and async clients share: configuration and request bodies (no I/O)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = 600.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.retry = retry if retry is not None else RetryPolicy()
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.headers = {"user-agent": f"ropeserve-client/{__version__}", "accept": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.headers.update(headers or {})

    def _no_read_timeout(self) -> httpx.Timeout:
        """This client's timeouts without a read timeout (the connection still times out)."""
        return httpx.Timeout(connect=self.timeout.connect, read=None, write=self.timeout.write,
                             pool=self.timeout.pool)

    @staticmethod
    def _body(
        model: str,
        max_tokens: int | None,
        temperature: float | None,
        rope_factor: float | None,
        stream: bool,
        params: Mapping[str, Any],
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "stream": stream}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if rope_factor is not None:
            body["rope_factor"] = rope_factor
        body.update(params)
        return body

    @staticmethod
    def _first_model(models: ModelList) -> str:
        if not models.data:
            raise RopeserveError("the gateway lists no model (GET /v1/models is empty)")
        return models.data[0].id

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float:
        return self.retry.delay(attempt, parse_retry_after(response.headers.get("retry-after")))

    @staticmethod
    def _passkey_result(response: httpx.Response, seed: int) -> PasskeyResult:
        result = PasskeyResult.model_validate(response.json())
        if result.rope_factor is None:
            result.rope_factor = rope_factor_of(response.headers)
        if result.seed is None:
            result.seed = seed
        return result

    @staticmethod
    def _probe(response: httpx.Response) -> Probe:
        return Probe(
            ok=response.status_code == 200,
            status_code=response.status_code,
            detail=_payload(response),
            rope_factor=rope_factor_of(response.headers),
        )

    @staticmethod
    def _result(response: httpx.Response, model: type[M]) -> M:
        item = model.model_validate(response.json())
        if getattr(item, "rope_factor", None) is None:
            item.rope_factor = rope_factor_of(response.headers)  # type: ignore[attr-defined]
        return item


class Client(_Base):
    """Blocking client. ``transport`` (e.g. ``httpx.MockTransport``) or ``http_client`` replace the
    network; ``sleep`` is what waits between retries."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = 600.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(base_url, api_key=api_key, model=model, timeout=timeout, retry=retry, headers=headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport)
        self._sleep = sleep

    # -- plumbing ---------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        stream: bool = False,
        accept: Accept | None = None,
        retry: bool = True,
        timeout: float | httpx.Timeout | None = None,
    ) -> httpx.Response:
        url = self.base_url + path
        attempt = 0
        while True:
            request = self._http.build_request(
                method, url, json=json, params=params, headers=self.headers, timeout=timeout or self.timeout
            )
            try:
                response = self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                if retry and isinstance(exc, _CONNECT_ERRORS) and self.retry.should_retry_connect(attempt):
                    self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise _transport_error(exc, url) from exc
            if response.status_code < 400:
                return response
            if stream:
                response.read()
            payload = _payload(response)
            if accept is not None and accept(response.status_code, payload):
                return response
            if retry and self.retry.should_retry_status(response.status_code, attempt):
                response.close()
                self._sleep(self._retry_delay(response, attempt))
                attempt += 1
                continue
            response.close()
            raise error_from_response(
                response.status_code, payload, retry_after=parse_retry_after(response.headers.get("retry-after"))
            )

    def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if not self.model:
            self.model = self._first_model(self.models())
        return self.model

    # -- API --------------------------------------------------------------------------------------
    def complete(
        self,
        prompt: str | list[int],
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> Completion:
        """POST /v1/completions. Extra keyword arguments go into the request body as they are."""
        body = self._body(self._model_name(model), max_tokens, temperature, rope_factor, False, params)
        body["prompt"] = prompt
        return self._result(self._send("POST", "/v1/completions", json=body), Completion)

    def complete_stream(
        self,
        prompt: str | list[int],
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> Stream[Completion]:
        """POST /v1/completions with ``stream: true``; iterate the result for chunks."""
        body = self._body(self._model_name(model), max_tokens, temperature, rope_factor, True, params)
        body["prompt"] = prompt
        return Stream(self._send("POST", "/v1/completions", json=body, stream=True), Completion)

    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> ChatCompletion:
        """POST /v1/chat/completions. ``messages``: a user string or a list of messages."""
        body = self._body(self._model_name(model), max_tokens, temperature, rope_factor, False, params)
        body["messages"] = _messages(messages)
        return self._result(self._send("POST", "/v1/chat/completions", json=body), ChatCompletion)

    def chat_stream(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions with ``stream: true``; iterate the result for chunks."""
        body = self._body(self._model_name(model), max_tokens, temperature, rope_factor, True, params)
        body["messages"] = _messages(messages)
        return Stream(self._send("POST", "/v1/chat/completions", json=body, stream=True), ChatCompletionChunk)

    def models(self) -> ModelList:
        """GET /v1/models."""
        return self._result(self._send("GET", "/v1/models"), ModelList)

    def health(self) -> Probe:
        """GET /healthz: is the gateway process alive? Never retried, never raises on a status."""
        return self._probe(self._send("GET", "/healthz", accept=_accept_any, retry=False))

    def ready(self) -> Probe:
        """GET /readyz: can it serve now (200) or not (503)? Never retried, never raises on a status."""
        return self._probe(self._send("GET", "/readyz", accept=_accept_any, retry=False))

    def wait_ready(self, timeout: float = 300.0, *, interval: float = 1.0) -> Probe:
        """Poll /readyz until it answers 200; APITimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = self.ready()
                if probe.ok:
                    return probe
            except APIConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            self._sleep(interval)

    def passkey(self, length: int, *, depth: float = 0.5, seed: int = 0) -> PasskeyResult:
        """GET /healthz/passkey: hide a key at ``depth`` in a request of ``length`` tokens (the prompt and
        the 10-token answer) and ask for it. A miss is a result (``passed`` False), not an error; 429 (one
        already running) is retried. No read timeout: a long check takes as long as the engine needs."""
        params = {"len": length, "depth": depth, "seed": seed}
        response = self._send("GET", "/healthz/passkey", params=params, accept=_is_passkey_result,
                              timeout=self._no_read_timeout())
        return self._passkey_result(response, seed)

    def passkey_progress(self) -> dict[str, Any]:
        """GET /healthz/passkey/progress: the running check's progress, or ``{"running": False, ...}``."""
        return self._send("GET", "/healthz/passkey/progress", retry=False).json()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: the same methods as :class:`Client`, as coroutines."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout = 600.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        super().__init__(base_url, api_key=api_key, model=model, timeout=timeout, retry=retry, headers=headers)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport)
        self._sleep = sleep

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        stream: bool = False,
        accept: Accept | None = None,
        retry: bool = True,
        timeout: float | httpx.Timeout | None = None,
    ) -> httpx.Response:
        url = self.base_url + path
        attempt = 0
        while True:
            request = self._http.build_request(
                method, url, json=json, params=params, headers=self.headers, timeout=timeout or self.timeout
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                if retry and isinstance(exc, _CONNECT_ERRORS) and self.retry.should_retry_connect(attempt):
                    await self._sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise _transport_error(exc, url) from exc
            if response.status_code < 400:
                return response
            if stream:
                await response.aread()
            payload = _payload(response)
            if accept is not None and accept(response.status_code, payload):
                return response
            if retry and self.retry.should_retry_status(response.status_code, attempt):
                await response.aclose()
                await self._sleep(self._retry_delay(response, attempt))
                attempt += 1
                continue
            await response.aclose()
            raise error_from_response(
                response.status_code, payload, retry_after=parse_retry_after(response.headers.get("retry-after"))
            )

    async def _model_name(self, model: str | None) -> str:
        if model:
            return model
        if not self.model:
            self.model = self._first_model(await self.models())
        return self.model

    async def complete(
        self,
        prompt: str | list[int],
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> Completion:
        body = self._body(await self._model_name(model), max_tokens, temperature, rope_factor, False, params)
        body["prompt"] = prompt
        return self._result(await self._send("POST", "/v1/completions", json=body), Completion)

    async def complete_stream(
        self,
        prompt: str | list[int],
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> AsyncStream[Completion]:
        body = self._body(await self._model_name(model), max_tokens, temperature, rope_factor, True, params)
        body["prompt"] = prompt
        return AsyncStream(await self._send("POST", "/v1/completions", json=body, stream=True), Completion)

    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> ChatCompletion:
        body = self._body(await self._model_name(model), max_tokens, temperature, rope_factor, False, params)
        body["messages"] = _messages(messages)
        return self._result(await self._send("POST", "/v1/chat/completions", json=body), ChatCompletion)

    async def chat_stream(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = None,
        rope_factor: float | None = None,
        **params: Any,
    ) -> AsyncStream[ChatCompletionChunk]:
        body = self._body(await self._model_name(model), max_tokens, temperature, rope_factor, True, params)
        body["messages"] = _messages(messages)
        response = await self._send("POST", "/v1/chat/completions", json=body, stream=True)
        return AsyncStream(response, ChatCompletionChunk)

    async def models(self) -> ModelList:
        return self._result(await self._send("GET", "/v1/models"), ModelList)

    async def health(self) -> Probe:
        return self._probe(await self._send("GET", "/healthz", accept=_accept_any, retry=False))

    async def ready(self) -> Probe:
        return self._probe(await self._send("GET", "/readyz", accept=_accept_any, retry=False))

    async def wait_ready(self, timeout: float = 300.0, *, interval: float = 1.0) -> Probe:
        deadline = time.monotonic() + timeout
        while True:
            try:
                probe = await self.ready()
                if probe.ok:
                    return probe
            except APIConnectionError:
                pass
            if time.monotonic() >= deadline:
                raise APITimeoutError(f"{self.base_url} not ready after {timeout:g} s")
            await self._sleep(interval)

    async def passkey(self, length: int, *, depth: float = 0.5, seed: int = 0) -> PasskeyResult:
        params = {"len": length, "depth": depth, "seed": seed}
        response = await self._send("GET", "/healthz/passkey", params=params, accept=_is_passkey_result,
                                    timeout=self._no_read_timeout())
        return self._passkey_result(response, seed)

    async def passkey_progress(self) -> dict[str, Any]:
        return (await self._send("GET", "/healthz/passkey/progress", retry=False)).json()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
