"""Request models of the OpenAI routes: the fields the gateway reads, validated; everything else passes through.

Both models allow extra fields (``n``, ``stop``, ``logprobs``, ``echo``, ``seed``, ``temperature``, vLLM's
own...), which reach the engine unchanged. Our extensions, stripped before forwarding:

- ``rope_factor`` (number >= 1, at most the served maximum factor): run the request at this scale
  instead of the policy's choice; it is rounded up to a bucket, and never below the fine-tuned factor.
  ``vllm_xargs.rope_factor`` is read the same way.
- ``rope_method`` (a rope_ext method name): ``"default"`` runs the request with plain RoPE (factor 1,
  the unscaled model, for A/B comparisons); the served method (e.g. ``"dynamic_yarn"``) is the normal
  behaviour; any other known method is refused with 400, as the engine does not serve it.

The sampling fields whose bad values the engine would refuse anyway (``n``, ``temperature``, ``top_p``,
``max_tokens``) are checked here with vLLM's bounds, ``n`` capped at OpenAI's 128, so a bad request is a 400
before it costs a tokenization; and a body must be JSON the engine can read (no NaN or Infinity, no lone
UTF-16 surrogate in a string: both pass Python's JSON parser and break the forwarded request).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rope_ext import METHODS

ROPE_FIELDS = frozenset({"rope_factor", "rope_method"})
MAX_N = 128  # OpenAI's limit on completions per request (vLLM allows 16384: a cheap way to flood an engine)

# A strict JSON integer (not true, not "10", not 2.0), as OpenAI's API reads it.
TokenCount = Annotated[int, Field(strict=True, ge=1)]
TokenId = Annotated[int, Field(strict=True, ge=0)]


def json_problem(value: Any, where: str = "") -> str | None:
    """What makes ``value`` (parsed JSON) impossible to forward as JSON, and where, or None.

    Python's parser accepts ``NaN``, ``Infinity`` and ``"\\ud800"``; encoding them again for the engine fails
    (a 500 in the gateway before this check)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where or 'the body'} holds {value!r}, which is not a number JSON allows"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{where or 'the body'} holds a lone surrogate ({value[exc.start]!r}), which is not valid "
                    "Unicode")
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = json_problem(key, where) or json_problem(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class RopeFields(BaseModel):
    """The fields shared by both routes: the per-request RoPE controls and the sampling bounds."""

    model_config = ConfigDict(extra="allow")

    n: int | None = Field(None, ge=1, le=MAX_N, strict=True, description="Completions to generate.")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, strict=True,
                                      description="Sampling temperature in [0, 2] (0: greedy).")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, strict=True,
                                description="Nucleus sampling mass in (0, 1].")

    rope_factor: float | None = Field(
        None, ge=1, allow_inf_nan=False, strict=True,
        description="Scale factor to run this request at (rounded up to a bucket) instead of the policy's.")
    rope_method: str | None = Field(
        None, description="'default' for plain RoPE (factor 1); the served method for normal behaviour.")

    @field_validator("rope_method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        if value is not None and value not in METHODS:
            raise ValueError(f"unknown method {value!r}; known methods: {', '.join(sorted(METHODS))}")
        return value

    @model_validator(mode="after")
    def _forwardable(self) -> RopeFields:
        body = self.model_dump(exclude_unset=True)
        try:  # the fast path: C encoding, as the forwarding will do it
            json.dumps(body, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except (ValueError, UnicodeEncodeError):
            raise ValueError(json_problem(body) or "the body cannot be encoded as JSON") from None
        return self

    def forwarded(self) -> dict[str, Any]:
        """The body for the engine: what the client sent, without our extension fields."""
        return self.model_dump(exclude_unset=True, exclude=set(ROPE_FIELDS))


class CompletionRequest(RopeFields):
    """``POST /v1/completions``: the fields the gateway reads (prompt for token counting, max_tokens for the
    policy and the context check)."""

    model: str | None = None
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="Text, texts, token ids or lists of token ids.")
    max_tokens: int | None = Field(None, ge=0, strict=True,
                                   description="Tokens to generate (0 only with echo: score the prompt).")
    echo: bool | None = None
    stream: bool = False
    vllm_xargs: dict[str, Any] | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(v, list) and not v for v in value)):
            raise ValueError("prompt must not be an empty list")
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _generates(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 is only allowed with echo, to score the prompt)")
        return self

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(RopeFields):
    """``POST /v1/chat/completions``: messages and the chat-template options (for token counting through the
    engine's ``/tokenize``), and the generation budget."""

    model: str | None = None
    messages: list[Any] = Field(min_length=1, description="Validated as OpenAI does (server.messages).")
    max_tokens: TokenCount | None = None
    max_completion_tokens: TokenCount | None = None
    stream: bool = False
    vllm_xargs: dict[str, Any] | None = None

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``, as in vLLM."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tokenize_body(self, model: str) -> dict[str, Any]:
        """The engine's ``/tokenize`` request that applies the same chat template as the generation will."""
        body: dict[str, Any] = {"model": model, "messages": self.messages, "add_generation_prompt": True}
        extra = self.model_extra or {}
        for key in ("add_generation_prompt", "continue_final_message", "add_special_tokens", "chat_template",
                    "chat_template_kwargs", "tools", "mm_processor_kwargs", "media_io_kwargs"):
            if key in extra:
                body[key] = extra[key]
        return body
