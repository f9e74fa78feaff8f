"""The pure helpers: Retry-After parsing, the backoff policy, and the SSE decoder."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from ropeserve_client.retry import RetryPolicy, parse_retry_after
from ropeserve_client.sse import SSEDecoder

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "value, seconds",
    [("3", 3.0), (" 1.5 ", 1.5), ("0", 0.0), ("-4", 0.0), (None, None), ("", None), ("soon", None),
     ("nan", None)],
)
def test_retry_after_seconds(value, seconds):
    assert parse_retry_after(value, now=NOW) == seconds


def test_retry_after_http_date():
    later = format_datetime(NOW + timedelta(seconds=30), usegmt=True)
    earlier = format_datetime(NOW - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=NOW) == pytest.approx(30.0)
    assert parse_retry_after(earlier, now=NOW) == 0.0
    naive = (NOW + timedelta(seconds=10)).strftime("%a, %d %b %Y %H:%M:%S")  # no zone: read as UTC
    assert parse_retry_after(naive, now=NOW) == pytest.approx(10.0)


def test_backoff_is_exponential_and_capped():
    p = RetryPolicy(backoff=0.5, multiplier=2.0, max_backoff=3.0, jitter=0.0)
    assert [p.delay(a) for a in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_retry_after_wins_and_is_capped():
    p = RetryPolicy(backoff=0.5, max_retry_after=10.0, jitter=0.0)
    assert p.delay(0, retry_after=7.0) == 7.0
    assert p.delay(3, retry_after=0.0) == 0.0
    assert p.delay(0, retry_after=1e9) == 10.0


def test_jitter_bounds_and_seeded():
    p = RetryPolicy(backoff=1.0, jitter=0.5, rng=random.Random(0))
    q = RetryPolicy(backoff=1.0, jitter=0.5, rng=random.Random(0))
    ds = [p.delay(0) for _ in range(50)]
    assert all(1.0 <= d <= 1.5 for d in ds) and len(set(ds)) > 1
    assert ds == [q.delay(0) for _ in range(50)]


def test_should_retry():
    p = RetryPolicy(max_retries=2)
    assert p.should_retry_status(429, 0) and p.should_retry_status(503, 1)
    assert not p.should_retry_status(503, 2)
    assert not p.should_retry_status(500, 0) and not p.should_retry_status(400, 0)
    assert p.should_retry_connect(1) and not p.should_retry_connect(2)
    assert not RetryPolicy(retry_connect_errors=False).should_retry_connect(0)
    assert not RetryPolicy.none().should_retry_status(429, 0)
    assert RetryPolicy(statuses={500}).should_retry_status(500, 0)


@pytest.mark.parametrize(
    "kwargs", [{"max_retries": -1}, {"backoff": -1}, {"jitter": -0.1}, {"multiplier": 0.5}, {"max_retry_after": -1}]
)
def test_policy_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def feed_all(lines):
    d, out = SSEDecoder(), []
    for line in lines:
        event = d.feed(line)
        if event is not None:
            out.append(event)
    tail = d.flush()
    return out + ([tail] if tail is not None else [])


def test_sse_events():
    assert feed_all(['data: {"a": 1}', "", "data: [DONE]", ""]) == ['{"a": 1}', "[DONE]"]


def test_sse_multiline_comments_fields_crlf():
    lines = [": keep-alive", "event: message", "id: 7", "retry: 100", "data: line one\r", "data:line two", "",
             "", "data:  two spaces"]
    assert feed_all(lines) == ["line one\nline two", " two spaces"]


def test_sse_no_event_without_data():
    assert feed_all(["", ": comment", "", "event: ping", ""]) == []
