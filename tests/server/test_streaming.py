"""Real sockets (uvicorn in threads): SSE relayed chunk by chunk, the engine's stream closed when the client
leaves, a stream broken by the engine, refused connections and recovery, and the official openai SDK."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from server.app import create_app
from tests.server.conftest import settings_for
from tests.server.fake_engine import MODEL, FakeEngine
from tests.server.helpers import wait_until
from tests.server.servers import serve_in_thread

TIMEOUT = httpx.Timeout(5.0)


@contextlib.contextmanager
def running_gateway(urls: list[str], **overrides) -> Iterator[tuple[str, object]]:  # noqa: ANN003
    app = create_app(settings_for(urls, **overrides))
    with serve_in_thread(app) as url:
        yield url, app


def sse_events(body: str) -> list[str]:
    return [event.removeprefix("data: ") for event in body.split("\n\n") if event]


def test_stream_is_relayed_chunk_by_chunk() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()  # the engine sends its first chunk, then waits
    with serve_in_thread(engine.app) as engine_url, running_gateway([engine_url]) as (url, _):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client, client.stream(
                "POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 4, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-rope-factor"] == "1"
            chunks = response.iter_raw()
            first = next(chunks)  # arrives while the engine still holds the rest: nothing is buffered
            assert b'" t0"' in first and engine.streams_finished == 0
            engine.gate.set()
            rest = b"".join(chunks)
    events = sse_events((first + rest).decode())
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [" t0", " t1", " t2", " t3"]
    assert engine.streams_finished == 1


def test_client_disconnect_closes_the_engine_stream() -> None:
    engine = FakeEngine()
    engine.gate = threading.Event()
    with serve_in_thread(engine.app) as engine_url, running_gateway([engine_url]) as (url, app):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client, client.stream(
                "POST", "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
            chunks = response.iter_raw()
            assert b"t0" in next(chunks)
            time.sleep(0.1)
            assert app.state.pool.engines[0].in_flight == 1 and engine.streams_cancelled == 0
        # the client left with the engine still generating
        wait_until(lambda: engine.streams_cancelled == 1)
        wait_until(lambda: app.state.pool.engines[0].in_flight == 0)
    assert engine.streams_finished == 0


def test_stream_broken_by_the_engine_ends_with_an_error_event() -> None:
    engine = FakeEngine()
    engine.fail_mid_stream = True
    with serve_in_thread(engine.app) as engine_url, running_gateway([engine_url]) as (url, app):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True})
        assert app.state.pool.engines[0].in_flight == 0
    events = sse_events(response.text)
    assert json.loads(events[0])["choices"][0]["text"] == " t0"
    assert json.loads(events[-2])["error"]["code"] == "engine_connection_lost"
    assert events[-1] == "[DONE]"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_refused_engine_is_ejected_and_recovers() -> None:
    alive, revived = FakeEngine(), FakeEngine()
    dead_socket = free_socket()  # bound, not listening: connections are refused
    dead_url = f"http://127.0.0.1:{dead_socket.getsockname()[1]}"
    with serve_in_thread(alive.app) as alive_url, running_gateway(
            [dead_url, alive_url], health_interval_s=0.05, connect_timeout_s=1) as (url, app):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            for _ in range(3):
                assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
            dead = app.state.pool.engines[0]
            assert not dead.healthy and "ConnectError" in dead.last_error
            assert len(alive.requests) == 3
            with serve_in_thread(revived.app, sock=dead_socket):  # the engine comes back on its port
                wait_until(lambda: dead.healthy)
                for _ in range(4):
                    assert client.post("/v1/completions",
                                       json={"prompt": "hi", "max_tokens": 1}).status_code == 200
                assert len(revived.requests) == 2 and len(alive.requests) == 5
                ready = client.get("/readyz").json()
                assert [e["healthy"] for e in ready["engines"]] == [True, True]


def test_openai_sdk_against_the_gateway() -> None:
    engine = FakeEngine()
    with serve_in_thread(engine.app) as engine_url, running_gateway([engine_url], api_keys="sk-test") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=5)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": " ".join(["w"] * 9000)}], max_tokens=5, seed=3)
        assert float(raw.headers["x-rope-factor"]) == 2 ** 0.5  # past L: the first bucket above it
        assert raw.parse().choices[0].message.content == " t0 t1 t2 t3 t4"
        stream = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == " t0 t1 t2"
        assert [m.id for m in client.models.list()] == [MODEL]
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=" ".join(["w"] * 65537))
        assert info.value.code == "context_length_exceeded"
        bad_key = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=5)
        with pytest.raises(openai.AuthenticationError):
            bad_key.models.list()
