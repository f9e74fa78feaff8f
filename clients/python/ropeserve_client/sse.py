"""Server-sent events, as OpenAI-compatible servers stream them: ``data: {...}`` lines separated by
blank lines, closed by ``data: [DONE]``. A pure, incremental decoder fed one line at a time, shared by
the sync and async clients.
"""

from __future__ import annotations

DONE = "[DONE]"


class SSEDecoder:
    """Feed it lines (without their line ending); it returns an event's data when the event is complete.

    Follows the SSE specification where it matters here: several ``data:`` lines of one event are joined
    with newlines, one space after the colon is dropped, comments (``:`` lines) and the ``event``,
    ``id`` and ``retry`` fields are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (call at the end of the stream)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data
