"""The load benchmarks stay runnable and able to fail: bench/load_mixed.py and bench/soak.py, shrunk to seconds,
against a gateway in a thread in front of the fake engine (their full runs are in docs/RESULTS.md)."""

from __future__ import annotations

import argparse
import asyncio
import os

from bench import load_mixed, soak
from server.app import create_app
from tests.server.conftest import settings_for
from tests.server.fake_engine import MODEL, FakeEngine
from tests.server.servers import serve_in_thread


def test_load_mixed_compares_each_output_with_the_request_alone() -> None:
    engine = FakeEngine(sign_answers=True, token_delay_s=0.01)
    args = argparse.Namespace(requests=8, long_fraction=0.25, long_words=9000, short_words=50, max_tokens=4,
                              logprobs=False, seed=0, timeout_s=60, model=MODEL)
    with serve_in_thread(engine.app) as engine_url, serve_in_thread(create_app(settings_for([engine_url]))) as url:
        result = asyncio.run(load_mixed.run(url, args))
    assert result["errors"] == 0 and result["compared"] == 8 and result["identical"] == 8
    assert result["factor_changed"] == 0 and result["factors"] == ["1", repr(2 ** 0.5)]  # short and long, both compared
    assert engine.max_in_flight >= 4  # the second phase really ran them together


def test_load_mixed_notices_a_leaked_scale() -> None:
    alone = {"text": " t0/f1/h42 t1/f1/h42", "factor": "1"}
    leaked = {"text": " t0/f2/h42 t1/f2/h42", "factor": "2"}  # the same prompt run at another's factor
    row = load_mixed.compare(alone, leaked)
    assert row == {"identical": False, "factor_same": False, "first_diff_char": 5}
    tokens = {"text": "ab", "factor": "1", "tokens": ["a", "b"], "logprobs": [-0.5, -1.0]}
    near = {"text": "ac", "factor": "1", "tokens": ["a", "c"], "logprobs": [-0.52, -2.0]}
    row = load_mixed.compare(tokens, near)
    assert row["first_diff_token"] == 1 and abs(row["max_logprob_diff"] - 0.02) < 1e-9


def test_soak_reports_errors_latency_and_memory() -> None:
    engine = FakeEngine(token_delay_s=0.001)
    args = argparse.Namespace(minutes=0.05, rps=20.0, max_in_flight=8, max_tokens=4, warmup_s=0.0)
    with serve_in_thread(engine.app) as engine_url, serve_in_thread(create_app(settings_for([engine_url]))) as url:
        result = asyncio.run(soak.Soak(url, MODEL, args).run(os.getpid()))
    assert result["errors"] == 0 and 40 <= result["requests"] <= 70
    assert {"completion", "stream", "stream_ttfb"} == set(result["latency"])
    assert result["latency"]["stream"]["count"] + result["latency"]["completion"]["count"] == result["requests"]
    assert result["memory"]["rss_at_end_mib"] > 0 and "growth_after_warmup_pct" in result["memory"]
