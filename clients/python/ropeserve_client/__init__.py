"""Python client for the ropeserve gateway: sync and async clients, typed errors, and a CLI.

    from ropeserve_client import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.complete("Once upon a time", max_tokens=16).text)

    ropeserve-client --url http://127.0.0.1:8000 passkey --lengths 1024,4096 --depths 0.1,0.5,0.9

Depends on httpx and pydantic only; the CLI's progress bar and tables use rich when it is installed
(``pip install 'ropeserve-client[cli]'``) and plain text otherwise.
"""

from ._version import __version__
from .client import DEFAULT_URL, ROPE_FACTOR_HEADER, AsyncClient, AsyncStream, Client, Stream, rope_factor_of
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    IncompleteStreamError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RopeserveError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    error_from_response,
)
from .retry import RetryPolicy, parse_retry_after
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    Model,
    ModelList,
    PasskeyResult,
    Probe,
    Usage,
)

__all__ = [
    "DEFAULT_URL",
    "ROPE_FACTOR_HEADER",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "Client",
    "Completion",
    "ContextLengthExceededError",
    "IncompleteStreamError",
    "InternalServerError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PasskeyResult",
    "PermissionDeniedError",
    "Probe",
    "RateLimitError",
    "RetryPolicy",
    "RopeserveError",
    "ServiceUnavailableError",
    "Stream",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
    "error_from_response",
    "parse_retry_after",
    "rope_factor_of",
]
