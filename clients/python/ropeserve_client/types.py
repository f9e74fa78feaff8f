"""The gateway's answers as pydantic models. They accept fields they do not know (the gateway and
vLLM add some), and each result carries ``rope_factor``: the RoPE scale factor the gateway reports in
the ``x-rope-factor`` header of the answer (None when the header is absent).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Model):
    """POST /v1/completions; also each chunk of a streamed completion (``text`` is then a delta)."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    rope_factor: float | None = None

    @property
    def text(self) -> str:
        """The first choice's text ('' when there is none)."""
        return self.choices[0].text if self.choices else ""


class ChatMessage(_Model):
    role: str
    content: str | None = None


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    """POST /v1/chat/completions."""

    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = Field(default_factory=list)
    usage: Usage | None = None
    rope_factor: float | None = None

    @property
    def content(self) -> str:
        """The first choice's message content ('' when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    """One event of a streamed chat completion."""

    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    rope_factor: float | None = None

    @property
    def content(self) -> str:
        """The first choice's content delta ('' when there is none)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


class Model(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""
    max_model_len: int | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[Model] = Field(default_factory=list)
    rope_factor: float | None = None

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.data]


class Probe(_Model):
    """GET /healthz or /readyz: ``ok`` is the verdict (200), ``detail`` the body the gateway sent."""

    ok: bool
    status_code: int
    detail: Any = None
    rope_factor: float | None = None


class PasskeyResult(_Model):
    """GET /healthz/passkey: one passkey retrieval (answered 200 when passed, 503 when not)."""

    passed: bool
    requested_tokens: int
    prompt_tokens: int
    depth: float
    expected_key: int
    answer: str | None = None
    rope_factor: float | None = None
    latency_s: float = 0.0
    cached: bool = False
    seed: int | None = None
