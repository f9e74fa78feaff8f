"""Chat messages validated as OpenAI's Chat Completions API validates them, before any chat template sees them.

One model per role (``system``, ``developer``, ``user``, ``assistant``, ``tool`` and the deprecated
``function``), told apart by ``role``; content is a string or a list of content parts of the kinds the role
takes (``text`` for all, ``image_url``, ``input_audio`` and ``file`` for users, ``refusal`` for assistants);
an assistant message needs content, tool calls or a function call; a tool message needs ``tool_call_id``.
Fields OpenAI does not define are refused, except the few vLLM reads from a message (``reasoning``,
``reasoning_content``, ``tool_calls`` on any role its templates accept), so a malformed message is a 400
in OpenAI's envelope with the message's index in ``param`` (``messages[2].content``), never a template
error::

    validate_messages([{"role": "user", "content": "hi"}])       # the same list, or ValueError
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class File(_Strict):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: File


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _Message(_Strict):
    name: str | None = None
    # read by vLLM's chat templates on any role (reasoning models, tool-calling templates)
    reasoning: str | None = None
    reasoning_content: str | None = None


class SystemMessage(_Message):
    role: Literal["system"]
    content: str | list[TextPart]


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[UserPart]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and self.function_call is None and self.refusal is None:
            raise ValueError("an assistant message needs content, tool_calls or function_call")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(_Message):
    role: Literal["function"]
    content: str | None
    name: str  # type: ignore[assignment]  # required for this role


Message = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage |
                    FunctionMessage, Field(discriminator="role")]
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_MESSAGE = TypeAdapter(Message)


PART_TAGS = frozenset({"text", "image_url", "input_audio", "file", "refusal"})


def _where(index: int, loc: tuple[Any, ...]) -> str:
    """``messages[i].content[0].text`` from pydantic's location: the role's tag, the union branches
    (``str``, ``list[...]``) and a content part's tag (right after its index) dropped."""
    path, after_index = f"messages[{index}]", False
    for part in loc[1:]:
        if isinstance(part, int):
            path, after_index = f"{path}[{part}]", True
            continue
        if part == "str" or "[" in part or (after_index and part in PART_TAGS):
            after_index = False
            continue
        path, after_index = f"{path}.{part}", False
    return path


class MessageError(ValueError):
    """A malformed message: ``param`` names where (``messages[1].content``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def validate_messages(messages: list[Any]) -> list[Any]:
    """``messages`` unchanged when every message is valid, else :class:`MessageError` for the first bad one."""
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessageError(f"messages[{index}] must be an object with a role", f"messages[{index}]")
        role = message.get("role")
        if role not in ROLES:
            raise MessageError(f"messages[{index}].role must be one of {', '.join(ROLES)} (got {role!r})",
                               f"messages[{index}].role")
        try:
            _MESSAGE.validate_python(message)
        except ValidationError as exc:
            # the deepest error: for "a string or a list of parts", the part that is wrong, not "not a string"
            first = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
            where = _where(index, tuple(first["loc"]))
            raise MessageError(f"{where}: {first['msg']}", where) from None
    return messages
