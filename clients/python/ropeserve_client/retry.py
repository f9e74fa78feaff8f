"""When and how long to wait before trying a request again: a frozen policy and pure helpers.

The gateway answers 429 (busy, e.g. a passkey check already running) and 503 (no engine ready) with a
``Retry-After`` header when it knows how long to wait; the client honours it (capped by
``max_retry_after``) and otherwise backs off exponentially. Only answers that mean "not processed" are
retried, so a retried completion never runs twice::

    Client(url, retry=RetryPolicy(max_retries=5, backoff=1.0))
    Client(url, retry=RetryPolicy.none())
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class RetryPolicy:
    """Retries on ``statuses`` and on failures to connect, with exponential backoff.

    The delay before retry ``attempt`` (0-based) is ``Retry-After`` when the answer carried one (at most
    ``max_retry_after``), else ``min(max_backoff, backoff * multiplier**attempt)``, plus up to
    ``jitter`` of itself drawn at random so that many clients do not retry in lockstep.
    """

    max_retries: int = 3
    backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    jitter: float = 0.1
    statuses: frozenset[int] = frozenset({429, 503})
    retry_connect_errors: bool = True
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("backoff", "max_backoff", "max_retry_after", "jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        object.__setattr__(self, "statuses", frozenset(self.statuses))

    @classmethod
    def none(cls) -> RetryPolicy:
        """Never retry."""
        return cls(max_retries=0)

    def should_retry_status(self, status: int, attempt: int) -> bool:
        return status in self.statuses and attempt < self.max_retries

    def should_retry_connect(self, attempt: int) -> bool:
        return self.retry_connect_errors and attempt < self.max_retries

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0 for the first retry)."""
        if retry_after is not None:
            base = min(max(retry_after, 0.0), self.max_retry_after)
        else:
            base = min(self.max_backoff, self.backoff * self.multiplier**attempt)
        if self.jitter and base:
            base += self.rng.uniform(0, self.jitter * base)
        return base


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date; None if absent or
    unreadable. A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if seconds == seconds else None  # NaN is unreadable
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    return max((when - now).total_seconds(), 0.0)
