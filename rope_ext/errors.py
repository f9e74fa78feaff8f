"""Typed errors of the rope_ext math core.

Every invalid setting raises :class:`RopeConfigError`, whose ``field`` names the offending field and whose
message states the allowed range, so the server can map it to a 400 in one place.
"""

from __future__ import annotations


class RopeConfigError(ValueError):
    """A RoPE scaling setting or per-request override is out of its allowed range."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
