"""Request models of the OpenAI routes: the fields the gateway reads, validated; everything else passes through.

Both models allow extra fields (``n``, ``stop``, ``logprobs``, ``echo``, ``seed``, ``temperature``, vLLM's
own...), which reach the engine unchanged. Our extensions, stripped before forwarding:

- ``rope_factor`` (number >= 1, at most the served maximum factor): run the request at this scale
  instead of the policy's choice; it is rounded up to a bucket, and never below the fine-tuned factor.
  ``vllm_xargs.rope_factor`` is read the same way.
- ``rope_method`` (a rope_ext method name): ``"default"`` runs the request with plain RoPE (factor 1,
  the unscaled model, for A/B comparisons); the served method (e.g. ``"dynamic_yarn"``) is the normal
  behaviour; any other known method is refused with 400, as the engine does not serve it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rope_ext import METHODS

ROPE_FIELDS = frozenset({"rope_factor", "rope_method"})


class RopeFields(BaseModel):
    """The per-request RoPE controls shared by both routes."""

    model_config = ConfigDict(extra="allow")

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

    def forwarded(self) -> dict[str, Any]:
        """The body for the engine: what the client sent, without our extension fields."""
        return self.model_dump(exclude_unset=True, exclude=set(ROPE_FIELDS))


class CompletionRequest(RopeFields):
    """``POST /v1/completions``: the fields the gateway reads (prompt for token counting, max_tokens for the
    policy and the context check)."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, token ids or lists of token ids.")
    max_tokens: int | None = Field(None, ge=0)
    stream: bool = False
    vllm_xargs: dict[str, Any] | None = None
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(v, list) and not v for v in value)):
            raise ValueError("prompt must not be an empty list")
        return value

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(RopeFields):
    """``POST /v1/chat/completions``: messages and the chat-template options (for token counting through the
    engine's ``/tokenize``), and the generation budget."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
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
