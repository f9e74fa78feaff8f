"""The gateway's typed errors and the one place that turns any error into OpenAI's error envelope.

Code raises :class:`GatewayError` subclasses (or rope_ext's :class:`RopeConfigError`); handlers never build
error bodies themselves. :func:`error_response` maps every exception the gateway meets (ours, rope_ext's,
FastAPI's validation errors, Starlette's HTTP errors for 404/405, and anything unexpected) to
``{"error": {"message", "type", "param", "code"}}`` with the right status; :func:`install_error_handlers`
registers it on an app, and the ASGI middlewares call it directly::

    raise ContextLengthExceeded("This model's maximum context length is 65536 tokens ...", param="max_tokens")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rope_ext import RopeConfigError

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class PasskeyBusy(GatewayError):
    """A passkey self-check is already running; the caller retries after ``retry_after`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "passkey_check_running"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NoEngineAvailable(GatewayError):
    """No engine is ready, or every ready engine refused the connection."""

    status_code = 503
    error_type = "server_error"
    code = "no_engine_available"


class ClientClosedRequest(GatewayError):
    """The client disconnected before its answer was ready (nginx's 499: no one reads it; it is for the
    metrics and the logs)."""

    status_code = 499
    error_type = "invalid_request_error"
    code = "client_closed_request"


class ShuttingDown(GatewayError):
    """The gateway is stopping and its grace period for in-flight requests is over."""

    status_code = 503
    error_type = "server_error"
    code = "server_shutting_down"


class EngineUnavailable(GatewayError):
    """The embedded engine could not be started."""

    status_code = 503
    error_type = "server_error"
    code = "engine_unavailable"


class EngineTimeout(GatewayError):
    status_code = 504
    error_type = "server_error"
    code = "engine_timeout"


class EngineConnectionLost(GatewayError):
    status_code = 502
    error_type = "server_error"
    code = "engine_connection_lost"


class EngineError(GatewayError):
    """An error response of an engine: its status and its own envelope fields are kept."""

    def __init__(self, status_code: int, body: bytes) -> None:
        fields = parse_engine_error(body)
        super().__init__(fields["message"], param=fields["param"])
        self.status_code = status_code
        self.error_type = fields["type"] or ("invalid_request_error" if status_code < 500 else "server_error")
        self.code = fields["code"]


def parse_engine_error(body: bytes) -> dict[str, Any]:
    """The envelope fields of an engine's error body (vLLM's ``{"error": {...}}``, its older flat form,
    or any text), with ``message`` always set."""
    fields: dict[str, Any] = {"message": None, "type": None, "param": None, "code": None}
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error") if isinstance(data.get("error"), dict) else data
        for key in fields:
            if inner.get(key) is not None:
                fields[key] = inner[key]
        if fields["message"] is None and isinstance(data.get("detail"), str):
            fields["message"] = data["detail"]
    if not isinstance(fields["message"], str) or not fields["message"]:
        text = body.decode("utf-8", "replace").strip()[:500]
        fields["message"] = f"engine error: {text}" if text else "engine error (empty response)"
    return fields


_HTTP_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


_UNREADABLE = {UnicodeDecodeError: "The request body is not valid UTF-8",
               RecursionError: "The request body is nested too deeply"}


def _json_error(exc: RequestValidationError) -> str | None:
    """The message for a body that is not JSON at all (FastAPI reports it as a validation error located at
    the character offset, which must not become the ``param``), else None."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            loc = tuple(error.get("loc", ()))
            where = f" (at character {loc[-1]})" if loc and isinstance(loc[-1], int) else ""
            reason = str((error.get("ctx") or {}).get("error") or error.get("msg") or "invalid JSON")
            return f"The request body is not valid JSON: {reason.removesuffix(' at')}{where}"
    return None


def envelope(message: str, error_type: str, *, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _validation_where(loc: tuple[Any, ...]) -> list[str]:
    return [str(part) for part in loc if part not in ("body", "query", "path", "header")]


def error_response(exc: BaseException) -> JSONResponse:
    """THE mapping from an exception to an enveloped JSON response (status, body, headers)."""
    headers: dict[str, str] = {}
    if isinstance(exc, GatewayError):
        status, headers = exc.status_code, exc.headers
        body = envelope(exc.message, exc.error_type, param=exc.param, code=exc.code)
    elif isinstance(exc, RopeConfigError):
        status = 400
        body = envelope(str(exc), "invalid_request_error", param=exc.field, code="invalid_rope_setting")
    elif isinstance(exc, RequestValidationError) and _json_error(exc):
        status = 400
        body = envelope(_json_error(exc), "invalid_request_error", code="invalid_json")
    elif isinstance(exc, RequestValidationError):
        status = 400
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = _validation_where(tuple(first.get("loc", ())))
        param = where[0] if where else None  # the top-level field, as OpenAI names it
        message = "; ".join(
            f"{'.'.join(_validation_where(tuple(e.get('loc', ())))) or 'body'}: "
            f"{str(e.get('msg')).removeprefix('Value error, ')}"
            for e in errors[:5]
        ) or "invalid request"
        body = envelope(message, "invalid_request_error", param=param, code="invalid_value")
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        headers = dict(exc.headers or {})
        error_type = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        unreadable = _UNREADABLE.get(type(exc.__cause__)) if status == 400 else None
        if unreadable:  # FastAPI's "There was an error parsing the body" says neither what nor where
            body = envelope(f"{unreadable}: {exc.__cause__}", error_type, code="invalid_json")
        else:
            body = envelope(str(exc.detail), error_type, code=_HTTP_CODES.get(status))
    else:
        logger.error("unexpected error", exc_info=(type(exc), exc, exc.__traceback__))
        status = 500
        body = envelope("internal error in the gateway", "server_error", code="internal_error")
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception class the app may raise through :func:`error_response`."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for exc_class in (GatewayError, RopeConfigError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, handle)
