"""error_from_response: every branch of the (status, payload) -> exception mapping, and the promise that
the server's message reaches the user intact."""

from __future__ import annotations

import copy

import pytest

from ropeserve_client import errors as E
from ropeserve_client.errors import error_from_response


def env(message, code=None, type_="invalid_request_error", param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@pytest.mark.parametrize(
    "status, payload, cls",
    [
        (400, env("too long", "context_length_exceeded"), E.ContextLengthExceededError),
        (400, env("bad temperature", "invalid_value", param="temperature"), E.BadRequestError),
        (401, env("Invalid API key", "invalid_api_key", "authentication_error"), E.AuthenticationError),
        (401, {"detail": "Not authenticated"}, E.AuthenticationError),
        (403, env("forbidden", None, "permission_error"), E.PermissionDeniedError),
        (404, {"detail": "Not Found"}, E.NotFoundError),
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]},
         E.UnprocessableEntityError),
        (429, env("a passkey check is already running", "rate_limit_exceeded", "rate_limit_error"), E.RateLimitError),
        (429, None, E.RateLimitError),
        (503, env("no engine is ready", "engine_unavailable", "service_unavailable"), E.ServiceUnavailableError),
        (500, env("engine crashed", None, "internal_error"), E.InternalServerError),
        (502, "<html>bad gateway</html>", E.InternalServerError),
        (504, None, E.InternalServerError),
        (409, env("conflict", None), E.APIStatusError),
        (418, {}, E.APIStatusError),
    ],
)
def test_status_and_code_pick_the_class(status, payload, cls):
    err = error_from_response(status, payload)
    assert type(err) is cls
    assert isinstance(err, E.APIStatusError) and isinstance(err, E.RopeserveError)
    assert err.status_code == status
    assert err.payload is payload


def test_code_wins_over_status():
    # An envelope's code names the class even when the status is a generic one.
    assert type(error_from_response(400, env("x", "invalid_api_key"))) is E.AuthenticationError
    assert type(error_from_response(503, env("x", "context_length_exceeded"))) is E.ContextLengthExceededError
    # An unknown code falls back to the status.
    assert type(error_from_response(400, env("x", "something_else"))) is E.BadRequestError


def test_context_length_is_a_bad_request():
    err = error_from_response(400, env("too long", "context_length_exceeded"))
    assert isinstance(err, E.BadRequestError)


def test_envelope_fields_and_message_intact():
    message = "This model's maximum context length is 65536 tokens.\nHowever, you requested 70000 (prompt: «…»)."
    err = error_from_response(400, env(message, "context_length_exceeded", param="messages"))
    assert str(err) == err.message == message
    assert (err.type, err.param, err.code) == ("invalid_request_error", "messages", "context_length_exceeded")
    assert "ContextLengthExceededError" in repr(err) and "400" in repr(err)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"object": "error", "message": "vLLM says no", "type": "BadRequestError", "param": None, "code": 400},
         "vLLM says no"),  # vLLM's flat ErrorResponse
        ({"error": "plain error text"}, "plain error text"),
        ({"detail": "Not Found"}, "Not Found"),
        ({"detail": [{"loc": ["body", "prompt"], "msg": "Field required"}, {"msg": "other"}, "raw"]},
         "body.prompt: Field required; other; raw"),
        ("  upstream timed out  ", "upstream timed out"),
        (None, "HTTP 400 Bad Request"),
        ("", "HTTP 400 Bad Request"),
        ({}, "HTTP 400 Bad Request"),
        ({"error": {"message": None}}, "HTTP 400 Bad Request"),
        ([1, 2], "HTTP 400 Bad Request"),
    ],
)
def test_message_from_any_body(payload, message):
    assert error_from_response(400, payload).message == message


def test_unknown_status_reason():
    err = error_from_response(599, None)
    assert err.message == "HTTP 599" and type(err) is E.InternalServerError


def test_flat_vllm_payload_keeps_numeric_code():
    err = error_from_response(400, {"object": "error", "message": "m", "type": "BadRequestError", "code": 400})
    assert err.code == 400 and err.type == "BadRequestError" and type(err) is E.BadRequestError


@pytest.mark.parametrize(
    "payload, cls, status",
    [
        ({"error": {"message": "too long", "code": 400}}, E.BadRequestError, 400),
        ({"error": {"message": "overloaded", "code": 503}}, E.ServiceUnavailableError, 503),
        ({"error": {"message": "boom"}}, E.InternalServerError, 500),
        ({"error": {"message": "too long", "code": "context_length_exceeded"}}, E.ContextLengthExceededError, 500),
        ({"error": {"message": "odd", "code": 700}}, E.InternalServerError, 500),
    ],
)
def test_error_event_inside_a_200_stream(payload, cls, status):
    err = error_from_response(200, payload)
    assert type(err) is cls and err.status_code == status


def test_retry_after_is_carried():
    err = error_from_response(429, None, retry_after=2.5)
    assert err.retry_after == 2.5
    assert error_from_response(429, None).retry_after is None


def test_pure():
    payload = env("same", "context_length_exceeded")
    before = copy.deepcopy(payload)
    a, b = error_from_response(400, payload), error_from_response(400, payload)
    assert a is not b and repr(a) == repr(b)
    assert payload == before


def test_one_base_class():
    for name in E.__dict__:
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, E.RopeserveError), name
    assert issubclass(E.APITimeoutError, E.APIConnectionError)
    assert issubclass(E.IncompleteStreamError, E.RopeserveError)
