"""Faults with real processes: an engine killed (SIGKILL) or stopped (SIGSTOP) in the middle of requests, the
embedded engine restarted with backoff, clients leaving mid-stream or before a non-streaming answer, and
SIGTERM with requests in flight.

Each engine is the fake vLLM engine as a real process (engine_server.py), paced by ``token_delay_s`` so that
requests are really in flight when the fault strikes; the gateway runs in a thread (serve_in_thread) or, where
signals and the embedded engine matter, as the real ``ropeserve serve`` process (gateway_harness.py). Every
request must end with a clear error (never hang), and no engine request, lease or connection is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from server.app import create_app
from server.engine_process import free_port
from tests.reliability.processes import engine_running, engine_server, engine_servers, gateway_process
from tests.server.conftest import settings_for
from tests.server.fake_engine import FakeEngine
from tests.server.helpers import alive, wait_until
from tests.server.servers import serve_in_thread

DELAY = 0.05  # seconds per token on the paced engines


@contextlib.contextmanager
def gateway_thread(urls: list[str], **overrides: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(settings_for(urls, **overrides))
    with serve_in_thread(app) as url:
        yield url, app


def sse_events(body: str) -> list[str]:
    return [event.removeprefix("data: ") for event in body.split("\n\n") if event.strip()]


def call(url: str, *, max_tokens: int, stream: bool, timeout: float = 30) -> tuple[int, str, float]:
    """One completion: (status, body, seconds); the body of a stream is every byte received until it ended."""
    started = time.monotonic()
    body = {"prompt": "hello there", "max_tokens": max_tokens, "stream": stream}
    with httpx.Client(timeout=timeout) as client:
        if not stream:
            response = client.post(f"{url}/v1/completions", json=body)
            return response.status_code, response.text, time.monotonic() - started
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            text = b"".join(response.iter_raw()).decode()
            return response.status_code, text, time.monotonic() - started


def ended_with_error(text: str, code: str) -> bool:
    events = sse_events(text)
    return len(events) >= 2 and events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == code


def complete_ok(url: str) -> bool:
    status, text, _ = call(url, max_tokens=2, stream=False)
    return status == 200 and json.loads(text)["choices"][0]["text"] == " t0 t1"


# --- an engine killed mid-request -------------------------------------------------------------------------

def test_killed_engine_fails_its_requests_clearly_and_traffic_moves_to_the_other() -> None:
    with engine_servers(2, token_delay_s=DELAY) as (victim, survivor), \
            gateway_thread([victim.url, survivor.url], health_interval_s=0.1) as (url, app):
        pool = app.state.pool
        with ThreadPoolExecutor(8) as executor:
            # 40 tokens at 50 ms: each runs about 2 s; least-in-flight routing puts four on each engine
            futures = [executor.submit(call, url, max_tokens=40, stream=i % 2 == 0) for i in range(8)]
            wait_until(lambda: engine_running(victim.url) == 4 and engine_running(survivor.url) == 4, timeout=10)
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            results = [future.result(timeout=20) for future in futures]
        ok = [r for r in results if r[0] == 200 and sse_events(r[1])[-1:] != [] and "error" not in r[1]]
        broken = [r for r in results if r not in ok]
        assert len(ok) == 4 and len(broken) == 4  # the survivor's four finished; the victim's four failed
        for status, text, _ in broken:
            if status == 502:  # non-streaming: a clear 5xx in the envelope
                assert json.loads(text)["error"]["code"] == "engine_connection_lost"
            else:  # streaming: the status was sent; the stream ends with an error event and [DONE]
                assert status == 200 and ended_with_error(text, "engine_connection_lost")
        assert all(elapsed < killed_at - min(r[2] for r in results) + 20 for *_, elapsed in results)
        # the victim leaves rotation, the gateway stays ready, and every new request lands on the survivor
        wait_until(lambda: not pool.engines[0].healthy, timeout=5)
        assert httpx.get(f"{url}/readyz").status_code == 200
        before = engine_running(survivor.url)
        assert before == 0
        assert all(complete_ok(url) for _ in range(10))
        assert [e.in_flight for e in pool.engines] == [0, 0]


def test_embedded_engine_killed_mid_request_is_restarted_with_backoff(tmp_path: Path) -> None:
    engine_port = free_port()
    backoff = 1.0
    settings = {"health_interval_s": 0.1, "engine_restart_backoff_s": backoff, "engine_max_restarts": 3}
    with gateway_process(settings, extra=["--engine-port", str(engine_port), "--workdir", str(tmp_path),
                                          "--token-delay-s", str(DELAY)]) as gateway:
        engine_url = f"http://127.0.0.1:{engine_port}"
        first_pid = int((tmp_path / "starts").read_text().split()[0])
        with ThreadPoolExecutor(2) as executor:
            futures = [executor.submit(call, gateway.url, max_tokens=100, stream=stream) for stream in (False, True)]
            wait_until(lambda: engine_running(engine_url) == 2, timeout=10)
            os.kill(first_pid, signal.SIGKILL)
            killed_at = time.time()
            (plain_status, plain, plain_s), (stream_status, streamed, stream_s) = [f.result(timeout=20) for f in futures]
        assert plain_status == 502 and json.loads(plain)["error"]["code"] == "engine_connection_lost"
        assert stream_status == 200 and ended_with_error(streamed, "engine_connection_lost")
        assert max(plain_s, stream_s) < 100 * DELAY  # ended by the kill, long before the 5 s they would take
        # not ready while the engine is down ...
        wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 503, timeout=5)
        down = httpx.get(f"{gateway.url}/readyz").json()
        assert down["error"]["code"] == "no_engine_available" and down["engines"][0]["state"] == "unhealthy"
        refused = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_engine_available"
        # ... then restarted after the backoff, and ready again
        wait_until(lambda: httpx.get(f"{gateway.url}/readyz").status_code == 200, timeout=45)
        starts = [line.split() for line in (tmp_path / "starts").read_text().splitlines()]
        assert len(starts) == 2 and int(starts[1][0]) != first_pid and not alive(first_pid)
        assert float(starts[1][1]) - killed_at >= backoff
        assert complete_ok(gateway.url)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0
        wait_until(lambda: not alive(int(starts[1][0])), timeout=10)


# --- an engine that stops answering ------------------------------------------------------------------------

def test_engine_that_stops_answering_times_out_and_is_taken_out() -> None:
    # health checks every 0.5 s that give up after 0.5 s: the engine is out about 1.5 s after it stops, so a
    # request sent at once meets the 1 s request timeout first
    with engine_server(token_delay_s=DELAY) as engine, gateway_thread(
            [engine.url], request_timeout_s=1.0, health_interval_s=0.5, health_timeout_s=0.5) as (url, app), \
            ThreadPoolExecutor(1) as executor:
        assert complete_ok(url)
        with httpx.Client(base_url=url, timeout=10) as client, client.stream(
                "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 200, "stream": True}) as response:
            chunks = response.iter_raw()
            first = next(chunks)
            os.kill(engine.pid, signal.SIGSTOP)  # alive, connections still accepted by the kernel, no answers
            try:
                stalled_at = time.monotonic()
                plain = executor.submit(call, url, max_tokens=1, stream=False)
                rest = b"".join(chunks).decode()
                stream_s = time.monotonic() - stalled_at
                status, text, plain_s = plain.result(timeout=10)
                wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, timeout=5)
                state = app.state.pool.engines[0]
            finally:
                os.kill(engine.pid, signal.SIGCONT)
        assert b"t0" in first and ended_with_error(rest, "engine_timeout") and stream_s < 5
        assert "1 s" in json.loads(sse_events(rest)[-2])["error"]["message"]
        assert status == 504 and json.loads(text)["error"]["code"] == "engine_timeout" and plain_s < 5
        assert state.state == "unhealthy" and "Timeout" in state.last_error
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, timeout=10)  # back when it answers
        assert complete_ok(url)
        assert state.in_flight == 0


# --- clients that leave mid-request -------------------------------------------------------------------------

def test_clients_leaving_mid_request_abort_the_engine_requests_and_leak_nothing() -> None:
    this = psutil.Process()
    with engine_server(token_delay_s=DELAY) as engine, gateway_thread([engine.url]) as (url, app):
        engine_port = int(engine.url.rsplit(":", 1)[1])

        def leave_after_first_chunk(_: int) -> bytes:
            with httpx.Client(base_url=url, timeout=10) as client, client.stream(
                    "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 400, "stream": True}) as response:
                return next(response.iter_raw())  # then the client closes the connection: 20 s early

        def upstream_connections() -> int:
            return sum(1 for c in this.net_connections("tcp") if c.raddr and c.raddr.port == engine_port
                       and c.status == psutil.CONN_ESTABLISHED)

        fds = []
        for _ in range(3):
            with ThreadPoolExecutor(16) as executor:
                firsts = list(executor.map(leave_after_first_chunk, range(16)))
            assert all(b"t0" in first for first in firsts)
            # the engine's own count of running requests drops to 0: every request was aborted, not finished
            wait_until(lambda: engine_running(engine.url) == 0, timeout=10)
            wait_until(lambda: app.state.pool.engines[0].in_flight == 0, timeout=5)
            wait_until(lambda: upstream_connections() <= 2, timeout=5)  # broken streams are not pooled
            fds.append(this.num_fds())
        assert fds[2] <= fds[0] + 4  # no descriptor growth from round to round

        # a client that gives up on a non-streaming request (10 s of generation) after 0.5 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 200},
                       timeout=httpx.Timeout(10, read=0.5))
        left = time.monotonic()
        wait_until(lambda: engine_running(engine.url) == 0, timeout=5)
        assert time.monotonic() - left < 5  # aborted on the engine, not generated to the end
        assert "fake:requests_aborted_total 1" in httpx.get(f"{engine.url}/metrics").text
        wait_until(lambda: app.state.pool.engines[0].in_flight == 0, timeout=5)
        metrics = httpx.get(f"{url}/metrics").text
    assert f'ropeserve_engine_in_flight{{engine="{engine.url}"}} 0.0' in metrics
    assert 'ropeserve_requests_total{method="POST",route="/v1/completions",status="499"} 1.0' in metrics


# --- SIGTERM with requests in flight --------------------------------------------------------------------------

def test_sigterm_refuses_new_work_finishes_short_requests_ends_long_ones_and_exits_0() -> None:
    engine = FakeEngine(token_delay_s=0.1)
    grace = 2.0
    with serve_in_thread(engine.app) as engine_url, gateway_process(
            {"engine_urls": [engine_url], "shutdown_grace_s": grace}) as gateway:
        plans = {"short": (8, False), "short-stream": (8, True), "long": (100, False), "long-stream": (100, True)}
        with ThreadPoolExecutor(4) as executor:
            futures = {name: executor.submit(call, gateway.url, max_tokens=n, stream=s, timeout=30)
                       for name, (n, s) in plans.items()}
            wait_until(lambda: engine.in_flight == 4, timeout=10)
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            def refused() -> bool:
                try:
                    httpx.get(f"{gateway.url}/healthz", timeout=0.5)
                except httpx.ConnectError:
                    return True
                except httpx.HTTPError:
                    return False
                return False

            wait_until(refused, timeout=2)  # no new connection once the signal is in
            refused_after = time.monotonic() - signalled
            results = {name: future.result(timeout=30) for name, future in futures.items()}
        assert gateway.process.wait(timeout=15) == 0
        exited_after = time.monotonic() - signalled
    assert refused_after < 1.5
    status, text, _ = results["short"]
    assert status == 200 and json.loads(text)["choices"][0]["text"] == "".join(f" t{i}" for i in range(8))
    status, text, _ = results["short-stream"]
    assert status == 200 and sse_events(text)[-1] == "[DONE]" and "error" not in text
    status, text, _ = results["long"]  # still running when the grace period ended: a 503 that says why
    assert status == 503 and json.loads(text)["error"]["code"] == "server_shutting_down"
    status, text, _ = results["long-stream"]  # ended cleanly: an error event and [DONE], no cut body
    assert status == 200 and ended_with_error(text, "server_shutting_down")
    assert grace <= exited_after < grace + 8
    wait_until(lambda: engine.in_flight == 0, timeout=5)  # the engine's requests were closed, not left running
    assert engine.streams_cancelled == 1 and engine.streams_finished == 1
