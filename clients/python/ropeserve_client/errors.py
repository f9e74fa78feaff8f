"""Typed exceptions of the ropeserve client, and the one pure function that produces them.

Every error the client raises derives from :class:`RopeserveError`. An HTTP error answer becomes an
exception in exactly one place, :func:`error_from_response`, from ``(status, payload)`` alone, so the
mapping is testable without a server. The server's own message reaches the user unchanged:
``str(err) == err.message`` is the text the gateway wrote, and the rest of its OpenAI envelope
(``type``, ``param``, ``code``) stays on the exception.

    try:
        client.complete(long_prompt)
    except ContextLengthExceededError as err:
        print(err.message, err.status_code)
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class RopeserveError(Exception):
    """Base class of every error raised by ``ropeserve_client``."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI envelope's field name
        param: str | None = None,
        code: str | int | None = None,
        payload: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code
        self.payload = payload
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status_code={self.status_code!r}, code={self.code!r}, message={self.message!r})"


class APIConnectionError(RopeserveError):
    """The gateway could not be reached, or the connection broke before an answer."""


class APITimeoutError(APIConnectionError):
    """The request ran past the client's timeout."""


class IncompleteStreamError(RopeserveError):
    """A streamed answer ended without its closing ``data: [DONE]`` line."""


class APIStatusError(RopeserveError):
    """The gateway answered with an error status. Subclasses name the common ones."""


class BadRequestError(APIStatusError):
    """400: the request is invalid."""


class ContextLengthExceededError(BadRequestError):
    """400 with code ``context_length_exceeded``: prompt plus ``max_tokens`` exceed what can be served."""


class AuthenticationError(APIStatusError):
    """401: missing or invalid API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such route or model."""


class UnprocessableEntityError(APIStatusError):
    """422: the request body failed the server's schema."""


class RateLimitError(APIStatusError):
    """429: too many requests (or a passkey check already running); see ``retry_after``."""


class InternalServerError(APIStatusError):
    """5xx other than 503: the gateway or an engine failed."""


class ServiceUnavailableError(APIStatusError):
    """503: no engine is ready to take the request."""


# Codes the gateway sets in its envelope that name a more precise class than the status alone.
_BY_CODE: dict[str, type[APIStatusError]] = {
    "context_length_exceeded": ContextLengthExceededError,
    "invalid_api_key": AuthenticationError,
    "rate_limit_exceeded": RateLimitError,
}

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def _fields(payload: Any) -> dict[str, Any]:
    """message/type/param/code from any error body the gateway, vLLM or a proxy may send."""
    if isinstance(payload, dict):
        inner = payload.get("error")
        if isinstance(inner, dict):  # OpenAI envelope: {"error": {"message", "type", "param", "code"}}
            return {k: inner.get(k) for k in ("message", "type", "param", "code")}
        if isinstance(inner, str):  # {"error": "text"}
            return {"message": inner}
        if "message" in payload:  # vLLM's flat ErrorResponse: {"object": "error", "message", ..., "code": 400}
            return {k: payload.get(k) for k in ("message", "type", "param", "code")}
        detail = payload.get("detail")
        if isinstance(detail, str):  # FastAPI's HTTPException
            return {"message": detail}
        if isinstance(detail, list):  # FastAPI's validation errors
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(p) for p in item.get("loc", ()))
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
                else:
                    parts.append(str(item))
            return {"message": "; ".join(parts)}
    if isinstance(payload, str) and payload.strip():
        return {"message": payload.strip()}
    return {}


def _reason(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def error_from_response(status: int, payload: Any, *, retry_after: float | None = None) -> APIStatusError:
    """The exception for an error answer: ``status`` (the HTTP status) and ``payload`` (the decoded JSON
    body, or its text when it was not JSON, or None). Pure: no I/O, no clock.

    The class comes from the envelope's ``code`` when it names one (``context_length_exceeded``, ...),
    else from the status; an error reported inside a 200 stream takes its numeric ``code`` as its
    status, or 500.
    """
    fields = _fields(payload)
    code = fields.get("code")
    effective = status
    if status < 400:  # an error event inside a 200 stream: its numeric code, else a server error
        effective = code if isinstance(code, int) and 400 <= code < 600 else 500
    cls: type[APIStatusError]
    if isinstance(code, str) and code in _BY_CODE:
        cls = _BY_CODE[code]
    elif effective in _BY_STATUS:
        cls = _BY_STATUS[effective]
    elif effective >= 500:
        cls = InternalServerError
    else:
        cls = APIStatusError
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = _reason(effective)
    return cls(
        message,
        status_code=effective,
        type=fields.get("type"),
        param=fields.get("param"),
        code=code,
        payload=payload,
        retry_after=retry_after,
    )
