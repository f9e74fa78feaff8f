"""Typed errors of the rope_ext math core.

Every invalid setting raises :class:`RopeConfigError`, whose ``field`` names the offending field and whose
message states the allowed range, so the server can map it to a 400 in one place. A request pinned to a
bucket that asks for more tokens than the bucket holds raises its subclass :class:`CapacityExceededError`
(a context-length error: the gateway and vLLM's front-end report it as one).
"""

from __future__ import annotations


class RopeConfigError(ValueError):
    """A RoPE scaling setting or per-request override is out of its allowed range."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class CapacityExceededError(RopeConfigError):
    """A request pinned to a bucket asks for more tokens than the bucket's capacity ``floor(L * s)``
    (rule 5 of :mod:`rope_ext.policy`). The message is a whole sentence worded like vLLM's own
    context-length error (no ``field:`` prefix); ``field`` is ``"max_tokens"``, or ``"prompt"`` when the
    prompt alone leaves no room, and ``capacity`` the most tokens the bucket holds."""

    def __init__(self, field: str, message: str, *, capacity: int) -> None:
        super().__init__(field, message)
        self.args = (message,)
        self.capacity = capacity
