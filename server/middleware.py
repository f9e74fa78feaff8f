"""The gateway's pure-ASGI middlewares (pure ASGI so streamed responses pass through untouched).

- :class:`RequestMetricsMiddleware`: counts every request by route template, method and status, and times it
  to the last byte of the response (so a stream's latency is its whole duration).
- :class:`ApiKeyMiddleware`: when API keys are configured, every route except ``/healthz`` and ``/readyz``
  needs ``Authorization: Bearer <key>``; keys are compared in constant time (``hmac.compare_digest``).
- :class:`BodyLimitMiddleware`: refuses bodies over ``max_body_bytes`` with 413, by their Content-Length or
  while reading them, then replays the body to the app.
- :class:`EndOnCancelMiddleware`: a request the server cancels (uvicorn does, to those still running when the
  shutdown grace period is over) ends cleanly: a 503 if nothing was sent yet, an error event and
  ``data: [DONE]`` for a stream, instead of a connection cut mid-body.

Their error responses come from :func:`server.errors.error_response`, like every other error.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Iterable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationFailed, PayloadTooLarge, ShuttingDown, envelope, error_response
from server.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
SHUTDOWN_MESSAGE = "the gateway is shutting down and its grace period for this request is over; retry"


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, scope["method"], str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


def key_matches(token: bytes | None, keys: list[bytes]) -> bool:
    """True when ``token`` equals one of ``keys``; every key is compared, each in constant time."""
    if token is None:
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and self.keys and scope["path"] not in PUBLIC_PATHS
                and not key_matches(bearer_token(scope["headers"]), self.keys)):
            error = AuthenticationFailed(
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                headers={"WWW-Authenticate": "Bearer"})
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"Request body too large: the limit is {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await error_response(self._too_large())(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls wait for the client's disconnect, as usual

        await self.app(scope, replay, send)


class EndOnCancelMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = event_stream = False

        async def watched(message: Message) -> None:
            nonlocal started, finished, event_stream
            if message["type"] == "http.response.start":
                started = True
                event_stream = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                                   for name, value in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if finished or (started and not event_stream):
                raise  # nothing clean left to say
            logger.warning("ending %s %s: the shutdown grace period is over", scope["method"], scope["path"])
            with anyio.CancelScope(shield=True):
                try:
                    if not started:
                        await error_response(ShuttingDown(SHUTDOWN_MESSAGE))(scope, receive, watched)
                    else:
                        error = envelope(SHUTDOWN_MESSAGE, "server_error", code=ShuttingDown.code)
                        await watched({"type": "http.response.body", "more_body": False,
                                       "body": f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()})
                except OSError:  # the client is gone as well
                    pass
            # The response is complete: end the request normally (re-raising would make uvicorn log it as a
            # crash and cut the connection it just finished).
